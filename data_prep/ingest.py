"""Offline CT ingest: NIfTI files and DICOM series -> canonical LPS, resampled, int16 zarr3 volumes + manifest.

    python -m data_prep.ingest --input RAW_DIR [MORE ...] --output DATASET_DIR [--spacing 1.5,1.5,1.5]

Each source volume is reoriented to LPS (axes z, y, x), resampled in float to the target spacing (linear for
images, nearest for label maps; `--spacing native` only reorients, exactly), rounded, clipped to int16 HU and
written with `flexict_jax.data.volume_store`, which defines the output format. Label maps sit beside their
image as `<name>_label.nii.gz` or `<name>_seg.nii.gz` (for a DICOM series folder `X/`, `X_label.nii.gz` beside
the folder) and are mapped onto the image's output grid through world coordinates.

Oblique sources (direction cosines off the world axes) are resampled in world space onto the axis-aligned
bounding box of their voxels; the corners outside the source get -1024 HU (labels 0).

Volume ids come from the file name (`foo.nii.gz` -> `foo`) or the DICOM series folder (the SeriesInstanceUID
when several series share a folder); a name already taken by other content gets `-<8 hex of its sha256>`.

A dataset has one geometry: the first ingest records its --spacing in DATASET_DIR/dataset.json, and an ingest
into it at another spacing is refused (exit 1). Every manifest entry carries `content_sha256`, the hash of the
stored voxels, which `python -m data_prep.verify --dataset DATASET_DIR` checks.

Re-running skips sources already in the manifest (same content sha256). A volume is listed only after its
arrays are committed; temporary and unlisted arrays left by an interrupted run are removed on the next run.
A bad source is reported with its path and the reason, and the rest of the batch goes on.
Exit status: 0 all written or already present, 2 some sources refused, 1 fatal (nothing to ingest, bad
arguments, unreadable manifest, another ingest running on DATASET_DIR).

With `--runner=DirectRunner` (or any Apache Beam runner, its options passed through) the hashing and the
per-volume conversion run as Beam pipelines (data_prep/beam.py) instead of --workers processes; the manifest
is the same, and the refused sources are also listed in DATASET_DIR/dead_letter.jsonl.

--input and --output may be gs:// URLs (data_prep/storage.py). NIfTI sources are listed in the bucket and
each is downloaded for its hashing and conversion. DICOM series are found by the first bytes of each other
object (its header), and each series' files are downloaded into a temporary folder for its hashing and again
for its conversion, removed after each; the manifest is the local path's, with URLs as sources. A volume is
written locally and uploaded (zarr.json last), and the manifest, kept in a local copy, is uploaded at most
every 30 s and at the end, so a volume may be uploaded but unlisted after a crash: the next run removes it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from data_prep import beam, outputs, storage
from flexict_jax import parallel
from flexict_jax.data import volume_store
from flexict_jax.imaging import dicom, geometry, readers
from flexict_jax.imaging.geometry import IMAGE_FILL_HU, LABEL_FILL
from flexict_jax.progress import Progress

EXIT_OK, EXIT_FATAL, EXIT_REFUSED = 0, 1, 2
DEFAULT_SPACING = (1.5, 1.5, 1.5)  # docs/recipe.md §5: the slice builder's README spacing, mm (z, y, x)
LOCK_NAME = ".ingest.lock"
MANIFEST_PUSH_S = 30.0  # a gs:// dataset's manifest is uploaded at most this often during a run, and at the end
# A bucket object that is not NIfTI is classified by its first bytes: a CT slice header is a few KiB; one that
# runs past this is read whole. PixelData (7FE0,0010) ends the header, little and big endian.
DICOM_HEAD_BYTES = 1 << 16
PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")


class FatalError(Exception):
    """Stops the whole run (exit 1)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One source volume found in the inputs."""
    name: str                          # volume id before de-duplication, from the file or folder name
    source: str                        # the NIfTI file or DICOM series folder, as given on the command line
    series: dicom.DicomSeries | None   # None for NIfTI; for a gs:// series, files relative to `source`
    label: str | None                  # the label-map NIfTI beside it


@dataclasses.dataclass(frozen=True)
class Job:
    candidate: Candidate
    volume_id: str
    source_sha256: str
    subject: str
    dataset_dir: str
    spacing: tuple[float, float, float] | None   # None = native
    extra: dict                                  # licence / split, copied into the manifest entry
    gantry_tilt: str = "refuse"                  # a tilted DICOM series: refused, or resampled (dicom.py)


# --- discovery -----------------------------------------------------------------------------------------------

def _real(path: str) -> str:
    # The identity of a source: a URL is its own, a local path its real path.
    return path if storage.is_url(path) else os.path.realpath(path)


def _walk_url(given: str, skip: set[str]) -> list[str]:
    """Objects under the URL `given` (or `given` itself when it is one object), left out as `_walk` does, and
    without the empty "folder/" objects some tools create."""
    names = storage.list_names(given)
    if not names:
        return [given] if storage.read_bytes(given) is not None else []
    files = []
    for relative in names:
        parts = relative.split("/")
        if relative.endswith("/") or any(p.startswith(".") for p in parts) or any(p.endswith(".zarr") for p in parts[:-1]):
            continue
        path = storage.join(given, relative)
        if not any(path.startswith(s.rstrip("/") + "/") for s in skip):
            files.append(path)
    return files


def _walk(given: str, skip: set[str]) -> Iterator[str]:
    """Files under `given` in sorted order, as paths that start with `given`; hidden entries, zarr arrays and
    `skip` (the output directory) are left out."""
    for root, dirs, files in os.walk(given):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith(".zarr")
                         and os.path.realpath(os.path.join(root, d)) not in skip)
        yield from (os.path.join(root, f) for f in sorted(files) if not f.startswith("."))


def _header_end(head: bytes) -> int | None:
    """Where the DICOM header in `head` ends: after the PixelData element's tag, VR and length (12 bytes), at
    its last occurrence (an earlier one could be a value's bytes); None when `head` holds none."""
    end = max(head.rfind(tag, 0, len(head) - 8) for tag in PIXEL_DATA_TAGS)
    return end + 12 if end >= 0 else None


def _find_series_url(urls: list[str], workers: int) -> tuple[list[tuple[str, dicom.DicomSeries]], list[str], int]:
    """`dicom.find_series` over bucket objects, downloading only their headers: each object's first bytes (all
    of it when its header runs longer), cut after the header, are written as a stand-in file at
    `<tmp>/<scheme>/<bucket>/<key>`, so the stand-ins group into series exactly as the objects' local copies
    would (the headers are read without the pixel data).

    Returns ([(series folder URL, series with its files relative to that folder)], problems, number of
    objects that are not DICOM image slices)."""
    if not urls:
        return [], [], 0
    with tempfile.TemporaryDirectory(prefix="flexict-dicom-headers-") as tmp:
        root = Path(tmp)

        def url_of(stand_in: Path) -> str:
            scheme, *rest = stand_in.relative_to(root).parts
            return f"{scheme}://{'/'.join(rest)}"

        stand_ins, problems = [], []
        bar = Progress(len(urls), "fetching DICOM headers")
        for url, head in zip(urls, storage.read_heads(urls, DICOM_HEAD_BYTES)):
            if head is not None and len(head) == DICOM_HEAD_BYTES and _header_end(head) is None:
                head = storage.read_bytes(url)
            if head is None:
                problems.append(f"{url}: no such object (removed while the input was listed?)")
            else:
                stand_in = root.joinpath(*url.split("://", 1))
                stand_in.parent.mkdir(parents=True, exist_ok=True)
                stand_in.write_bytes(head[:_header_end(head)])
                stand_ins.append(stand_in)
            bar.advance()
        bar.close()
        series, damaged, not_dicom = dicom.find_series(stand_ins, workers, progress=True)
        problems += [f"{url_of(path)}: {reason.replace(str(path), url_of(path))}" for path, reason in damaged]
        located = []
        for s in series:
            folder = url_of(s.folder)
            if folder.endswith("://"):  # the stand-ins' common folder is above the buckets
                problems.append(f"{folder}: series {s.uid} spans several buckets; give one bucket's copy")
                continue
            files = tuple(p.relative_to(s.folder) for p in s.files)
            located.append((folder, dicom.DicomSeries(uid=s.uid, folder=Path("."), files=files)))
    return located, problems, len(not_dicom)


@contextlib.contextmanager
def _local_series(candidate: Candidate) -> Iterator[dicom.DicomSeries]:
    """`candidate.series` on local disk: itself, or for a gs:// series its files downloaded into a temporary
    folder for the block (refusals name the bucket objects, not the download)."""
    series = candidate.series
    if not storage.is_url(candidate.source):
        yield series
        return
    with storage.local_folder(candidate.source, [str(f) for f in series.files]) as folder, \
            storage.named_as(folder, candidate.source):
        yield dataclasses.replace(series, folder=folder, files=tuple(folder / f for f in series.files))


def _labels_beside(directory: str, name: str, listed: set[str]) -> list[str]:
    """Label maps beside image `name` in `directory`: local files, or among the `listed` bucket objects."""
    return [os.path.join(directory, name + suffix + ext) for suffix in readers.LABEL_SUFFIXES
            for ext in readers.NIFTI_SUFFIXES
            if (os.path.join(directory, name + suffix + ext) in listed if storage.is_url(directory)
                else os.path.isfile(os.path.join(directory, name + suffix + ext)))]


def sanitize_id(name: str) -> str:
    """A volume id usable as a file name: [A-Za-z0-9._-], not hidden."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "volume"


def discover(inputs: Sequence[str], output_dir: str, workers: int = 1) -> tuple[list[Candidate], list[str], int]:
    """Finds the source volumes in `inputs` (files or folders, searched recursively).

    Returns (candidates sorted by source, problems as "path: reason", number of ignored non-CT files).
    """
    skip = {_real(output_dir)}
    images, labels, others, listed, remote_others = [], [], [], set(), []
    problems = []
    for given in inputs:
        if storage.is_url(given):
            files = _walk_url(given.rstrip("/"), skip)
            if not files:
                raise FatalError(f"{given}: no such object or prefix")
            listed.update(files)
        elif os.path.isdir(given):
            files = list(_walk(given, skip))
        elif os.path.isfile(given):
            files = [given]
        else:
            raise FatalError(f"{given}: no such file or directory")
        for f in files:
            maybe_dicom = remote_others if storage.is_url(f) else others
            (labels if readers.is_label_name(f) else images if readers.is_nifti(f) else maybe_dicom).append(f)

    series, damaged, not_dicom = dicom.find_series(others, workers, progress=True)
    problems += [f"{path}: {reason}" for path, reason in damaged]
    remote_series, remote_problems, remote_not_dicom = _find_series_url(remote_others, workers)
    problems += remote_problems
    found: dict[tuple[str, str], Candidate] = {}

    def add(name: str, source: str, series_: dicom.DicomSeries | None, beside: tuple[str, str] | None) -> None:
        """`beside` = (folder, name) of the image whose label maps to look for; None: no label possible."""
        labels_found = _labels_beside(*beside, listed) if beside else []
        if len(labels_found) > 1:
            problems.append(f"{source}: several label maps beside it ({', '.join(labels_found)}); keep one")
            return
        key = (_real(source), series_.uid if series_ else "")  # an input may be given twice
        label = labels_found[0] if labels_found else None
        found.setdefault(key, Candidate(sanitize_id(name), source, series_, label))

    for f in images:
        add(readers.nifti_stem(f), f, None, (os.path.dirname(f), readers.nifti_stem(f)))
    folders = [s.folder for s in series]
    for s in series:
        if folders.count(s.folder) > 1:  # several series in one folder: name each by its UID, no label
            add(s.uid or s.folder.name, str(s.folder), s, None)
        else:
            add(s.folder.name, str(s.folder), s, (str(s.folder.parent), s.folder.name))
    remote_folders = [folder for folder, _ in remote_series]
    for folder, s in remote_series:  # the same, by folder URL
        if remote_folders.count(folder) > 1:
            add(s.uid or storage.name(folder), folder, s, None)
        else:
            in_bucket = "/" in folder.split("://", 1)[1]  # a series at a bucket's top has nothing beside it
            add(storage.name(folder), folder, s, tuple(folder.rsplit("/", 1)) if in_bucket else None)

    attached = {_real(c.label) for c in found.values() if c.label}
    for f in labels:
        if _real(f) not in attached:
            stem = readers.nifti_stem(f)
            image = next(stem[:-len(s)] for s in readers.LABEL_SUFFIXES if stem.endswith(s))
            problems.append(f"{f}: label map without its image among the inputs (expected {image}.nii.gz "
                            f"or a DICOM series folder {image}/ beside it)")
    candidates = sorted(found.values(), key=lambda c: (c.source, c.name))
    return candidates, sorted(set(problems)), len(not_dicom) + remote_not_dicom


# --- per-volume work (runs in worker processes) -----------------------------------------------------------

def source_sha256(candidate: Candidate) -> tuple[str | None, str | None]:
    """(content hash, None) or (None, "path: reason"). The hash is the file's sha256, or for a DICOM series
    the sha256 of its sha256sum listing."""
    try:
        if candidate.series:
            with _local_series(candidate) as series:
                return dicom.series_sha256(series), None
        with storage.local_copy(candidate.source) as local:
            return readers.file_sha256(local), None
    except OSError as e:
        return None, f"{candidate.source}: cannot read ({e})"


def _read_image(candidate: Candidate, gantry_tilt: str) -> readers.SourceVolume:
    if candidate.series:
        with _local_series(candidate) as series:
            return dicom.read_series(series, gantry_tilt)
    return _read_nifti(candidate.source)


def _read_nifti(source: str, what: str = "image") -> readers.SourceVolume:
    """`readers.read_nifti` of a local file or a gs:// object (downloaded for the read); a refusal names
    `source`, not the download."""
    if not storage.is_url(source):
        return readers.read_nifti(source, what)
    with storage.local_copy(source) as local, storage.named_as(local, source):
        return readers.read_nifti(local, what)


def _write_volume(dataset_dir: str, relative: str, array: np.ndarray, attributes: dict) -> None:
    """`volume_store.write_volume` into the dataset, which may be a gs:// URL (written locally, then uploaded)."""
    with storage.writing(storage.join(storage.location(dataset_dir), relative), "zarr.json") as path:
        volume_store.write_volume(path, array, attributes)


def _to_int16_hu(values: np.ndarray) -> np.ndarray:
    info = np.iinfo(np.int16)
    if values.dtype == np.int16:  # exact reorientation of int16 HU: nothing to round or clip
        return values
    return np.clip(np.rint(values), info.min, info.max).astype(np.int16)


def _attributes(job: Job, grid: geometry.Grid, kind: str, source: str, sha256: str,
                source_volume: readers.SourceVolume) -> dict:
    return {
        "id": job.volume_id, "kind": kind, "subject": job.subject,
        "axes": "zyx", "orientation": "LPS", "shape": list(grid.shape),
        "spacing": list(grid.spacing), "origin_lps": list(grid.origin_lps),
        "affine_zyx_to_lps": grid.affine.tolist(),
        "dtype": "int16" if kind == "image" else "uint8", "units": "HU" if kind == "image" else "class index",
        "fill_value": IMAGE_FILL_HU if kind == "image" else LABEL_FILL,
        "resampling": ("linear" if kind == "image" else "nearest")
        if geometry.needs_resampling(source_volume.array.shape, source_volume.affine, grid)
        else "exact reorientation",
        "target_spacing": "native" if job.spacing is None else list(job.spacing),
        "source": source, "source_sha256": sha256,
        "source_format": "dicom" if job.candidate.series and kind == "image" else "nifti",
        "source_shape": list(source_volume.array.shape),
        "source_orientation": geometry.orientation_code(source_volume.affine),
        "source_affine_lps": np.asarray(source_volume.affine).tolist(),
    }


def ingest_volume(job: Job) -> tuple[dict | None, str | None]:
    """Converts and writes one volume; returns (manifest entry, None) or (None, "path: reason")."""
    candidate, dataset_dir = job.candidate, job.dataset_dir
    written: list[str] = []
    try:
        image = _read_image(candidate, job.gantry_tilt)
        readers.check_ct_intensity(image.array, candidate.source)
        grid = geometry.canonical_grid(image.array.shape, image.affine, job.spacing)
        entry = {"id": job.volume_id, "path": f"{volume_store.VOLUMES_DIR}/{job.volume_id}.zarr",
                 "label_path": None, "shape": list(grid.shape), "spacing": list(grid.spacing),
                 "origin_lps": list(grid.origin_lps), "subject": job.subject, "source": candidate.source,
                 "source_sha256": job.source_sha256, **job.extra}
        if candidate.series and candidate.series.uid:
            entry["series_uid"] = candidate.series.uid
        if candidate.label:
            label = _read_nifti(candidate.label, "label map")
            label_map = readers.as_label_map(label.array, candidate.label)
            with storage.local_copy(candidate.label) as local:
                label_sha = readers.file_sha256(local)
            label_path = f"{volume_store.LABELS_DIR}/{job.volume_id}.zarr"
            on_grid = geometry.to_grid(label_map, label.affine, grid, 0, LABEL_FILL)
            if label_map.any() and not on_grid.any():
                raise readers.SourceError(f"{candidate.label}: label map does not overlap its image "
                                          f"{candidate.source} in world space")
            _write_volume(dataset_dir, label_path, on_grid,
                          _attributes(job, grid, "label", candidate.label, label_sha, label))
            written.append(label_path)
            entry.update(label_path=label_path, label_source=candidate.label, label_sha256=label_sha,
                         label_content_sha256=volume_store.content_sha256(on_grid))
        hu = _to_int16_hu(geometry.to_grid(image.array, image.affine, grid, 1, IMAGE_FILL_HU))
        _write_volume(dataset_dir, entry["path"], hu,
                      _attributes(job, grid, "image", candidate.source, job.source_sha256, image))
        # What `python -m data_prep.verify` checks the stored voxels against.
        entry["content_sha256"] = volume_store.content_sha256(hu)
        return entry, None
    except Exception as e:  # a bad volume is reported and skipped; the batch goes on
        for relative in written:  # our own, never listed: do not leave a label without its image
            with contextlib.suppress(OSError, ValueError):
                storage.remove(storage.join(storage.location(dataset_dir), relative))
        reason = str(e) if isinstance(e, readers.SourceError) else f"{type(e).__name__}: {e}"
        return None, reason if reason.startswith(candidate.source) else f"{candidate.source}: {reason}"


# --- the run ----------------------------------------------------------------------------------------------

def parse_spacing(text: str) -> tuple[float, float, float] | None:
    """'native' -> None; 'Z,Y,X' or one isotropic value -> (sz, sy, sx) in mm."""
    if text.strip().lower() == "native":
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"--spacing {text!r}: expected 'native', 'Z,Y,X' or one value, "
                                         f"positive mm")
    return tuple(values)


def load_subjects(path: str) -> dict[str, str]:
    """Volume id or source file name -> subject id, from a JSON object or a two-column CSV (optional header
    whose second cell is 'subject')."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise FatalError(f"{path}: cannot read the subjects file ({e})") from e
    if path.endswith(".json"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as e:
            raise FatalError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise FatalError(f"{path}: expected a JSON object mapping volume id or file name to subject id")
        return mapping
    mapping = {}
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise FatalError(f"{path}:{line_no}: expected 'volume id or file name,subject id', got {row}")
        if line_no == 1 and row[1].strip().lower() == "subject":
            continue
        mapping[row[0].strip()] = row[1].strip()
    return mapping


def remove_interrupted(dataset_dir: storage.Location, entries: list[dict]) -> list[storage.Location]:
    """Removes temporary arrays and arrays never listed in the manifest (both left by an interrupted run)."""
    listed = {p for e in entries for p in (e["path"], e["label_path"]) if p}
    removed = []
    for sub in (volume_store.VOLUMES_DIR, volume_store.LABELS_DIR):
        for name in storage.children(storage.join(dataset_dir, sub)):
            unlisted = name.endswith(".zarr") and f"{sub}/{name}" not in listed
            if name.startswith(volume_store.TMP_PREFIX) or unlisted:
                child = storage.join(dataset_dir, sub, name)
                storage.remove(child)
                removed.append(child)
    return removed


def build_parser() -> argparse.ArgumentParser:
    parser = outputs.ExitOneParser(
        prog="python -m data_prep.ingest", description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 all written or already present, 2 some sources refused, 1 fatal.")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="NIfTI files (.nii, .nii.gz), DICOM files or folders (searched recursively); "
                             "local or gs:// objects and prefixes")
    parser.add_argument("--output", required=True, metavar="DATASET_DIR",
                        help="dataset folder: manifest.jsonl, volumes/<id>.zarr, labels/<id>.zarr; local or gs://")
    parser.add_argument("--spacing", type=parse_spacing, default=DEFAULT_SPACING, metavar="Z,Y,X|native",
                        help="target voxel spacing in mm (default 1.5,1.5,1.5, docs/recipe.md §5); 'native' keeps "
                             "the source spacing and only reorients (exact)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="worker processes, one volume each (default 1: in this process)")
    parser.add_argument("--gantry-tilt", choices=dicom.GANTRY_TILT_MODES, default="refuse",
                        help="a DICOM series acquired with gantry tilt: refuse it (default) or resample it onto "
                             "an orthogonal LPS grid in world space")
    beam.add_runner_argument(parser)
    parser.add_argument("--licence", help="licence string recorded for every volume of this run")
    parser.add_argument("--split", help="split (train/val/test...) recorded for every volume of this run")
    parser.add_argument("--subjects", metavar="FILE",
                        help="CSV or JSON mapping volume id or source file name to subject id "
                             "(default subject = volume id)")
    return parser


def _subject(mapping: dict[str, str], volume_id: str, candidate: Candidate) -> str:
    for key in (volume_id, os.path.basename(candidate.source.rstrip(os.sep)), candidate.name):
        if key in mapping:
            return mapping[key]
    return volume_id


def _results(fn, items: list, pool: concurrent.futures.Executor | None, ordered: bool) -> Iterator:
    """fn over items, lazily in this process without a pool; in completion order when not `ordered`."""
    if pool is None:
        yield from map(fn, items)
    elif ordered:
        yield from pool.map(fn, items)
    else:
        for future in concurrent.futures.as_completed([pool.submit(fn, item) for item in items]):
            yield future.result()


def run(args: argparse.Namespace) -> int:
    dataset = storage.location(args.output)
    if args.workers < 1:
        raise FatalError(f"--workers {args.workers}: need at least 1")
    subjects = load_subjects(args.subjects) if args.subjects else {}
    candidates, problems, ignored = discover(args.input, args.output, args.workers)
    for problem in problems:
        outputs.report(f"refused: {problem}")
    if ignored:
        outputs.report(f"ignored {ignored} files that are neither NIfTI nor DICOM image slices")
    if not candidates:
        raise FatalError(f"no NIfTI file or DICOM CT series found in {' '.join(args.input)}")

    extra = {k: v for k, v in (("licence", args.licence), ("split", args.split)) if v is not None}
    written = skipped = 0
    refused = len(problems)
    with contextlib.ExitStack() as stack:
        # A gs:// dataset's manifest and dataset.json are read and written in a local copy, uploaded below.
        mirror = stack.enter_context(storage.Mirror(dataset, (volume_store.MANIFEST_NAME, volume_store.DATASET_FILE)))
        dataset_dir = mirror.local
        try:
            dataset_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FatalError(f"{dataset_dir}: cannot create the dataset folder ({e})") from e
        # One ingest per dataset: the manifest has a single writer (for gs://, one per staging folder: see
        # docs/operations.md on running one ingest per bucket dataset at a time).
        stack.enter_context(outputs.exclusive(dataset_dir, LOCK_NAME, "another ingest is writing to this dataset",
                                              FatalError))
        entries = volume_store.read_manifest(dataset_dir) if (dataset_dir / volume_store.MANIFEST_NAME).exists() \
            else []
        try:  # one geometry per dataset: refused before anything in it is touched
            volume_store.claim_target_spacing(dataset_dir, args.spacing)
        except ValueError as e:
            raise FatalError(str(e)) from e
        mirror.push(volume_store.DATASET_FILE)
        for path in remove_interrupted(dataset, entries):
            outputs.report(f"removed {path}: left unlisted by an interrupted run")
        pool = None
        beam_args = args.pipeline_args

        def results(fn, items: list, ordered: bool, label: str) -> Iterator:
            if beam_args is not None:
                return iter(beam.map_volumes(fn, items, beam_args, label))
            return _results(fn, items, pool, ordered)

        failures: list[str] = []  # "source: reason", the dead-letter report of a Beam run
        if args.workers > 1 and beam_args is None:
            pool = parallel.process_pool(args.workers)
            # On an error or Ctrl-C, drop the queued volumes instead of converting them all first.
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)

        progress = Progress(len(candidates), "hashing sources")
        hashes = []
        for sha, error in results(source_sha256, candidates, True, "hash"):
            hashes.append(sha)
            if error:
                outputs.report(f"refused: {error}")
                failures.append(error)
                refused += 1
            progress.advance(1)
        progress.close()

        known = {e["source_sha256"]: e["id"] for e in entries}
        taken = {e["id"] for e in entries}
        jobs = []
        for candidate, sha in zip(candidates, hashes):
            if sha is None:
                continue
            if sha in known:
                skipped += 1  # same content already in the manifest or earlier in this run
                continue
            volume_id = candidate.name if candidate.name not in taken else f"{candidate.name}-{sha[:8]}"
            if volume_id in taken:
                outputs.report(f"refused: {candidate.source}: volume id {volume_id} is already taken")
                refused += 1
                continue
            known[sha] = volume_id
            taken.add(volume_id)
            jobs.append(Job(candidate, volume_id, sha, _subject(subjects, volume_id, candidate),
                            str(dataset), args.spacing, extra, args.gantry_tilt))

        progress = Progress(len(jobs), "ingest")
        # Also on an error or Ctrl-C: what was listed reaches the bucket (before the staging folder goes).
        stack.callback(mirror.push, volume_store.MANIFEST_NAME)
        for entry, error in results(ingest_volume, jobs, False, "ingest"):
            if error is None:
                for key in ("path", "label_path"):  # a gs:// array's zarr.json, which append_manifest checks
                    if entry[key]:
                        mirror.fetch(f"{entry[key]}/zarr.json")
                volume_store.append_manifest(dataset_dir, entry)  # only the parent appends
                mirror.push(volume_store.MANIFEST_NAME, every_s=MANIFEST_PUSH_S)
                written += 1
            else:
                outputs.report(f"refused: {error}")
                failures.append(error)
                refused += 1
            progress.advance(1, entry["id"] if entry else "")
        progress.close()
        if beam_args is not None:
            beam.write_dead_letter(dataset_dir, failures)
            mirror.push(beam.DEAD_LETTER_NAME)

    print(f"ingest: {written} written, {skipped} skipped (already ingested), {refused} refused "
          f"-> {storage.join(dataset, volume_store.MANIFEST_NAME)}")
    if refused and not (written or skipped):
        print("ingest: no volume could be ingested", file=sys.stderr)
        return EXIT_FATAL
    return EXIT_REFUSED if refused else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = beam.parse_args(build_parser(), argv)
    # ValueError, OSError: also a corrupt manifest, an unwritable dataset folder.
    return outputs.run_tool("ingest", lambda: run(args), (FatalError, ValueError, OSError),
                            "volumes listed in the manifest are complete, re-run to continue")


if __name__ == "__main__":
    sys.exit(main())
