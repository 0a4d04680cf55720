"""Stage-3 report data: Findings extraction and negation on the real CT-RATE reports, captions, OSL pairs,
pseudo-reports from real and synthetic label maps, and the `python -m data_prep.reports` builder."""
from __future__ import annotations

import csv
import json
import pathlib
import re
import shutil

import numpy as np
import pytest

from data_prep import ingest, synthetic
from data_prep import reports as build
from data_prep import tokenizer as train
from flexict_jax.data import pseudo_reports, report_records, report_rules, volume_store
from flexict_jax.data.tokenizer import load_tokenizer

LABEL_COLUMNS = 18  # CT-RATE's abnormality labels, columns 2..19 (shared/data README)


@pytest.fixture(scope="module")
def parsed(ctrate_rows) -> list[report_rules.ParsedReport]:
    return [report_rules.parse_report(row["report_text"]) for row in ctrate_rows]


# --- Findings and structured findings on the real reports -------------------------------------------------------

def test_every_ctrate_report_parses_and_has_findings(ctrate_rows, parsed):
    assert len(parsed) == 1000
    for row, report in zip(ctrate_rows, parsed):
        assert report.findings, row["AccessionNo"]
        assert not re.search(r"[\"“”•·]|\*\*", report.findings), row["AccessionNo"]
        assert report.findings == " ".join(text for _, text in report.findings_sections)
        # The Impression (after the first quotation mark or bullet) is not part of the Findings.
        mark = re.search(r"[\"“”•·]", row["report_text"])
        if mark:
            impression = report_rules.clean_text(row["report_text"][mark.start():])
            assert impression[:40] not in report.findings or impression[:40] in row["report_text"][:mark.start()]
    first = parsed[0]  # train_1: findings end before '" Thoracic CT examination within normal limits'
    assert first.findings.endswith("Vertebral corpus heights are preserved.")
    assert "within normal limits" not in first.findings
    assert {title for title, _ in first.findings_sections} == {
        "lungs and airways", "mediastinum", "heart and vessels", "pleura", "abdomen", "bones"}
    assert not any(s[report_rules.POSITIVE] for s in first.sections.values())  # a normal study


@pytest.mark.parametrize("label, keyword", [("Pleural effusion", "effusion"), ("Emphysema", "emphysem"),
                                            ("Lung nodule", "nodul"), ("Cardiomegaly", "heart|cardi"),
                                            ("Hiatal hernia", "hernia")])
def test_derived_positive_findings_agree_with_manual_labels(ctrate_rows, parsed, label, keyword):
    """The rule-based split into positive / negative findings matches CT-RATE's manual abnormality labels."""
    mentioned = {0: [], 1: []}
    for row, report in zip(ctrate_rows, parsed):
        positives = [s for section in report.sections.values() for s in section[report_rules.POSITIVE]]
        mentioned[int(row[label])].append(any(re.search(keyword, s, re.I) for s in positives))
    assert np.mean(mentioned[1]) > 0.85
    assert np.mean(mentioned[0]) < 0.2


def test_negation_of_every_real_positive_finding(parsed):
    positives = [s for report in parsed for section in report.sections.values() for s in section[report_rules.POSITIVE]]
    assert len(positives) > 3000
    for sentence in positives:
        negated = report_rules.negate(sentence)
        assert negated.endswith(".") and negated[0].isupper(), sentence
        assert report_rules.model_text(negated) != report_rules.model_text(sentence), sentence
        assert not re.search(r"\b(no no|not not|no the|no a)\b", negated, re.I), (sentence, negated)
        twice = report_rules.negate(negated)  # back to an affirmative sentence, negations never stack
        assert not re.search(r"\b(no|not)\b.*\b(no|not)\b", twice, re.I) or re.search(r"\b(no|not)\b", sentence,
                                                                                         re.I), (sentence, twice)


@pytest.mark.parametrize("sentence, expected", [
    ("There is a 5 mm nodule in the right lower lobe.", "There is no 5 mm nodule in the right lower lobe."),
    ("There are multiple nodules in both lungs.", "There are no nodules in both lungs."),
    ("There is also a nephrostomy catheter extending to the upper pole of the left kidney.",
     "There is no nephrostomy catheter extending to the upper pole of the left kidney."),
    ("The heart is enlarged.", "The heart is not enlarged."),
    ("The aortic arch is elongated.", "The aortic arch is not elongated."),
    ("The liver appears enlarged.", "The liver does not appear enlarged."),
    ("The lesion shows peripheral enhancement.", "The lesion does not show peripheral enhancement."),
    ("Pleural effusion is present.", "No pleural effusion is present."),
    ("Calcified atherosclerotic changes were observed in the thoracic aorta and coronary artery wall.",
     "No calcified atherosclerotic changes were observed in the thoracic aorta and coronary artery wall."),
    ("A millimetric accessory spleen was observed adjacent to the spleen hilus.",
     "No millimetric accessory spleen was observed adjacent to the spleen hilus."),
    ("Hiatal hernia is noted.", "No hiatal hernia is noted."),
    ("Heart size increased.", "Heart size did not increase."),
    ("Pleural effusion and atelectasis decreased.", "Pleural effusion and atelectasis did not decrease."),
    ("Thoracic aorta diameter is 45 mm.", "Thoracic aorta diameter is not 45 mm."),
    ("On the left, hydronephrosis was significantly reduced.", "On the left, hydronephrosis was not significantly "
                                                                "reduced."),
    ("In the right lung, there are consolidations in the lower lobe.",
     "In the right lung, there are no consolidations in the lower lobe."),
    ("Mild emphysematous changes in both lungs.", "No mild emphysematous changes in both lungs."),
    ("Hepatosteatosis", "No hepatosteatosis."),
    ("CT findings consistent with COVID-19 pneumonia", "No CT findings consistent with COVID-19 pneumonia."),
    # Already negative: the opposite is affirmative, never a double negation.
    ("There is no pleural effusion.", "There is pleural effusion."),
    ("The heart is not enlarged.", "The heart is enlarged."),
    ("No enlarged lymph nodes were detected.", "Enlarged lymph nodes were detected."),
    ("No pneumothorax.", "Pneumothorax."),
])
def test_negation_reads_as_english(sentence, expected):
    assert report_rules.negate(sentence) == expected


def test_negate_rejects_empty_sentence():
    with pytest.raises(ValueError, match="empty"):
        report_rules.negate(" . ")


# --- other report forms -----------------------------------------------------------------------------------------

TEMPLATE = """**1. Technique:** Non-contrast chest CT.
**2. Comparison:** None.
**4. Findings:**
**4.1 Lungs and Airways:** There is a 5 mm nodule in the right lower lobe. No consolidation.
**4.2 Heart:** The heart is enlarged. No pericardial effusion.
**4.3 Pleura:** No pleural effusion.
**5. Impression:** Cardiomegaly and a small pulmonary nodule."""


def test_recipe_template_report():
    report = report_rules.parse_report(TEMPLATE)
    assert report.findings_sections == [
        ("lungs and airways", "There is a 5 mm nodule in the right lower lobe. No consolidation."),
        ("heart", "The heart is enlarged. No pericardial effusion."),
        ("pleura", "No pleural effusion.")]
    assert "Impression" not in report.findings and "Technique" not in report.findings and "**" not in report.findings
    assert report.sections["heart"] == {report_rules.POSITIVE: ["The heart is enlarged."],
                                        report_rules.NEGATIVE: ["No pericardial effusion."]}
    assert report.sections["pleura"][report_rules.POSITIVE] == []


def test_findings_and_impression_headers():
    text = ("EXAMINATION: CT chest.\nFINDINGS:\nLUNGS: Emphysema is present. No nodules.\n"
            "MEDIASTINUM: Lymph nodes are not enlarged.\nIMPRESSION: Emphysema.")
    report = report_rules.parse_report(text)
    assert report.findings_sections == [("lungs", "Emphysema is present. No nodules."),
                                        ("mediastinum", "Lymph nodes are not enlarged.")]
    plain = report_rules.parse_report("Findings: The liver is enlarged. Conclusion: hepatomegaly.")
    assert plain.findings == "The liver is enlarged."


def test_structured_findings_given_and_malformed():
    given = {"Lungs": {"positive_findings": ["Emphysema in both lungs"], "negative_findings": []},
             "Heart": {"negative_findings": ["No cardiomegaly.", "  "]}}
    report = report_rules.parse_report("", json.dumps(given))
    assert report.findings == ""
    assert report.sections == {"lungs": {report_rules.POSITIVE: ["Emphysema in both lungs."], report_rules.NEGATIVE: []},
                               "heart": {report_rules.POSITIVE: [], report_rules.NEGATIVE: ["No cardiomegaly."]}}
    for bad, reason in [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"),
                        ('{"lungs": ["a"]}', "expected an object"), ('{"lungs": {"positives": []}}', "unknown keys"),
                        ('{"lungs": {"positive_findings": [1]}}', "list of strings")]:
        with pytest.raises(report_rules.ReportError, match=reason):
            report_rules.parse_report("The heart is enlarged.", bad)


@pytest.mark.parametrize("text", ["", "   ", "\" \" •", "Findings: Impression: normal."])
def test_empty_report_is_an_error(text):
    with pytest.raises(report_rules.ReportError, match="empty report"):
        report_rules.parse_report(text)


# --- captions and OSL pairs -------------------------------------------------------------------------------------

def _record(findings_sections, sections, volume_id="v"):
    return {"volume_id": volume_id, "findings": " ".join(t for _, t in findings_sections),
            "findings_sections": [list(s) for s in findings_sections], "sections": sections}


SECTIONED = _record(
    [("a", "Alpha one."), ("b", "Beta two."), ("c", "Gamma three."), ("d", "Delta four.")],
    {"lungs": {report_rules.POSITIVE: ["Emphysema is present."], report_rules.NEGATIVE: ["No nodule."]}})


def test_caption_is_uniform_over_findings_positive_negative_and_shuffles_per_example():
    findings = report_rules.model_text(SECTIONED["findings"])
    counts = {"findings": 0, "shuffled": 0, "positive": 0, "negative": 0}
    orders = set()
    for seed in range(900):
        caption = report_rules.sample_caption(SECTIONED, np.random.default_rng(seed))
        assert caption == caption.lower()
        if caption == "emphysema is present.":
            counts["positive"] += 1
        elif caption == "no nodule.":
            counts["negative"] += 1
        else:
            assert sorted(caption.rstrip(".").split(". ")) == sorted(findings.rstrip(".").split(". "))
            counts["findings" if caption == findings else "shuffled"] += 1
            orders.add(caption)
    for kind in ("positive", "negative"):
        assert 250 < counts[kind] < 350, counts
    assert 250 < counts["findings"] + counts["shuffled"] < 350, counts
    # p = 0.5 of a shuffle, whose permutation is the identity 1/24 of the time.
    assert 0.4 < counts["shuffled"] / (counts["findings"] + counts["shuffled"]) < 0.6, counts
    assert len(orders) > 12  # a different permutation per example, not upstream's fixed seed 42
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    assert [report_rules.sample_caption(SECTIONED, rng_a) for _ in range(5)] == \
        [report_rules.sample_caption(SECTIONED, rng_b) for _ in range(5)]


def test_caption_options_a_record_lacks_are_skipped():
    only_negative = _record([], {"lungs": {report_rules.POSITIVE: [], report_rules.NEGATIVE: ["No nodule."]}})
    assert {report_rules.sample_caption(only_negative, np.random.default_rng(s)) for s in range(20)} == {"no nodule."}
    with pytest.raises(ValueError, match="'empty-1': no caption candidate"):
        report_rules.sample_caption(_record([], {}, volume_id="empty-1"), np.random.default_rng(0))


def test_osl_pairs():
    sections = {"lungs": {report_rules.POSITIVE: [f"Nodule {i} is present." for i in range(6)], report_rules.NEGATIVE: []},
                "heart": {report_rules.POSITIVE: [], report_rules.NEGATIVE: ["The heart is normal."]},
                "pleura": {report_rules.POSITIVE: [], report_rules.NEGATIVE: []}}
    pool = {"heart": ["The heart is enlarged.", "There is a pericardial effusion."],
            "pleura": ["Pleural effusion is present.", "There is a pneumothorax.", "Pleural thickening is seen."],
            "bones": ["There is a rib fracture."],  # a section this patient does not list: never used
            "lungs": ["Emphysema is present."]}  # a section with own positives: never a false pair
    for seed in range(20):
        pairs = report_rules.build_osl_pairs(sections, np.random.default_rng(seed), pool, k=8)
        assert len(pairs) == 8
        true = [p for p in pairs if p[2] == 1]
        false = [p for p in pairs if p[2] == 0]
        assert len(true) == 4 and len(false) == 4 and [p[2] for p in pairs] == [1] * 4 + [0] * 4
        assert {p[0] for p in true} <= set(sections["lungs"][report_rules.POSITIVE])
        assert {p[0] for p in false} <= set(pool["heart"] + pool["pleura"])
        assert len({p[0] for p in false}) == 4
        assert all(neg == report_rules.negate(pos) for pos, neg, _ in pairs)
    few = report_rules.build_osl_pairs({"lungs": {report_rules.POSITIVE: ["Emphysema is present."], report_rules.NEGATIVE: []}},
                                  np.random.default_rng(0), {}, k=8)
    assert few == [("Emphysema is present.", "No emphysema is present.", 1)] + [("", "", -1)] * 7


def test_positive_pool_is_deduplicated_per_section():
    a = _record([], {"lungs": {report_rules.POSITIVE: ["A.", "B."], report_rules.NEGATIVE: ["C."]}})
    b = _record([], {"lungs": {report_rules.POSITIVE: ["B.", "D."], report_rules.NEGATIVE: []},
                     "heart": {report_rules.POSITIVE: [], report_rules.NEGATIVE: ["E."]}})
    assert report_rules.build_positive_pool([a, b]) == {"lungs": ["A.", "B.", "D."]}


# --- pseudo-reports ---------------------------------------------------------------------------------------------

def test_pseudo_report_of_a_hand_made_label_map():
    """LPS grid: x grows toward patient Left, z toward Superior. Liver on the right, spleen on the left, a lesion
    inside the liver, an absent kidney and an absent cyst label."""
    label = np.zeros((30, 40, 60), np.uint8)
    label[15:25, 10:30, 5:25] = 1          # liver: patient right (small x), middle-upper z
    label[18:22, 15:20, 10:15] = 3         # lesion inside the liver
    label[2:8, 10:20, 40:55] = 2           # spleen: patient left, lower third
    names = {0: "background", 1: "liver", 2: "spleen", 3: "lesion", 4: "kidney_left", 5: "cyst"}
    report, labels = pseudo_reports.pseudo_report(label, (2.0, 1.0, 1.0), names, midline_x_mm=30.0)
    liver_ml = (10 * 20 * 20 - 4 * 5 * 5) * 2 / 1000
    assert report.sections["abdomen"][report_rules.POSITIVE] == [
        f"The liver is present on the right in the upper third of the scan ({liver_ml:.1f} ml).",
        "The spleen is present on the left in the lower third of the scan (1.8 ml)."]
    assert report.sections["abdomen"][report_rules.NEGATIVE] == ["The left kidney is not in the field of view."]
    assert report.sections["lesions"] == {
        report_rules.POSITIVE: ["There is a 0.2 ml lesion in the liver, on the right in the upper third of the scan."],
        report_rules.NEGATIVE: ["No cyst is seen."]}
    assert "left kidney" not in report.findings  # absent structures are not described
    assert labels == {"liver": 1, "spleen": 1, "left kidney": 0, "lesion": 1, "cyst": 0}


def test_pseudo_report_of_a_synthetic_phantom():
    phantom = synthetic.make_phantom(0, 1, shape=(32, 64, 64))
    report, labels = pseudo_reports.pseudo_report(phantom.label, phantom.spacing, synthetic.LABELS)
    assert labels["liver"] == 1 and labels["lesion"] == 1
    lesions = report.sections["lesions"][report_rules.POSITIVE]
    assert lesions and all(re.fullmatch(r"There is a [0-9.]+ ml lesion in the (liver|spleen|left kidney|right "
                                        r"kidney|left lung|right lung), on the (left|right|midline).*\.", s)
                           for s in lesions), lesions
    assert "The ribs are present" in report.findings  # plural names take "are"


# --- the builder CLI --------------------------------------------------------------------------------------------

def _tiny_volume(dataset: pathlib.Path, volume_id: str, split: str | None = None) -> None:
    path = f"volumes/{volume_id}.zarr"
    volume_store.write_volume(dataset / path, np.full((4, 8, 8), -1000, np.int16), {})
    entry = {"id": volume_id, "path": path, "label_path": None, "shape": [4, 8, 8], "spacing": [2.0, 2.0, 2.0],
             "origin_lps": [0.0, 0.0, 0.0], "subject": volume_id, "source": f"/raw/{volume_id}.nii.gz",
             "source_sha256": "0" * 64}
    volume_store.append_manifest(dataset, {**entry, **({"split": split} if split else {})})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ct_dir, ctrate_rows) -> pathlib.Path:
    """ts_example_ct_sm with its TotalSegmentator label (ingested at 3 mm), vtk_headsq without label or report,
    and tiny volumes named after CT-RATE reports: two reconstructions of train_17051_a, train_10602_a, and one
    whose report row is empty."""
    raw = tmp_path_factory.mktemp("raw")
    for name in ("ts_example_ct_sm.nii.gz", "ts_example_ct_sm_label.nii.gz", "vtk_headsq.nii.gz"):
        shutil.copy(ct_dir / name, raw / name)
    root = tmp_path_factory.mktemp("dataset")
    assert ingest.main(["--input", str(raw), "--output", str(root), "--spacing", "3,3,3"]) == 0
    for volume_id in ("train_17051_a_1", "train_17051_a_2", "train_10602_a", "empty_one"):
        _tiny_volume(root, volume_id, split="train" if volume_id == "train_10602_a" else None)
    return root


@pytest.fixture(scope="module")
def reports_csv(tmp_path_factory, ctrate_csv, ctrate_rows) -> pathlib.Path:
    """Real rows for the two scans, a duplicate, an empty report, a malformed row and a report with no volume."""
    header = list(ctrate_rows[0])
    by_name = {row["NameinCTRATE"]: row for row in ctrate_rows}
    rows = [by_name["train_17051_a"], by_name["train_10602_a"], dict(by_name["train_10602_a"]),
            dict(ctrate_rows[1], NameinCTRATE="empty_one", report_text="  "), ctrate_rows[2]]
    path = tmp_path_factory.mktemp("csv") / "reports.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        writer.writerows(rows)
        f.write("train_9,only three,fields\n")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, dataset, reports_csv, ct_dir):
    out = tmp_path_factory.mktemp("out") / "reports"
    code = build.main(["--reports", str(reports_csv), "--dataset", str(dataset), "--output", str(out),
                       "--id-column", "NameinCTRATE", "--label-names", str(ct_dir / "ts_total_classes.csv")])
    return code, out


def _records(out: pathlib.Path) -> dict[str, dict]:
    source = report_records.open_report_source(out)
    decoded = [report_records.decode_report(source[i]) for i in range(len(source))]
    return {r["volume_id"]: r for r in decoded}


def test_builder_joins_reports_and_reports_bad_rows(built, ctrate_rows):
    code, out = built
    assert code == build.EXIT_SKIPPED  # rows and a volume were skipped
    index = report_records.read_report_index(out)
    assert index["counts"] == {"report": 3, "pseudo": 1}
    assert [v["volume_id"] for v in index["volumes"]] == ["ts_example_ct_sm", "train_17051_a_1", "train_17051_a_2",
                                                          "train_10602_a"]
    reasons = {s["report_id"] or "?": s["reason"] for s in index["skipped_rows"]}
    assert "duplicate report for volume train_10602_a" in reasons["train_10602_a"]
    assert "empty report" in reasons["empty_one"]
    assert "malformed CSV row" in reasons["?"]
    assert {s["volume_id"]: s["reason"] for s in index["skipped_volumes"]} == {
        "vtk_headsq": "no report and no label map", "empty_one": "no report and no label map"}
    assert index["unmatched_report_rows"] == 1  # the 'not in CT-RATE' row
    records = _records(out)
    by_name = {row["NameinCTRATE"]: row for row in ctrate_rows}
    first, second = records["train_17051_a_1"], records["train_17051_a_2"]
    assert first["source"] == "report" and first["report_id"] == "train_17051_a"
    assert first["findings"] == second["findings"] == report_rules.parse_report(by_name["train_17051_a"]["report_text"]
                                                                           ).findings
    assert first["structured"] == "derived"
    # CT-RATE's 18 binary columns become finding labels; the split comes from the manifest, else the CSV.
    assert len(first["finding_labels"]) == LABEL_COLUMNS
    assert first["finding_labels"]["Lung nodule"] == int(by_name["train_17051_a"]["Lung nodule"])
    assert first["split"] == by_name["train_17051_a"]["split"] and records["train_10602_a"]["split"] == "train"
    pools = json.loads((out / report_records.POOL_FILE).read_text())
    assert set(pools) == {report_records.split_key(r["split"]) for r in records.values()}
    assert report_records.read_positive_pool(out, "train") == report_rules.build_positive_pool(
        [r for r in records.values() if r["split"] == "train"])


def test_pseudo_report_of_real_ct_names_its_structures(built):
    _, out = built
    record = _records(out)["ts_example_ct_sm"]
    assert record["source"] == "pseudo" and record["structured"] == "label map"
    findings = record["findings"]
    for structure in ("liver", "spleen", "right kidney", "left kidney", "stomach", "pancreas", "aorta"):
        assert f"The {structure} is present" in findings, structure
    # Orientation end to end (RAS source -> LPS store): the liver on the patient's right, the spleen on the left.
    assert re.search(r"The liver is present on the right in the \w+ third of the scan \(\d+\.\d ml\)", findings)
    assert "The spleen is present on the left" in findings
    assert "brain" not in findings and record["finding_labels"]["brain"] == 0
    assert record["sections"]["head and neck"][report_rules.NEGATIVE]  # a section for OSL false pairs
    liver_ml = float(re.search(r"The liver is present [^(]*\(([\d.]+) ml\)", findings)[1])
    assert 500 < liver_ml < 2500


def test_builder_refuses_to_overwrite(built, dataset, tmp_path):
    _, out = built
    argv = ["--dataset", str(dataset), "--output", str(out)]
    assert build.main(argv) == build.EXIT_FATAL
    other = tmp_path / "not_reports"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    assert build.main(["--dataset", str(dataset), "--output", str(other), "--overwrite"]) == build.EXIT_FATAL
    assert (other / "keep.txt").read_text() == "user data"


def test_builder_jsonl_with_structured_findings(dataset, tmp_path):
    lines = [json.dumps({"volume_id": "train_10602_a.nii.gz", "report": "",
                         "short_captions": {"lungs": {"positive_findings": ["Emphysema is present."],
                                                      "negative_findings": []}}}),
             "{broken json",
             json.dumps({"volume_id": "train_17051_a", "report": "The heart is enlarged.",
                         "short_captions": {"lungs": "not an object"}})]
    path = tmp_path / "reports.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert build.main(["--reports", str(path), "--dataset", str(dataset), "--output", str(out),
                       "--label-columns", "none"]) == build.EXIT_SKIPPED
    index = report_records.read_report_index(out)
    reasons = sorted(s["reason"] for s in index["skipped_rows"])
    assert reasons[0].startswith("not valid JSON") and "expected an object" in reasons[1]
    record = _records(out)["train_10602_a"]
    assert record["structured"] == "given" and record["findings"] == ""
    assert record["sections"] == {"lungs": {report_rules.POSITIVE: ["Emphysema is present."], report_rules.NEGATIVE: []}}
    # ts_example_ct_sm without --label-names: its structures are "label N".
    assert "The label 5 is present" in _records(out)["ts_example_ct_sm"]["findings"]


def test_phantom_labels_json_is_found_beside_the_label_map(tmp_path):
    raw = tmp_path / "phantoms"
    synthetic.write_phantoms(raw, count=1, shape=(24, 48, 48))
    dataset = tmp_path / "dataset"
    assert ingest.main(["--input", str(raw), "--output", str(dataset), "--spacing", "native"]) == 0
    out = tmp_path / "out"
    assert build.main(["--dataset", str(dataset), "--output", str(out)]) == build.EXIT_OK
    record = next(iter(_records(out).values()))
    assert "The liver is present on the right" in record["findings"]
    assert record["finding_labels"]["lesion"] in (0, 1)


def test_stage3_text_example(built, tmp_path):
    _, out = built
    assert train.main(["--corpus", str(out), "--vocab-size", "400", "--output", str(tmp_path)]) == 0
    tokenizer = load_tokenizer(tmp_path)
    records = _records(out)
    record = max((records[v] for v in ("train_17051_a_1", "train_10602_a")),
                 key=lambda r: sum(len(s[report_rules.POSITIVE]) for s in r["sections"].values()))
    positives = sum(len(s[report_rules.POSITIVE]) for s in record["sections"].values())
    assert positives > 0
    pool = report_records.read_positive_pool(out, record["split"])
    example = report_rules.stage3_text_example(record, np.random.default_rng(3), tokenizer, caption_len=96, osl_len=24,
                                          osl_pairs=8, positive_pool=pool)
    assert example["caption_tokens"].shape == example["caption_mask"].shape == (96,)
    assert example["caption_tokens"].dtype == np.int32 and example["caption_mask"].dtype == bool
    for key in ("osl_pos_tokens", "osl_neg_tokens", "osl_pos_mask", "osl_neg_mask"):
        assert example[key].shape == (8, 24), key
    labels = example["osl_labels"]
    assert labels.dtype == np.int32 and labels.shape == (8,) and set(labels) <= {-1, 0, 1}
    assert (labels == 1).sum() == min(4, positives)
    # Left padding: every row ends with EOS and has valid tokens only at its end.
    for tokens, mask in ((example["caption_tokens"][None], example["caption_mask"][None]),
                         (example["osl_pos_tokens"], example["osl_pos_mask"])):
        assert np.all(tokens[:, -1] == 3) and np.all(mask[:, -1])
        assert np.all(np.diff(mask.astype(int), axis=1) >= 0)
        assert np.all(tokens[~mask] == tokenizer.pad_id)
    same = report_rules.stage3_text_example(record, np.random.default_rng(3), tokenizer, caption_len=96, osl_len=24,
                                       osl_pairs=8, positive_pool=pool)
    assert all(np.array_equal(example[k], same[k]) for k in example)
