"""Train the stage-3 sentencepiece tokenizer on a report corpus.

    python -m data_prep.tokenizer --corpus REPORTS_DIR --vocab-size N [--output DIR]

REPORTS_DIR is the output of `python -m data_prep.reports`. The training text is what the text tower will see,
lower-cased like the captions (docs/recipe.md §8): every sentence of every Findings section, the structured positive
and negative findings and the negations of the positives (the OSL sentences). The model is written to
DIR/tokenizer.model (default DIR = REPORTS_DIR, so the tokenizer is stored with the dataset) with fixed ids
pad 0, unk 1, bos 2, eos 3, and is read back by `flexict_jax.data.tokenizer.load_tokenizer`.

Small corpora cannot fill a large vocabulary; the vocabulary is then smaller than --vocab-size instead of the
run failing (sentencepiece `hard_vocab_limit=False`, docs/jax_notes.md §B4.8), and the size reached is printed.
Exit status: 0 written, 1 error (unreadable corpus, no text, existing model without --overwrite).
"""
from __future__ import annotations

import argparse
import io
import pathlib
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import sentencepiece as spm

from data_prep import outputs
from flexict_jax.data import report_records, report_rules
from flexict_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SP_MODEL_FILE, UNK_ID, SentencePieceTokenizer
from flexict_jax.progress import Progress


def corpus_sentences(reports_dir: pathlib.Path) -> Iterator[str]:
    """The lower-cased training sentences of a reports dir, record by record."""
    source = report_records.open_report_source(reports_dir)
    progress = Progress(len(source), "reading reports")
    for i in range(len(source)):
        record = report_records.decode_report(source[i])
        for _, text in record["findings_sections"]:
            yield from (report_rules.model_text(s) for s in report_rules.split_sentences(text))
        for section in record["sections"].values():
            for sentence in section[report_rules.POSITIVE]:
                yield report_rules.model_text(sentence)
                yield report_rules.model_text(report_rules.negate(sentence))
            yield from (report_rules.model_text(s) for s in section[report_rules.NEGATIVE])
        progress.advance(1)
    progress.close()


def train_tokenizer(corpus: pathlib.Path, output: pathlib.Path, vocab_size: int, model_type: str = "unigram",
                    byte_fallback: bool = False, max_sentences: int = 2_000_000, overwrite: bool = False
                    ) -> SentencePieceTokenizer:
    """Trains on the corpus and writes output/tokenizer.model atomically; returns the loaded tokenizer."""
    if vocab_size < 8:
        raise ValueError(f"--vocab-size {vocab_size}: need at least 8 (4 special pieces plus text)")
    target = output / SP_MODEL_FILE
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: exists; pass --overwrite to replace it")
    # Reservoir sample (fixed seed, so a corpus gives the same model every run): bounded memory on large corpora.
    rng = np.random.default_rng(0)
    sentences: list[str] = []
    for seen, sentence in enumerate(s for s in corpus_sentences(corpus) if s):
        if len(sentences) < max_sentences:
            sentences.append(sentence)
        elif (slot := rng.integers(seen + 1)) < max_sentences:
            sentences[slot] = sentence
    if not sentences:
        raise ValueError(f"{corpus}: the reports hold no text to train on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        hard_vocab_limit=False,  # tiny corpora: a smaller vocabulary instead of an error (docs/jax_notes.md §B4.8)
        character_coverage=1.0,  # report text has a small alphabet; keep every character it uses
        byte_fallback=byte_fallback, minloglevel=2)
    tokenizer = SentencePieceTokenizer(model.getvalue())
    output.mkdir(parents=True, exist_ok=True)
    outputs.write_atomically(target, lambda tmp: tmp.write_bytes(model.getvalue()))
    return tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, type=pathlib.Path, metavar="REPORTS_DIR",
                        help="reports dir written by `python -m data_prep.reports`")
    parser.add_argument("--vocab-size", required=True, type=int, metavar="N", help="target vocabulary size")
    parser.add_argument("--output", type=pathlib.Path, metavar="DIR",
                        help=f"where {SP_MODEL_FILE} goes (default: the corpus dir)")
    parser.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram",
                        help="sentencepiece algorithm (default %(default)s)")
    parser.add_argument("--byte-fallback", action="store_true",
                        help="spell characters unseen in training as bytes instead of <unk> (adds 256 pieces)")
    parser.add_argument("--max-sentences", type=int, default=2_000_000,
                        help="at most this many sentences, sampled, train the model (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {SP_MODEL_FILE}")
    args = parser.parse_args(argv)
    output = args.output or args.corpus
    try:
        tokenizer = train_tokenizer(args.corpus, output, args.vocab_size, args.model_type, args.byte_fallback,
                                    args.max_sentences, args.overwrite)
    except (OSError, ValueError, RuntimeError) as e:  # sentencepiece reports bad settings as RuntimeError
        print(f"tokenizer: error: {e}", file=sys.stderr)
        return 1
    print(f"tokenizer: {tokenizer.vocab_size} pieces (asked for {args.vocab_size}) -> {output / SP_MODEL_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
