"""Report text rules for stage 3 (docs/recipe.md §8): Findings, structured findings, negation, captions, OSL pairs.

Pure Python/numpy, shared by the offline builder (`python -m data_prep.reports`) and the stage-3 Grain pipeline.
Pseudo-reports written from label maps are in `pseudo_reports`, the records on disk in `report_records`.

A report record (one per volume, written by the builder) is a dict:

    volume_id, path, label_path, subject, split   from the dataset manifest (paths are dataset-relative)
    source             "report" (a radiology report) or "pseudo" (generated from the volume's label map)
    report_id          the id of the report row (None for a pseudo-report)
    findings           the cleaned Findings section, the CLIP caption option (a)
    findings_sections  [[title, text], ...] the Findings split into sections, in report order; the section
                       shuffle permutes these (docs/recipe.md §8)
    sections           {section: {"positive_findings": [...], "negative_findings": [...]}}, the recipe's
                       `short_captions`: given in the reports file, or derived from the Findings by rules
    structured         "given" | "derived" | "label map": where `sections` came from
    finding_labels     {finding name: 0 | 1} for zero-shot evaluation (may be empty)

Findings extraction handles the recipe's LLM template (text between `**4. Findings:**` and `**5. Impression:**`,
`**4.x Section:**` markup stripped), plain reports with "Findings:" / "Impression:" headers, and CT-RATE's
`report_rules`, which has no headers: its Findings come first and the Impression starts at the first quotation
mark or bullet ("…are preserved. " Thoracic CT…", "…normal. • Hepatosteatosis.").

Every random choice takes the example's numpy Generator: the upstream section shuffle with a fixed seed 42 and
its crash on reports without a caption candidate (docs/recipe.md §13 #10) are not reproduced.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flexict_jax.data.tokenizer import Tokenizer

CAPTION_LEN = 768  # docs/recipe.md §8: captions are left-padded / truncated to 768 tokens
OSL_LEN = 256  # docs/recipe.md §8: OSL sentences to 256 tokens
OSL_PAIRS = 8  # docs/recipe.md §8: K
SECTION_SHUFFLE_P = 0.5  # docs/recipe.md §8
POSITIVE, NEGATIVE = "positive_findings", "negative_findings"
OTHER_SECTION = "other"
LESION_SECTION = "lesions"


class ReportError(ValueError):
    """A report (or its structured findings) that cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class ParsedReport:
    findings: str
    findings_sections: list[tuple[str, str]]
    sections: dict[str, dict[str, list[str]]]

    def has_caption(self) -> bool:
        return bool(self.findings) or any(s[POSITIVE] or s[NEGATIVE] for s in self.sections.values())


# --- sections ------------------------------------------------------------------------------------------------

# Anatomical sections of a chest/abdomen CT report, each with the words that put a sentence (or a structure
# name) into it. A sentence goes to the section whose word occurs first in it; on a tie, the section listed
# first wins, which is why the specific vessel terms ("pulmonary artery") come before the lungs ("pulmonary").
SECTION_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("heart and vessels", r"heart|cardi\w*|pericard\w*|coronar\w*|aort\w*|arter\w*|vein|veins|venous|vena|cava|"
                          r"vascular|vessels?|atheroscl\w*|atherom\w*|pulmonary (?:arter\w*|trunk|veins?|embol\w*)|"
                          r"valves?|atri(?:um|al)|ventric\w*|brachiocephalic|carotid|subclavian|portal"),
    ("mediastinum", r"mediastin\w*|lymph\w*|hil(?:ar|um)|thym\w*|esophag\w*|oesophag\w*"),
    ("lungs and airways", r"lungs?|pulmonary|bronch\w*|trache\w*|airways?|emphysem\w*|atelecta\w*|consolidat\w*|"
                          r"ground[- ]glass|fissur\w*|interstiti\w*|infiltrat\w*|pneumon\w*|parenchyma of both"),
    ("pleura", r"pleura\w*|effusions?|pneumothorax|hemithorax"),
    ("abdomen", r"liver|hepat\w*|spleen|splen\w*|kidneys?|renal|adrenal|suprarenal|pancrea\w*|gall ?bladder|"
                r"chole\w*|bile|biliary|stomach|gastr\w*|duoden\w*|bowel|intestin\w*|colon|rect\w*|bladder|"
                r"prostat\w*|uter\w*|ovar\w*|abdom\w*|periton\w*|mesenter\w*|ascites|hernia"),
    ("bones", r"bones?|osse\w*|vertebra\w*|spine|spinal|ribs?|costal|stern(?:um|al)|scapul\w*|clavic\w*|humer\w*|"
              r"femur|hip|sacr\w*|coccyx|skull|osteo\w*|fractur\w*|lytic|sclerotic|scoliosis|kyphosis|spondyl\w*|"
              r"degenerative|corpus"),
    ("head and neck", r"brain|thyroid\w*|laryn\w*|pharyn\w*|neck|face|sinus\w*"),
    ("soft tissues", r"breasts?|axilla\w*|subcutaneous|muscles?|gluteus|iliopsoas|autochthon|skin|soft tissues?|"
                     r"gynecomast\w*|chest wall|thoracic wall|fat"),
    ("devices", r"catheters?|tubes?|stents?|ports?|prosthe\w*|sutures?|clips?|pacemakers?|drains?|drainage|"
                r"sternotomy|material"),
)
# One alternation: `search` returns the earliest match and, at equal positions, the first section listed.
_SECTION_PATTERN = re.compile("|".join(rf"(?P<s{i}>\b(?:{words})\b)" for i, (_, words) in enumerate(SECTION_KEYWORDS)),
                              re.I)


def section_of(text: str, default: str = OTHER_SECTION) -> str:
    """The anatomical section a sentence or structure name belongs to (see SECTION_KEYWORDS)."""
    match = _SECTION_PATTERN.search(text.replace("_", " "))
    return SECTION_KEYWORDS[int(match.lastgroup[1:])][0] if match else default


# --- Findings extraction ---------------------------------------------------------------------------------------

_FINDINGS_HEADER = re.compile(r"\b(?:Findings|FINDINGS)\s*:\s*(?:\*\*)?")
_END_HEADER = re.compile(r"\b(?:Impressions?|IMPRESSIONS?|Conclusions?|CONCLUSIONS?)\s*:")
# What may precede an Impression header and is cut with it: the template's "**5. ", or "5. " opening a line.
_HEADER_LEAD = re.compile(r"(?:\*\*\s*(?:\d+\.\s*)?|(?:^|\n)[ \t]*\d+\.[ \t]*)$")
# Subsection headers inside the Findings: the template's `**4.1 Lungs:**` (colon inside or after the bold), or a
# "Title:" at the start of a line.
_BOLD_SUBSECTION = re.compile(r"\*\*\s*(?:\d+(?:\.\d+)*\.?\s*)?(?P<title>[^*\n:]{1,60}?)\s*(?::\s*\*\*|\*\*\s*:)")
_LINE_SUBSECTION = re.compile(r"(?m)^[ \t]*(?:[-*•][ \t]*)?(?:\d+(?:\.\d+)*\.?[ \t]*)?"
                              r"(?P<title>[A-Za-z][A-Za-z /&,()-]{1,40}):[ \t]*")
# CT-RATE: the Impression starts at the first quotation mark or bullet.
_IMPRESSION_MARK = re.compile(r"[\"“”•·]")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9(])")


def clean_text(text: str) -> str:
    """Removes markdown emphasis, quotation marks and bullets, and collapses white space."""
    text = re.sub(r"\*\*|__", " ", text)
    text = re.sub(r"[\"“”•·]", " ", text)
    return " ".join(text.split())


def split_sentences(text: str) -> list[str]:
    """Sentences of a cleaned text; a ";" followed by a capital letter also ends one (CT-RATE writes
    "When examined in the lung parenchyma window; Aeration of both lungs is normal.")."""
    return [s.strip() for s in _SENTENCE_BREAK.split(clean_text(text)) if s.strip()]


def _findings_span(text: str) -> str:
    header = _FINDINGS_HEADER.search(text)
    start = header.end() if header else 0
    end = _END_HEADER.search(text, start)
    if header:
        return _HEADER_LEAD.sub("", text[start:end.start()]) if end else text[start:]
    # No Findings header: the Findings end at an Impression header or, CT-RATE style, at the first quotation
    # mark or bullet, whichever comes first.
    mark = _IMPRESSION_MARK.search(text)
    if mark and (end is None or mark.start() < end.start()):
        return text[:mark.start()] if clean_text(text[:mark.start()]) else text
    return _HEADER_LEAD.sub("", text[:end.start()]) if end else text


def _titled_segments(findings: str) -> list[tuple[str | None, str]]:
    """(title or None, text) pieces of the Findings, split at subsection headers."""
    headers = list(_BOLD_SUBSECTION.finditer(findings))
    if not headers and "\n" in findings:
        headers = list(_LINE_SUBSECTION.finditer(findings))
    segments: list[tuple[str | None, str]] = []
    starts = [h.start() for h in headers] + [len(findings)]
    if starts[0] > 0:
        segments.append((None, findings[:starts[0]]))
    for header, end in zip(headers, starts[1:]):
        segments.append((" ".join(header["title"].lower().split()), findings[header.end():end]))
    return [(title, text) for title, text in segments if clean_text(text)]


def extract_findings(text: str) -> list[tuple[str, str]]:
    """The Findings section of a report as [(section title, cleaned text), ...] in report order.

    Titled subsections keep their titles; untitled text is split into runs of consecutive sentences of the same
    anatomical section (`section_of`; a sentence naming no section stays with the one before it). An empty
    list means the report has no Findings text.
    """
    sections: list[tuple[str, str]] = []
    for title, segment in _titled_segments(_findings_span(text)):
        if title is not None:
            sections.append((title, clean_text(segment)))
            continue
        current: str | None = None
        for sentence in split_sentences(segment):
            name = section_of(sentence, default=current or OTHER_SECTION)
            if sections and name == current:
                sections[-1] = (name, f"{sections[-1][1]} {sentence}")
            else:
                sections.append((name, sentence))
            current = name
    return sections


# --- structured findings ---------------------------------------------------------------------------------------

_NEGATIVE_CUES = re.compile(r"\b(?:no|not|none|without|neither|nor|absent|negative|unremarkable|normal|natural|"
                            r"preserved|open|patent|intact|clear|regular|symmetric(?:al)?)\b", re.I)
# Phrases that contain a cue word but do not deny a finding ("larger than normal", "could not be characterized").
_CUE_FALSE_FRIENDS = re.compile(r"than normal|(?:could|can|cannot|can't) (?:not )?be (?:characteri[sz]ed|"
                                r"evaluated|excluded|ruled out|distinguished|differentiated)|not reach", re.I)
# Sentences that are not findings: recommendations, comparisons, technique, signatures.
_NOT_A_FINDING = re.compile(r"recommend|correlat|clinical|follow-up|differential|false negative|compar(?:ed|ison)|"
                            r"previous|examination (?:was|could)|artifact|optimal|\bnote\b|\bdr\.|specialist|"
                            r"^when examined|^in the evaluation of|^as far as|^(?:it|this|these|they|which)\b", re.I)


def is_negative(sentence: str) -> bool:
    """Whether a report sentence denies a finding or states normality ("No effusion.", "The heart is normal.")."""
    return bool(_NEGATIVE_CUES.search(_CUE_FALSE_FRIENDS.sub(" ", sentence)))


def is_finding(sentence: str) -> bool:
    """Whether a sentence states a finding, as opposed to a recommendation, a comparison or a lead-in."""
    return len(sentence.split()) >= 3 and not sentence.rstrip().endswith((";", ":")) \
        and not _NOT_A_FINDING.search(sentence)


def _as_sentence(text: str) -> str:
    text = text.strip().rstrip(";,:").strip()
    if text.startswith("(") and text.count("(") > text.count(")"):  # a parenthesis opened in the sentence before
        text = text[1:].lstrip()
    return text if text.endswith((".", "!", "?")) else f"{text}."


def derive_sections(findings_sections: Sequence[tuple[str, str]]) -> dict[str, dict[str, list[str]]]:
    """Structured findings from Findings text: every finding sentence is a positive or a negative finding of
    its section (`is_negative`). Sections with only negative findings stay, with an empty positive list, so
    that OSL can draw false pairs there (docs/recipe.md §8)."""
    sections: dict[str, dict[str, list[str]]] = {}
    for title, text in findings_sections:
        for sentence in split_sentences(text):
            if not is_finding(sentence):
                continue
            entry = sections.setdefault(title, {POSITIVE: [], NEGATIVE: []})
            kind = NEGATIVE if is_negative(sentence) else POSITIVE
            if _as_sentence(sentence) not in entry[kind]:
                entry[kind].append(_as_sentence(sentence))
    return sections


def parse_structured_findings(value: Any) -> dict[str, dict[str, list[str]]]:
    """Validates the recipe's `short_captions`: a dict (or its JSON text) {section: {"positive_findings":
    [str, ...], "negative_findings": [str, ...]}}; missing lists are empty, blank sentences are dropped.
    Raises ReportError saying what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ReportError(f"structured findings are not valid JSON ({e.msg} at character {e.pos})") from e
    if not isinstance(value, dict):
        raise ReportError(f"structured findings must be a JSON object {{section: {{{POSITIVE}: [...], "
                          f"{NEGATIVE}: [...]}}}}, got {type(value).__name__}")
    sections = {}
    for section, entry in value.items():
        if not isinstance(entry, dict):
            raise ReportError(f"structured findings, section {section!r}: expected an object with {POSITIVE} / "
                              f"{NEGATIVE}, got {type(entry).__name__}")
        unknown = set(entry) - {POSITIVE, NEGATIVE}
        if unknown:
            raise ReportError(f"structured findings, section {section!r}: unknown keys {sorted(unknown)}")
        parsed = {}
        for kind in (POSITIVE, NEGATIVE):
            sentences = entry.get(kind) or []
            if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
                raise ReportError(f"structured findings, section {section!r}: {kind} must be a list of strings")
            parsed[kind] = [_as_sentence(clean_text(s)) for s in sentences if clean_text(s)]
        sections[" ".join(str(section).lower().split())] = parsed
    return sections


def parse_report(text: str, structured: Any = None) -> ParsedReport:
    """Findings, their sections and the structured findings (given, else derived) of one report.

    Raises ReportError for an empty report or one without any caption candidate (docs/recipe.md §13 #10).
    """
    if not isinstance(text, str):
        raise ReportError(f"report text must be a string, got {type(text).__name__}")
    findings_sections = extract_findings(text) if text.strip() else []
    sections = parse_structured_findings(structured) if structured not in (None, "") \
        else derive_sections(findings_sections)
    report = ParsedReport(" ".join(t for _, t in findings_sections), findings_sections, sections)
    if not report.has_caption():
        raise ReportError("empty report: no Findings text and no structured findings")
    return report


# --- negation (docs/recipe.md §8, OSL) ---------------------------------------------------------------------------------

_THERE = re.compile(r"^there\s+(?P<verb>is|are|was|were)\s+(?:(?:also|a|an|the|some|several|multiple|few)\s+)*"
                    r"(?P<rest>.+)$", re.I)
_VERB_NEGATION = {"is": "is not", "are": "are not", "was": "was not", "were": "were not",
                  "appears": "does not appear", "appear": "do not appear", "appeared": "did not appear",
                  "shows": "does not show", "show": "do not show", "showed": "did not show",
                  "demonstrates": "does not demonstrate", "demonstrate": "do not demonstrate",
                  "demonstrated": "did not demonstrate"}
_THE = re.compile(rf"^(?P<subject>the\s+.+?)\s+(?P<verb>{'|'.join(_VERB_NEGATION)})\s+(?P<rest>.+)$", re.I)
_PRESENT = re.compile(r"^(?:(?:a|an|the|some|several|multiple)\s+)?(?P<subject>.+?)\s+(?P<aux>is|are|was|were)\s+"
                      r"(?P<adverb>(?:also|again|clearly|partially)\s+)?(?P<participle>present|seen|noted|observed|"
                      r"identified|detected|visuali[sz]ed|demonstrated|evident|visible|found|appreciated|depicted)"
                      r"\b(?P<rest>.*)$", re.I)


def _lower_first(text: str) -> str:
    """Lower-cases the first letter unless the first word is an acronym or a code ("CT", "T6")."""
    first = text.split(" ", 1)[0]
    if len(first) > 1 and (first.isupper() or any(c.isdigit() for c in first)):
        return text
    return text[:1].lower() + text[1:]


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _strip_no(text: str) -> str | None:
    """`text` without a leading "no " (the sentence already denies), else None."""
    return text[3:] if text.lower().startswith("no ") else None


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


_COPULA = re.compile(r"^(?P<subject>.+?)\s+(?P<verb>is|are|was|were)\s+(?P<rest>.+)$", re.I)
# Bare past-tense changes of CT reports ("Heart size increased.") and their base forms.
_CHANGE_VERBS = {"increased": "increase", "decreased": "decrease", "regressed": "regress",
                 "progressed": "progress", "improved": "improve", "worsened": "worsen", "developed": "develop",
                 "persisted": "persist", "resolved": "resolve", "enlarged": "enlarge", "narrowed": "narrow"}
_CHANGE = re.compile(rf"^(?P<subject>.+?)\s+(?P<verb>{'|'.join(_CHANGE_VERBS)})\b(?P<rest>.*)$", re.I)
# Negated verb phrases made by the rules above -> the affirmative verb, to undo a negation instead of stacking one.
_AFFIRMATIVE = {**{negated: verb for verb, negated in _VERB_NEGATION.items() if negated.startswith("d")},
                **{f"did not {base}": past for past, base in _CHANGE_VERBS.items()}}
_UNDO = re.compile(rf"^(?P<subject>.+?)\s+(?P<negated>{'|'.join(_AFFIRMATIVE)})\b(?P<rest>.*)$", re.I)
_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.I)
# A leading adverbial phrase ("On the left, X ..."): the rules apply to the clause after it.
_LEADING_PHRASE = re.compile(r"^(?P<lead>(?:in|on|at|within|along|around|near|under|above|below|adjacent to|"
                             r"throughout|additionally|also|however)\b[^,]{0,60}),\s+(?P<main>.+)$", re.I)


def _negate_clause(body: str) -> str | None:
    """The first matching negation rule's result for a clause without final punctuation, else None."""
    if match := _UNDO.match(body):
        return f"{match['subject']} {_AFFIRMATIVE[' '.join(match['negated'].lower().split())]}{match['rest']}"
    if match := _THERE.match(body):
        verb, rest = match["verb"].lower(), match["rest"]
        affirmative = _strip_no(rest)
        return f"There {verb} {affirmative}" if affirmative else f"There {verb} no {rest}"
    if match := _THE.match(body):
        verb, rest = match["verb"].lower(), match["rest"]
        if rest.lower().startswith("not "):
            return f"{match['subject']} {verb} {rest[4:]}"
        return f"{match['subject']} {_VERB_NEGATION[verb]} {rest}"
    if match := _PRESENT.match(body):
        tail = f"{match['aux'].lower()} {match['adverb'] or ''}{match['participle']}{match['rest']}"
        affirmative = _strip_no(match["subject"])
        return f"{_upper_first(affirmative)} {tail}" if affirmative else f"No {_lower_first(match['subject'])} {tail}"
    if _strip_no(body) is None and (match := _COPULA.match(body)):
        verb, rest = match["verb"].lower(), match["rest"]
        if rest.lower().startswith("not "):
            return f"{match['subject']} {verb} {rest[4:]}"
        return f"{match['subject']} {verb} not {rest}"
    if _strip_no(body) is None and (match := _CHANGE.match(body)):
        return f"{match['subject']} did not {_CHANGE_VERBS[match['verb'].lower()]}{match['rest']}"
    return None


def negate(sentence: str) -> str:
    """The rule-based opposite of a finding sentence (docs/recipe.md §8), tried in order:

      "There is/are (a/an) X"                    -> "There is/are no X"
      "The X is/are/appears/shows/demonstrates Y" -> the verb negated ("The heart is not enlarged.")
      "X is/was present/seen/noted/observed/..."  -> "No X is/was ..."
      anything else                               -> "No x." (also when a rule gives back the same sentence)

    Two rules are added before the fallback because CT-RATE's translated reports often take these forms:
    "X is/was Y" -> "X is/was not Y", and "X increased/regressed/..." -> "X did not increase/regress/...". A
    leading adverbial phrase is kept in front ("On the left, no effusion was seen."). A sentence that already
    denies comes back affirmative ("There is no X" -> "There is X"), so negations never stack. Always returns
    one sentence ending in a period.
    """
    body = " ".join(sentence.split()).rstrip(" .!?;,:")
    if not body:
        raise ValueError("cannot negate an empty sentence")
    lead = ""
    if match := _LEADING_PHRASE.match(body):
        lead, body = f"{match['lead']}, ", match["main"]
    result = _negate_clause(body)
    if result is None or _normalised(result) == _normalised(body):
        affirmative = _strip_no(body)
        result = _upper_first(affirmative) if affirmative \
            else f"No {_lower_first(_ARTICLE.sub('', body))}"
    if lead:
        result = lead + _lower_first(result)
    return f"{' '.join(result.split())}."


# --- caption sampling and OSL pairs (docs/recipe.md §8) ----------------------------------------------------------------

def model_text(text: str) -> str:
    """What the text tower sees: lower-cased (docs/recipe.md §8), white space collapsed."""
    return " ".join(text.lower().split())


def sample_caption(record: Mapping[str, Any], rng: np.random.Generator) -> str:
    """The CLIP caption of one example, uniformly one of: (a) the cleaned Findings, with probability 0.5 in a
    shuffled section order; (b) one positive or (c) one negative finding of one random section that has any
    finding (docs/recipe.md §8). Options a record lacks are left out of the draw; a record with none is an error."""
    sections = record["sections"]
    with_findings = [name for name, s in sections.items() if s[POSITIVE] or s[NEGATIVE]]
    options = ["findings"] if record["findings"] else []
    if with_findings:
        section = sections[with_findings[rng.integers(len(with_findings))]]
        options += [kind for kind in (POSITIVE, NEGATIVE) if section[kind]]
    if not options:
        raise ValueError(f"report record {record.get('volume_id')!r}: no caption candidate (empty Findings and "
                         f"no structured findings)")
    choice = options[rng.integers(len(options))]
    if choice == "findings":
        parts = [text for _, text in record["findings_sections"]] or [record["findings"]]
        if len(parts) > 1 and rng.random() < SECTION_SHUFFLE_P:
            parts = [parts[i] for i in rng.permutation(len(parts))]
        caption = " ".join(parts)
    else:
        caption = section[choice][rng.integers(len(section[choice]))]
    return model_text(caption)


def build_positive_pool(report_records: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Section -> the de-duplicated positive findings of all given records: where OSL draws false pairs.
    Computed once over a split by the dataset builder."""
    pool: dict[str, dict[str, None]] = {}
    for record in report_records:
        for name, section in record["sections"].items():
            pool.setdefault(name, {}).update(dict.fromkeys(section[POSITIVE]))
    return {name: list(sentences) for name, sentences in sorted(pool.items()) if sentences}


def build_osl_pairs(sections: Mapping[str, Mapping[str, Sequence[str]]], rng: np.random.Generator,
                    positive_pool: Mapping[str, Sequence[str]], k: int = OSL_PAIRS) -> list[tuple[str, str, int]]:
    """K (positive sentence, its negation, label) pairs for one example (docs/recipe.md §8):

    - up to ceil(K/2) true pairs (label 1): positive findings of this example;
    - up to floor(K/2) false pairs (label 0): positives of the pool (other patients) from sections that this
      example lists with an empty positive list; a section the example does not list is never used;
    - padding to K with ("", "", -1).
    """
    own = list(dict.fromkeys(s for section in sections.values() for s in section[POSITIVE]))
    pairs = [(own[i], negate(own[i]), 1) for i in rng.permutation(len(own))[:math.ceil(k / 2)]]
    empty = [name for name, section in sections.items() if not section[POSITIVE] and positive_pool.get(name)]
    sizes = np.array([len(positive_pool[name]) for name in empty], np.int64)
    if sizes.sum():
        # Index into the concatenated pools without building it: a pool can hold 10^5 sentences.
        picks = rng.choice(int(sizes.sum()), size=min(k // 2, int(sizes.sum())), replace=False)
        ends = np.cumsum(sizes)
        for pick in np.sort(picks):
            which = int(np.searchsorted(ends, pick, side="right"))
            sentence = positive_pool[empty[which]][int(pick - (ends[which] - sizes[which]))]
            pairs.append((sentence, negate(sentence), 0))
    return pairs + [("", "", -1)] * (k - len(pairs))


def stage3_text_example(record: Mapping[str, Any], rng: np.random.Generator, tokenizer: Tokenizer,
                        caption_len: int = CAPTION_LEN, osl_len: int = OSL_LEN, osl_pairs: int = OSL_PAIRS, *,
                        positive_pool: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """The text half of one stage-3 example (docs/recipe.md §8), tokenised and left-padded to static lengths:

    caption_tokens int32 [caption_len], caption_mask bool [caption_len];
    osl_pos_tokens / osl_neg_tokens int32 [K, osl_len], osl_pos_mask / osl_neg_mask bool [K, osl_len];
    osl_labels int32 [K] (1 true pair, 0 false pair, -1 padding). Padding pairs are empty sentences, so
    they still hold the tokenizer's special tokens and never an all-False mask row.

    `positive_pool` is the pool of the record's split (`read_positive_pool`).
    """
    caption = sample_caption(record, rng)
    pairs = build_osl_pairs(record["sections"], rng, positive_pool, osl_pairs)
    caption_tokens, caption_mask = tokenizer.encode_batch([caption], caption_len)
    pos_tokens, pos_mask = tokenizer.encode_batch([model_text(p) for p, _, _ in pairs], osl_len)
    neg_tokens, neg_mask = tokenizer.encode_batch([model_text(n) for _, n, _ in pairs], osl_len)
    return {
        "caption_tokens": caption_tokens[0], "caption_mask": caption_mask[0],
        "osl_pos_tokens": pos_tokens, "osl_pos_mask": pos_mask,
        "osl_neg_tokens": neg_tokens, "osl_neg_mask": neg_mask,
        "osl_labels": np.array([label for _, _, label in pairs], np.int32),
    }
