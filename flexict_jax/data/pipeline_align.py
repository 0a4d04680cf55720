"""Stage-3 (alignment) Grain input pipeline: report records + their volumes -> image views and text arrays.

`config.data.dir` is a reports dir (`python -m data_prep.reports`); its index.json names the ingested dataset
whose volumes the records describe (`data.dataset_dir` overrides it when the dataset has moved). One split of
the records (`data.split`; "" = records without a split) is the source. Per example (docs/recipe.md §8):

  image: the stage-3 views of `pipeline3d` (config `data` with `configs.stage3.STAGE3_IMAGE_VIEWS`): one centred global crop,
         local crops, RCC-3D iBOT masks per patch size;
  text:  `report_rules.stage3_text_example`: the CLIP caption (Findings / one positive / one negative finding) and K
         OSL pairs, tokenised and left-padded to the static lengths of config `text`.

The stream is `grain_common`'s: reshuffled every epoch, example i keyed by (seed, i) — the text draws use their
own generator from (seed, i) so the image views are those stage 2's transform gives — this host's rows of
every global batch, resumable iterator state.

The held-out evaluation set (`build_eval_dataset`) is one ordered pass over another split: the global crop and
the report text of each record, padded to whole global batches.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from flexict_jax.data import grain_common, report_records, report_rules
from flexict_jax.data.grain_common import config_value
from flexict_jax.data.pipeline3d import VolumeViewsTransform, volume_views_transform
from flexict_jax.data.tokenizer import Tokenizer, load_tokenizer
from flexict_jax.data.volume_source import VolumeSource
from flexict_jax.errors import ConfigError

TEXT_TOWERS = ("scratch", "qwen3")
# Entropy word that separates an example's text generator from its image generators (both keyed by (seed, i)).
_TEXT_STREAM = 1
TEXT_KEYS = ("caption_tokens", "caption_mask", "osl_pos_tokens", "osl_pos_mask", "osl_neg_tokens", "osl_neg_mask",
             "osl_labels")


def load_text_tokenizer(text: Mapping[str, Any], reports_dir: str | os.PathLike) -> Tokenizer:
    """The text tower's tokenizer: config text.tokenizer when set, else the Hugging Face folder of the Qwen3
    tower (text.hf_folder) or the sentencepiece model stored with the reports (`python -m data_prep.tokenizer`)."""
    tower = config_value(text, "tower", "text")
    if tower not in TEXT_TOWERS:
        raise ConfigError(f"config key text.tower must be one of {TEXT_TOWERS}, got {tower!r}")
    path = text.get("tokenizer") or (text.get("hf_folder") if tower == "qwen3" else reports_dir)
    if not path:
        raise ConfigError("config key text.hf_folder is not set: the qwen3 text tower needs a local Hugging Face "
                         "folder (config.json, *.safetensors, tokenizer.json)")
    return load_tokenizer(path)


def report_text(record: Mapping[str, Any]) -> str:
    """The whole report of a record as the text tower sees it: the Findings, else every structured finding
    (reports given only as structured findings have no Findings text). Evaluation retrieves this text."""
    text = record["findings"] or " ".join(
        s for section in record["sections"].values() for kind in (report_rules.POSITIVE, report_rules.NEGATIVE)
        for s in section[kind])
    return report_rules.model_text(text)


class ReportVolumes:
    """Random-access source over the records of one split: item i = {"record": dict, "volume": Volume}.

    Picklable (Grain workers): records are read from the ArrayRecord shards on access, volumes through a
    `VolumeSource` of the dataset the reports were built from.
    """

    def __init__(self, reports_dir: str | os.PathLike, split: str, hu_window: tuple[float, float],
                 dataset_dir: str | os.PathLike | None = None):
        index = report_records.read_report_index(reports_dir)
        self.reports_dir = os.fspath(reports_dir)
        self.split = split
        self._records = report_records.open_report_source(reports_dir)
        self.rows = [i for i, v in enumerate(index["volumes"]) if report_records.split_key(v["split"]) == split]
        if not self.rows:
            splits = sorted({report_records.split_key(v["split"]) for v in index["volumes"]})
            raise ValueError(f"{self.reports_dir}: no report record of split {split!r} (it has splits {splits}; "
                             f"'' = records without a split)")
        dataset_dir = dataset_dir or index.get("dataset")
        if not dataset_dir:
            raise ValueError(f"{self.reports_dir}/{report_records.INDEX_FILE} names no dataset; set config key "
                             f"data.dataset_dir")
        self.volumes = VolumeSource(dataset_dir, hu_window)
        manifest_row = {entry["id"]: row for row, entry in enumerate(self.volumes.entries)}
        ids = [index["volumes"][i]["volume_id"] for i in self.rows]
        missing = [volume_id for volume_id in ids if volume_id not in manifest_row]
        if missing:
            raise ValueError(f"{self.reports_dir}: {len(missing)} record(s) of split {split!r} describe volumes "
                             f"that are not in {dataset_dir}, e.g. {missing[0]!r}; rebuild the reports for this "
                             f"dataset or set data.dataset_dir")
        self.volume_rows = [manifest_row[volume_id] for volume_id in ids]

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, i: int) -> dict[str, Any]:
        return report_records.decode_report(self._records[self.rows[i]])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"record": self.record(i), "volume": self.volumes[self.volume_rows[i]]}

    def __repr__(self) -> str:
        return f"ReportVolumes({self.reports_dir!r}, split {self.split!r}, {len(self)} records)"


def _text_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, _TEXT_STREAM])


class AlignTransform(grain.transforms.MapWithIndex):
    """{"record", "volume"} + its global example index -> one stage-3 example (numpy only).

    Output: the `VolumeViewsTransform` arrays (global_crops [1, G, G, G, 1], local_crops, masks_p{p}, index,
    volume_row) and the `report_rules.stage3_text_example` arrays (caption_tokens/mask [Lc], osl_{pos,neg}_tokens/mask
    [K, Lo], osl_labels [K]).
    """

    def __init__(self, *, seed: int, views: VolumeViewsTransform, tokenizer: Tokenizer,
                 positive_pool: Mapping[str, Sequence[str]], caption_len: int, osl_len: int, osl_pairs: int):
        self.seed = seed
        self.views = views
        self.tokenizer = tokenizer
        self.positive_pool = positive_pool
        self.caption_len = caption_len
        self.osl_len = osl_len
        self.osl_pairs = osl_pairs

    def map_with_index(self, index: int, item: Mapping[str, Any]) -> dict[str, np.ndarray]:
        example = self.views.map_with_index(index, item["volume"])
        text = report_rules.stage3_text_example(item["record"], _text_rng(self.seed, index), self.tokenizer,
                                           self.caption_len, self.osl_len, self.osl_pairs,
                                           positive_pool=self.positive_pool)
        return {**example, **text}


def _text_lengths(text: Mapping[str, Any]) -> tuple[int, int, int]:
    lengths = tuple(grain_common.integer(config_value(text, key, "text"), f"text.{key}")
                    for key in ("caption_len", "osl_len", "osl_pairs"))
    if min(lengths) < 1:
        raise ConfigError(f"config keys text.caption_len, text.osl_len, text.osl_pairs must be positive, got {lengths}")
    return lengths


def build_reports3d_dataset(data: ml_collections.ConfigDict, text: ml_collections.ConfigDict, *, seed: int,
                        batch_size: int, patch_sizes: Sequence[int], process_index: int = 0,
                        process_count: int = 1, first_batch: int = 0) -> grain.IterDataset:
    """The infinite stage-3 stream of this process's batches (config `data` and `text`, docs/recipe.md §8).

    batch_size is the per-process batch (global // process_count). Each element is a dict of numpy arrays:
    global_crops float32 [b, 1, G, G, G, 1], local_crops float32 [b, n_local, L, L, L, 1], masks_p{p} bool
    [b, 1, (G//p)**3] for p in patch_sizes, index int64 [b], volume_row int64 [b], caption_tokens int32 /
    caption_mask bool [b, caption_len], osl_{pos,neg}_tokens int32 / osl_{pos,neg}_mask bool
    [b, osl_pairs, osl_len], osl_labels int32 [b, osl_pairs]. The stream starts at global batch `first_batch`.
    """
    grain_common.check_stream_args(seed, batch_size, process_index, process_count)
    caption_len, osl_len, osl_pairs = _text_lengths(text)
    reports_dir = config_value(data, "dir")
    split = str(config_value(data, "split"))
    views = volume_views_transform(data, seed=seed, patch_sizes=patch_sizes)
    source = ReportVolumes(reports_dir, split, views.hu_window, data.get("dataset_dir"))
    transform = AlignTransform(seed=seed, views=views, tokenizer=load_text_tokenizer(text, reports_dir),
                               positive_pool=report_records.read_positive_pool(reports_dir, split),
                               caption_len=caption_len, osl_len=osl_len, osl_pairs=osl_pairs)
    return grain_common.batched_stream(source, transform, data, seed=seed, batch_size=batch_size,
                                       process_index=process_index, process_count=process_count,
                                       first_batch=first_batch)


class EvalTransform(grain.transforms.Map):
    """Position i of the padded evaluation pass -> the global crop and the report tokens of record
    min(i, n - 1) (positions >= n are padding, dropped after embedding)."""

    def __init__(self, source: ReportVolumes, views: VolumeViewsTransform, tokenizer: Tokenizer, caption_len: int,
                 n_examples: int):
        self.source = source
        self.views = views
        self.tokenizer = tokenizer
        self.caption_len = caption_len
        self.n_examples = n_examples

    def map(self, position: int) -> dict[str, np.ndarray]:
        item = self.source[min(position, self.n_examples - 1)]
        # Stage-3 global crops are centred and unaugmented, so the example index does not change them.
        crops = self.views.map_with_index(position, item["volume"])["global_crops"]
        tokens, mask = self.tokenizer.encode_batch([report_text(item["record"])], self.caption_len)
        return {"global_crops": crops, "caption_tokens": tokens[0], "caption_mask": mask[0]}


def build_eval_dataset(data: ml_collections.ConfigDict, text: ml_collections.ConfigDict, *, split: str,
                       batch_size: int, patch_size: int, process_index: int = 0, process_count: int = 1,
                       max_examples: int | None = None) -> tuple[grain.IterDataset, list[dict[str, Any]]]:
    """One ordered pass over the first `max_examples` (None: all) records of `split`, and those records.

    batch_size is the per-process batch. The pass is padded to whole global batches by repeating the last
    record; elements: global_crops float32 [b, 1, G, G, G, 1], caption_tokens int32 / caption_mask bool
    [b, caption_len] (the whole report, `report_text`). Iterate it afresh per evaluation.
    """
    grain_common.check_stream_args(0, batch_size, process_index, process_count)
    caption_len, _, _ = _text_lengths(text)
    reports_dir = config_value(data, "dir")
    # One local crop: the evaluation reads only the global crop (a view config needs at least one local crop).
    eval_data = data.copy_and_resolve_references()
    eval_data.n_local_crops = 1
    views = volume_views_transform(eval_data, seed=0, patch_sizes=(patch_size,))
    source = ReportVolumes(reports_dir, split, views.hu_window, data.get("dataset_dir"))
    n = len(source) if max_examples is None else min(len(source), int(max_examples))
    if n < 1:
        raise ConfigError(f"config key eval.max_examples must be positive, got {max_examples}")
    global_batch = batch_size * process_count
    padded = -(-n // global_batch) * global_batch
    ds = grain.MapDataset.range(padded).map(
        EvalTransform(source, views, load_text_tokenizer(text, reports_dir), caption_len, n))
    ds = grain_common.HostBatchShard(ds, batch_size=batch_size, process_index=process_index,
                                     process_count=process_count).batch(batch_size)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(config_value(data, "read_threads")),
                                              prefetch_buffer_size=int(config_value(data, "prefetch_buffer_size"))))
    return ds, [source.record(i) for i in range(n)]
