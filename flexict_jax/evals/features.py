"""Dense probe data (host numpy): model inputs and per-patch-token organ labels of an ingested, labelled dataset.

An ingested dataset stores `labels/<id>.zarr` (uint8) beside `volumes/<id>.zarr` on the same grid when the
source had a `*_label.nii.gz` (data_prep.ingest). Tokens get the majority label of their voxels:
  * 2d: axial slices through the 2-D encoder, each padded with air to one common size (a multiple of the patch
    size) and z-scored on its own, as `embed.slices_2d` prepares slices (docs/recipe.md §9);
  * 3d: the volume z-scored as a whole (`normalize_hu`), padded with its minimum and tiled into cubes of `crop`
    voxels through the 3-D encoder.
The dataset is used at the spacing it was ingested at (ingest at 1.5 mm for 2-D and 2 mm for 3-D checkpoints to
match their training, docs/recipe.md §5, §7). Tokens in padding, with the background label (unless asked for), or whose
majority covers less than `min_purity` of their voxels are left out (label -1).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flexict_jax.data import volume_store
from flexict_jax.data.intensity import normalize_hu
from flexict_jax.embed import Preprocessing, centred_pad, slices_2d

KINDS = ("2d", "3d")
OUTSIDE = -1  # label of padding voxels and of tokens left out


class ProbeDataError(ValueError):
    """A dataset or label file the probe cannot use; the message names it and the reason."""


@dataclasses.dataclass(frozen=True)
class OrganInputs:
    """Model inputs and the label of every patch token they produce."""
    kind: str
    patch_size: int
    inputs: np.ndarray  # [N, (D,) H, W] float32 model inputs (slices or cubes)
    token_labels: np.ndarray  # [N, P] int64 majority label per token, OUTSIDE = not used
    token_z_mm: np.ndarray  # [N, P] z of each token's centre within its volume (mm), for slab splits
    volume_index: np.ndarray  # [N] index into `volumes`
    volumes: list[dict]  # the manifest entries used
    spacing: tuple[float, float, float]  # of the first volume (z, y, x) mm, for the report

    def subjects(self) -> np.ndarray:
        """Subject id of every input."""
        return np.asarray([self.volumes[i]["subject"] for i in self.volume_index])


def labelled_entries(dataset: str | pathlib.Path) -> list[dict]:
    """The manifest entries with a label map; a clear error when there are none."""
    dataset = pathlib.Path(dataset)
    entries = volume_store.read_manifest(dataset)
    labelled = [e for e in entries if e.get("label_path")]
    if not labelled:
        raise ProbeDataError(f"{dataset}: none of its {len(entries)} volume(s) has a label map; the organ probe "
                             f"needs a dataset ingested from images with *_label.nii.gz / *_seg.nii.gz beside them")
    return labelled


def read_labelled_volume(dataset: str | pathlib.Path, entry: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(HU float32, labels uint8) of one volume, both (z, y, x); refuses label maps on another grid."""
    dataset = pathlib.Path(dataset)
    image = volume_store.open_volume(dataset / entry["path"])
    labels = volume_store.open_volume(dataset / entry["label_path"])
    if tuple(labels.shape) != tuple(image.shape):
        raise ProbeDataError(f"{dataset / entry['label_path']}: label map grid {tuple(labels.shape)} differs from "
                             f"its volume's {tuple(image.shape)} ({dataset / entry['path']})")
    image_attrs, label_attrs = volume_store.read_attributes(dataset / entry["path"]), \
        volume_store.read_attributes(dataset / entry["label_path"])
    for key in ("spacing", "origin_lps"):
        if key in image_attrs and key in label_attrs and not np.allclose(image_attrs[key], label_attrs[key]):
            raise ProbeDataError(f"{dataset / entry['label_path']}: label map {key} {label_attrs[key]} differs "
                                 f"from its volume's {image_attrs[key]}")
    return image.read().result().astype(np.float32), labels.read().result()


def class_names(dataset: str | pathlib.Path, entries: Sequence[Mapping[str, Any]], csv: str | None,
                present: Sequence[int] = ()) -> dict[int, str]:
    """Label value -> name from `csv` (e.g. ts_total_classes.csv), else from labels.json beside the source label
    maps (the phantoms), else the values themselves. Every label value in `present` must have a name in a CSV."""
    from flexict_jax.data.pseudo_reports import read_label_names

    if csv is not None:
        try:
            names = read_label_names(pathlib.Path(csv))
        except ValueError as e:
            raise ProbeDataError(str(e)) from e
        unknown = sorted(set(int(v) for v in present) - set(names))
        if unknown:
            raise ProbeDataError(f"{csv}: no name for label value(s) {unknown[:10]} of {dataset}; is it the class "
                                 f"list of these label maps?")
        return names
    for entry in entries:
        source = entry.get("label_source")
        beside = pathlib.Path(source).parent / "labels.json" if source else None
        if beside is not None and beside.is_file():
            return {int(k): str(v) for k, v in json.loads(beside.read_text()).items()}
    return {int(v): str(int(v)) for v in present}


def patch_majority(labels: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(majority label, its fraction) per patch token of label grids [N, (D,) H, W] (row-major token order, the
    backbone's); OUTSIDE voxels count as a label of their own."""
    n, spatial = labels.shape[0], labels.shape[1:]
    grid = [s // patch_size for s in spatial]
    shape = [n] + [v for g in grid for v in (g, patch_size)]
    blocks = labels.reshape(shape)
    dims = len(spatial)
    order = [0] + [1 + 2 * i for i in range(dims)] + [2 + 2 * i for i in range(dims)]
    blocks = blocks.transpose(order).reshape(n * int(np.prod(grid)), patch_size ** dims).astype(np.int64) + 1
    n_values = int(blocks.max()) + 1
    counts = np.zeros((len(blocks), n_values), np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(blocks)), blocks.shape[1]), blocks.ravel()), 1)
    majority = counts.argmax(axis=1)
    purity = counts.max(axis=1) / blocks.shape[1]
    return (majority - 1).reshape(n, -1), purity.reshape(n, -1)


def _token_labels(labels: np.ndarray, patch_size: int, include_background: bool, min_purity: float) -> np.ndarray:
    majority, purity = patch_majority(labels, patch_size)
    drop = (majority == OUTSIDE) | (purity < min_purity) | ((majority == 0) & (not include_background))
    return np.where(drop, OUTSIDE, majority)


def organ_inputs(dataset: str | pathlib.Path, kind: str, patch_size: int, *, crop: int = 64,
                 include_background: bool = False, min_purity: float = 0.5, max_slices_per_volume: int | None = None,
                 hu_window: tuple[float, float] = Preprocessing.preset("2d").hu_window) -> OrganInputs:
    """Inputs and token labels of every labelled volume of `dataset` for a `kind` encoder (module docstring).
    2-D: only slices with labelled tokens, at most `max_slices_per_volume` of them (evenly spaced)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    if kind == "3d" and crop % patch_size:
        raise ValueError(f"crop {crop} is not a multiple of the patch size {patch_size}")
    dataset = pathlib.Path(dataset)
    entries = labelled_entries(dataset)
    inputs, token_labels, token_z, volume_index = [], [], [], []
    preprocessing = Preprocessing.preset("2d")
    common = [-(-max(int(e["shape"][axis]) for e in entries) // patch_size) * patch_size for axis in (1, 2)]
    for v, entry in enumerate(entries):
        hu, labels = read_labelled_volume(dataset, entry)
        sz = float(entry["spacing"][0])
        if kind == "2d":
            labelled = [z for z in range(len(labels)) if labels[z].any()]
            if max_slices_per_volume and len(labelled) > max_slices_per_volume:
                labelled = [labelled[i] for i in np.linspace(0, len(labelled) - 1, max_slices_per_volume).round()
                            .astype(int)]
            if not labelled:
                continue
            x, _ = slices_2d(hu, np.eye(4), preprocessing, patch_size, labelled, shape=common)
            grid_labels = np.stack([centred_pad(labels[z].astype(np.int64), common, OUTSIDE)[0] for z in labelled])
            tokens = _token_labels(grid_labels, patch_size, include_background, min_purity)
            inputs.append(x)
            token_labels.append(tokens)
            token_z.append(np.repeat(np.asarray(labelled, np.float64)[:, None] * sz, tokens.shape[1], axis=1))
            volume_index += [v] * len(labelled)
        else:
            volume = normalize_hu(hu, hu_window)
            target = [-(-n // crop) * crop for n in volume.shape]
            padded, before = centred_pad(volume, target, float(volume.min()))
            padded_labels, _ = centred_pad(labels.astype(np.int64), target, OUTSIDE)
            g = crop // patch_size
            for z0 in range(0, target[0], crop):
                for y0 in range(0, target[1], crop):
                    for x0 in range(0, target[2], crop):
                        window = (slice(z0, z0 + crop), slice(y0, y0 + crop), slice(x0, x0 + crop))
                        tokens = _token_labels(padded_labels[window][None], patch_size, include_background,
                                               min_purity)
                        if not (tokens >= 0).any():
                            continue
                        inputs.append(padded[window][None].astype(np.float32))
                        token_labels.append(tokens)
                        z_index = z0 - before[0] + (np.arange(g) + 0.5) * patch_size  # token row-major: z slowest
                        token_z.append(np.repeat(z_index * sz, g * g)[None])
                        volume_index.append(v)
    if not inputs:
        raise ProbeDataError(f"{dataset}: no patch token has a usable label (patch {patch_size}, min purity "
                             f"{min_purity}, background {'included' if include_background else 'excluded'})")
    return OrganInputs(kind, patch_size, np.concatenate(inputs), np.concatenate(token_labels),
                       np.concatenate(token_z), np.asarray(volume_index), list(entries),
                       tuple(float(s) for s in entries[0]["spacing"]))


def labelled_tokens(patch: np.ndarray, organ: OrganInputs, rows: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(features [M, dim], labels [M], input row [M], z mm [M]) of the used tokens of patch features
    [N, P, dim] (optionally those of input `rows` only, whose features `patch` then holds in that order)."""
    rows = np.arange(len(organ.inputs)) if rows is None else np.asarray(rows)
    labels = organ.token_labels[rows]
    if patch.shape[:2] != labels.shape:
        raise ValueError(f"patch features {patch.shape[:2]} do not match the token grid {labels.shape}: another "
                         f"patch size than the inputs were prepared for?")
    used = labels >= 0
    row_of = np.broadcast_to(rows[:, None], labels.shape)
    return patch[used], labels[used], row_of[used], organ.token_z_mm[rows][used]


@dataclasses.dataclass(frozen=True)
class Split:
    train: np.ndarray  # bool per token
    test: np.ndarray
    description: str


def split_tokens(organ: OrganInputs, token_rows: np.ndarray, token_z: np.ndarray, *, test_fraction: float = 0.5,
                 slab_mm: float = 32.0, seed: int = 0) -> Split:
    """Train/test tokens: by subject (manifest `subject`) when there are two or more, else by alternating
    z-slabs of `slab_mm` (said in the description)."""
    from flexict_jax.evals import probes

    subjects = organ.subjects()[token_rows]
    unique = sorted(set(subjects.tolist()))
    if len(unique) >= 2:
        train_subjects, test_subjects = probes.subject_split(unique, test_fraction=test_fraction, seed=seed)
        test = np.isin(subjects, test_subjects)
        return Split(~test, test, f"subject split: train {train_subjects}, test {test_subjects}")
    test = probes.slab_split(token_z, slab_mm)
    return Split(~test, test, f"one subject ({unique[0]}): split by alternating {slab_mm:g} mm slabs along z "
                              f"(even slabs train, odd slabs test)")


def load_encoder(checkpoint: str | pathlib.Path, step: int | None, kind: str, *, random_init: bool = False,
                 seed: int = 0):
    """The frozen backbone to probe (`embed.load_backbone`: training or imported workdir -> EMA teacher, `.pth`,
    safetensors folder), refusing a 2-D checkpoint used as 3-D. `random_init`: the same architecture freshly
    initialised as a training run starts (the baseline a trained checkpoint must beat)."""
    from flax import nnx

    from flexict_jax import checkpointing, embed
    from flexict_jax.models.vit import VisionTransformer

    loaded = embed.load_backbone(checkpoint, step)
    if kind == "3d" and loaded.kind == "2d":
        raise ProbeDataError(f"{checkpoint}: a 2-D checkpoint (its 3-D patch embedding was never trained); use "
                             f"--kind=2d, or run stage 2 from it (configs/stage2.py inflates the 2-D embedding)")
    if not random_init:
        return loaded
    if not (pathlib.Path(checkpoint) / "checkpoints").is_dir():
        raise ProbeDataError(f"{checkpoint}: --random-init needs a workdir (its config.model gives the init)")
    _, _, meta = checkpointing.read_subtree(checkpoint, "step", step)
    from flexict_jax.tasks.dino import TASK_MODEL_KEYS  # e.g. compute_dtype: the task's, not the backbone's

    model = VisionTransformer(**{k: v for k, v in meta["config"]["model"].items() if k not in TASK_MODEL_KEYS},
                              rngs=nnx.Rngs(seed))
    backbone = embed.backbone_module(loaded.arch, nnx.to_pure_dict(nnx.state(model)), rope_bf16=loaded.rope_bf16)
    return dataclasses.replace(loaded, model=backbone, source=f"random init (seed {seed}) of {loaded.source}",
                               step=0)
