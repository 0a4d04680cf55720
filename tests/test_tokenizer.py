"""Stage-3 tokenizers: `python -m data_prep.tokenizer` on real CT-RATE reports, round trips, left padding and
truncation, pickling, and the Hugging Face `tokenizer.json` backend."""
from __future__ import annotations

import json
import pathlib
import pickle

import numpy as np
import pytest

from data_prep import reports as build
from data_prep import tokenizer as train
from flexict_jax.data import report_rules, volume_store
from flexict_jax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)

TRAIN_REPORTS = 80


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data, ctrate_rows) -> pathlib.Path:
    """A reports dir built from the first CT-RATE reports, joined to tiny volumes named after them."""
    dataset = tmp_path_factory.mktemp("dataset")
    for row in ctrate_rows[:TRAIN_REPORTS]:
        volume_id = row["AccessionNo"]
        path = f"volumes/{volume_id}.zarr"
        volume_store.write_volume(dataset / path, np.zeros((2, 4, 4), np.int16), {})
        volume_store.append_manifest(dataset, {
            "id": volume_id, "path": path, "label_path": None, "shape": [2, 4, 4], "spacing": [1.0, 1.0, 1.0],
            "origin_lps": [0.0, 0.0, 0.0], "subject": volume_id, "source": "test", "source_sha256": "0" * 64})
    out = tmp_path_factory.mktemp("corpus") / "reports"
    assert build.main(["--reports", str(shared_data / "reports" / "ctrate_reports.csv"), "--dataset", str(dataset),
                       "--output", str(out), "--id-column", "AccessionNo"]) == build.EXIT_OK
    return out


@pytest.fixture(scope="module")
def tokenizer(corpus) -> SentencePieceTokenizer:
    assert train.main(["--corpus", str(corpus), "--vocab-size", "600"]) == 0
    return load_tokenizer(corpus)


def _sentences(rows: list[dict]) -> list[str]:
    return [report_rules.model_text(s) for row in rows for _, text in report_rules.parse_report(row["report_text"]
                                                                                       ).findings_sections
            for s in report_rules.split_sentences(text)]


def test_model_is_stored_with_the_corpus_with_fixed_ids(corpus, tokenizer):
    assert (corpus / "tokenizer.model").is_file()
    sp = tokenizer._sp
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert 100 < tokenizer.vocab_size <= 600
    assert tokenizer.prefix == () and tokenizer.suffix == (EOS_ID,)


def test_round_trip_on_the_training_reports(tokenizer, ctrate_rows):
    sentences = _sentences(ctrate_rows[:TRAIN_REPORTS])
    assert len(sentences) > 1000
    for sentence in sentences:
        ids = tokenizer.encode(sentence)
        assert UNK_ID not in ids, sentence
        assert tokenizer.decode(ids) == tokenizer.normalize(sentence), sentence
        if sentence.isascii():
            assert tokenizer.normalize(sentence) == " ".join(sentence.split())
    assert tokenizer.normalize("  the   heart\tis enlarged. ") == "the heart is enlarged."


def test_byte_fallback_round_trips_unseen_reports(corpus, ctrate_rows, tmp_path):
    assert train.main(["--corpus", str(corpus), "--vocab-size", "800", "--byte-fallback",
                       "--output", str(tmp_path)]) == 0
    tokenizer = load_tokenizer(tmp_path / "tokenizer.model")
    for sentence in _sentences(ctrate_rows[TRAIN_REPORTS:]) + ["unseen µ ± ğ 5×3 mm"]:
        assert tokenizer.decode(tokenizer.encode(sentence)) == tokenizer.normalize(sentence), sentence


def test_encode_batch_left_pads_and_truncates_keeping_eos(tokenizer):
    long = "there is a 5 mm nodule in the right lower lobe and the heart is enlarged."
    full = tokenizer.encode(long)
    assert len(full) > 12
    tokens, mask = tokenizer.encode_batch(["", "the heart.", long], 12)
    assert tokens.shape == mask.shape == (3, 12) and tokens.dtype == np.int32 and mask.dtype == bool
    assert np.all(tokens[:, -1] == EOS_ID) and np.all(mask[:, -1])
    assert mask[0].sum() == 1  # an empty text is just EOS: never an all-padding row
    short = tokenizer.encode("the heart.")
    assert list(tokens[1, 12 - len(short):]) == short and not mask[1, :12 - len(short)].any()
    assert np.all(tokens[~mask] == PAD_ID)
    assert list(tokens[2]) == full[:11] + [EOS_ID] and mask[2].all()
    with pytest.raises(ValueError, match="shorter than the 1 special tokens"):
        tokenizer.encode_batch(["x"], 0)


def test_pickles_for_grain_workers(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    text = "no pleural effusion."
    assert clone.encode(text) == tokenizer.encode(text) and clone.pad_id == tokenizer.pad_id


def test_cli_errors(corpus, tmp_path, capsys):
    assert train.main(["--corpus", str(corpus), "--vocab-size", "600"]) == 1  # model exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert train.main(["--corpus", str(tmp_path), "--vocab-size", "600", "--output", str(tmp_path)]) == 1
    assert "index.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable sentencepiece model"):
        load_tokenizer(tmp_path)


def _hf_folder(folder: pathlib.Path, pad_token: str | None) -> pathlib.Path:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "the": 4, "heart": 5, "is": 6, "enlarged": 7, ".": 8}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A </s>",
                                                                  special_tokens=[("<s>", 2), ("</s>", 3)])
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.enable_truncation(2)  # saved settings must not leak into our encoding
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token} if pad_token else {}))
    return folder


def test_hugging_face_backend(tmp_path):
    tokenizer = load_tokenizer(_hf_folder(tmp_path / "hf", {"content": "<pad>"}))
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    assert (tokenizer.pad_id, tokenizer.prefix, tokenizer.suffix) == (0, (2,), (3,))
    assert tokenizer.encode("The heart is enlarged .") == [2, 4, 5, 6, 7, 8, 3]
    tokens, mask = tokenizer.encode_batch(["The heart is enlarged .", "heart ."], 5)
    assert tokens.tolist() == [[2, 4, 5, 6, 3], [0, 2, 5, 8, 3]]
    assert mask.tolist() == [[True] * 5, [False] + [True] * 4]
    assert tokenizer.decode(tokens[1]) == "heart ."
    assert tokenizer.normalize("The HEART") == "the heart"
    assert pickle.loads(pickle.dumps(tokenizer)).encode("heart") == [2, 5, 3]


def test_hugging_face_backend_needs_a_pad_token(tmp_path):
    with pytest.raises(ValueError, match="no 'pad_token'"):
        HuggingFaceTokenizer(_hf_folder(tmp_path / "hf", None))
