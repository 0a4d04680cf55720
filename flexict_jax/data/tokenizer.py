"""Text tokenizers for the stage-3 text towers: left padding, attention mask, truncation, static lengths.

Two backends behind one interface:

- `SentencePieceTokenizer`: a model trained on the report corpus by `python -m data_prep.tokenizer` (stored as
  REPORTS_DIR/tokenizer.model, ids pad 0, unk 1, bos 2, eos 3), for the from-scratch text transformer.
- `HuggingFaceTokenizer`: a local Hugging Face folder's `tokenizer.json` (e.g. Qwen3-Embedding) through the
  `tokenizers` package, imported only when used; nothing is downloaded.

A sequence is `prefix + text ids + suffix`, where the suffix holds the tokens the last-token pooling reads
(EOS for our sentencepiece models; whatever the Hugging Face post-processor appends). Truncation drops text ids
from the end and keeps the prefix and suffix, and sequences are left-padded (docs/recipe.md §8: last-token pooling with
left padding), so the last position of every row is its pooled token. Lengths are static so that the jitted
text tower compiles once per length.
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

SP_MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
# Fixed ids of the sentencepiece models trained here (docs/jax_notes.md §B4.8).
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """Common encoding logic; a backend provides `text_ids`, `decode`, `normalize` and the attributes below."""

    pad_id: int
    prefix: tuple[int, ...]  # special ids before the text
    suffix: tuple[int, ...]  # special ids after the text
    vocab_size: int

    def text_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special and padding tokens left out."""
        raise NotImplementedError

    def normalize(self, text: str) -> str:
        """`text` as the tokenizer normalises it, i.e. what `decode(encode(text))` gives back."""
        raise NotImplementedError

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """prefix + ids of `text` + suffix, the text ids cut from the end to fit `max_length`."""
        ids = self.text_ids(text)
        if max_length is not None:
            room = max_length - len(self.prefix) - len(self.suffix)
            if room < 0:
                raise ValueError(f"max_length {max_length} is shorter than the {len(self.prefix) + len(self.suffix)} "
                                 f"special tokens every sequence carries")
            ids = ids[:room]
        return [*self.prefix, *ids, *self.suffix]

    def encode_batch(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 [N, max_length], mask bool [N, max_length]), left-padded with `pad_id`."""
        tokens = np.full((len(texts), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_length), bool)
        for row, text in enumerate(texts):
            ids = self.encode(text, max_length)
            if ids:
                tokens[row, max_length - len(ids):] = ids
                mask[row, max_length - len(ids):] = True
        return tokens, mask


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; EOS ends every sequence. Picklable (Grain workers)."""

    def __init__(self, model: str | os.PathLike | bytes):
        import sentencepiece as spm

        where = "serialized model" if isinstance(model, bytes) else os.fspath(model)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model) if isinstance(model, bytes) \
                else spm.SentencePieceProcessor(model_file=os.fspath(model))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{where}: not a readable sentencepiece model ({e})") from e
        if self._sp.pad_id() < 0 or self._sp.eos_id() < 0:
            raise ValueError(f"{where}: the model has no pad or eos piece; train it with "
                             f"`python -m data_prep.tokenizer`")
        self.pad_id = self._sp.pad_id()
        self.prefix, self.suffix = (), (self._sp.eos_id(),)
        self.vocab_size = self._sp.vocab_size()

    def text_ids(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])  # control pieces (pad/bos/eos) decode to nothing

    def normalize(self, text: str) -> str:
        return self._sp.normalize(text).replace("\u2581", " ").strip()


class HuggingFaceTokenizer(Tokenizer):
    """A local Hugging Face tokenizer folder (tokenizer.json, optional tokenizer_config.json)."""

    def __init__(self, folder: str | os.PathLike):
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError("a Hugging Face tokenizer.json needs the `tokenizers` package "
                              "(pip install tokenizers)") from e
        folder = pathlib.Path(folder)
        path = folder / HF_TOKENIZER_FILE
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception type for missing or malformed files
            raise ValueError(f"{path}: not a readable Hugging Face tokenizer ({e})") from e
        self._tok.no_truncation()  # truncation and padding are ours (static shapes, left padding)
        self._tok.no_padding()
        self.pad_id = self._pad_id(folder)
        self.prefix, self.suffix = self._special_ids(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _pad_id(self, folder: pathlib.Path) -> int:
        config_path = folder / HF_CONFIG_FILE
        pad = None
        if config_path.is_file():
            try:
                pad = json.loads(config_path.read_text(encoding="utf-8")).get("pad_token")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{config_path}: not a JSON object ({e})") from e
            pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad is None:
            raise ValueError(f"{config_path}: no 'pad_token'; left padding needs one")
        pad_id = self._tok.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"{config_path}: pad_token {pad!r} is not in the vocabulary")
        return pad_id

    def _special_ids(self, path: pathlib.Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ids the post-processor puts before and after a text, found by encoding a probe both ways."""
        probe = "report"
        plain = self._tok.encode(probe, add_special_tokens=False).ids
        full = self._tok.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return tuple(full[:start]), tuple(full[start + len(plain):])
        raise ValueError(f"{path}: the post-processor changes the text ids, cannot tell its special tokens apart")

    def text_ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def normalize(self, text: str) -> str:
        normalizer = self._tok.normalizer
        return normalizer.normalize_str(text) if normalizer is not None else text


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A sentencepiece `.model` file, or a folder holding `tokenizer.model` (ours) or `tokenizer.json` (HF)."""
    path = pathlib.Path(path)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.is_dir():
        if (path / SP_MODEL_FILE).is_file():
            return SentencePieceTokenizer(path / SP_MODEL_FILE)
        if (path / HF_TOKENIZER_FILE).is_file():
            return HuggingFaceTokenizer(path)
    raise FileNotFoundError(f"{path}: no tokenizer (expected a .model file, or a folder with {SP_MODEL_FILE} "
                            f"from `python -m data_prep.tokenizer` or a Hugging Face {HF_TOKENIZER_FILE})")
