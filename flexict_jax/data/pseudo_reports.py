"""Pseudo-reports written from label maps, for volumes without a radiology report (stage 3, docs/recipe.md §8).

The report is built from the structures and lesions a (z, y, x) LPS label map holds, in the same form a parsed
radiology report takes (`report_rules.ParsedReport`), so label-only data trains and evaluates like reported data.
"""
from __future__ import annotations

import csv
import json
import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from flexict_jax.data.report_rules import (
    LESION_SECTION,
    NEGATIVE,
    OTHER_SECTION,
    POSITIVE,
    SECTION_KEYWORDS,
    ParsedReport,
    ReportError,
    section_of,
)

_LESION_NAME = re.compile(r"lesion|tumou?r|nodule|mass|cyst|metasta|cancer|carcinoma|neoplasm", re.I)
_SLABS = ("lower", "middle", "upper")  # thirds of the scan along z, which increases toward Superior
MIDLINE_MM = 10.0  # a centroid within this distance of the body midline is "in the midline"


def readable_name(name: str) -> str:
    """A label name as report text: "kidney_right" -> "right kidney", "vertebrae_L1" -> "vertebrae L1"."""
    words = [w for w in re.split(r"[_\s]+", name.strip()) if w]
    sides = [w.lower() for w in words if w.lower() in ("left", "right")]
    rest = [w if (w.isupper() or any(c.isdigit() for c in w)) else w.lower() for w in words
            if w.lower() not in ("left", "right")]
    return " ".join(sides + rest)


def _is_plural(name: str) -> bool:
    """"ribs", "vertebrae", "costal cartilages" (but not "pancreas", "esophagus", "iliopsoas")."""
    words = [w for w in name.split() if w.isalpha() and w.islower()]
    last = words[-1] if words else name
    return last.endswith("ae") or (last.endswith("s") and not last.endswith(("ss", "us", "as", "is")))


def _place(centroid_x_mm: float, centroid_z: float, nz: int, midline_x_mm: float) -> str:
    """"on the right in the upper third of the scan". LPS: x grows toward patient Left, z toward Superior."""
    offset = centroid_x_mm - midline_x_mm
    side = "in the midline" if abs(offset) <= MIDLINE_MM else ("on the left" if offset > 0 else "on the right")
    slab = _SLABS[min(2, int(3 * (centroid_z + 0.5) / nz))]
    return f"{side} in the {slab} third of the scan"


def _neighbour(mask: np.ndarray, label_map: np.ndarray, exclude: set[int]) -> int | None:
    """The label that most of a component's one-voxel shell touches (the organ a lesion sits in)."""
    box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in ndimage.find_objects(mask.astype(np.uint8))[0])
    inner = mask[box]
    shell = ndimage.binary_dilation(inner, np.ones((3, 3, 3), bool)) & ~inner
    around = label_map[box][shell]
    around = around[~np.isin(around, list(exclude))]
    return int(np.bincount(around).argmax()) if around.size else None


def pseudo_report(label_map: np.ndarray, spacing: Sequence[float], label_names: Mapping[int, str],
                  midline_x_mm: float | None = None, min_volume_ml: float = 0.1,
                  max_lesions: int = 5) -> tuple[ParsedReport, dict[str, int]]:
    """A report written from a (z, y, x) LPS label map, for volumes without a radiology report.

    Findings name each labelled structure present (its side, its third of the scan along z, its volume in ml)
    and each lesion component (labels named lesion/tumour/nodule/mass/cyst/...: size, the structure it lies
    in, side and level, the `max_lesions` largest), grouped by anatomical section. Structured findings: those
    sentences are positive findings; named structures absent from the map are negative findings of their
    section ("The spleen is not in the field of view."), absent lesion labels a negative finding of the
    "lesions" section. Also returns the finding labels {readable name: 0 | 1} for zero-shot evaluation.

    `midline_x_mm` is the body's left-right centre, in mm from voxel x = 0 (default: the grid centre).
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 3:
        raise ValueError(f"label map must be 3-D (z, y, x), got shape {label_map.shape}")
    nz, _, nx = label_map.shape
    sz, sy, sx = (float(s) for s in spacing)
    midline = (nx - 1) / 2 * sx if midline_x_mm is None else float(midline_x_mm)
    voxel_ml = sz * sy * sx / 1000.0
    n_labels = int(label_map.max()) + 1
    counts = np.bincount(label_map.ravel(), minlength=n_labels)
    z_sum = np.zeros(n_labels)
    x_sum = np.zeros(n_labels)
    for z, plane in enumerate(label_map):  # per-label coordinate sums without (z, y, x) index arrays
        z_sum += z * np.bincount(plane.ravel(), minlength=n_labels)
        x_sum += np.bincount(plane.ravel(), weights=np.broadcast_to(np.arange(nx), plane.shape).ravel(),
                             minlength=n_labels)

    names = {int(v): str(n) for v, n in label_names.items() if int(v) != 0 and str(n).lower() != "background"}
    lesion_values = {v for v, n in names.items() if _LESION_NAME.search(n)}
    described: dict[str, list[str]] = {}  # section -> sentences of the Findings text
    sections: dict[str, dict[str, list[str]]] = {}
    finding_labels: dict[str, int] = {}

    def add(section: str, kind: str, sentence: str, in_findings: bool = True) -> None:
        sections.setdefault(section, {POSITIVE: [], NEGATIVE: []})[kind].append(sentence)
        if in_findings:
            described.setdefault(section, []).append(sentence)

    for value in sorted((set(range(1, n_labels)) | set(names)) - lesion_values):
        count = int(counts[value]) if value < n_labels else 0
        name = readable_name(names.get(value, f"label {value}"))
        finding_labels[name] = int(count * voxel_ml >= min_volume_ml)
        if finding_labels[name]:
            place = _place(x_sum[value] / count * sx, z_sum[value] / count, nz, midline)
            verb = "are" if _is_plural(name) else "is"
            add(section_of(name), POSITIVE, f"The {name} {verb} present {place} ({count * voxel_ml:.1f} ml).")
        elif value in names:  # absent from this field of view: lists the section for OSL's false pairs
            verb = "are" if _is_plural(name) else "is"
            add(section_of(name), NEGATIVE, f"The {name} {verb} not in the field of view.", in_findings=False)

    for value in sorted(lesion_values):
        name = readable_name(names[value])
        components, n = ndimage.label(label_map == value) if value < n_labels else (None, 0)
        sizes = np.bincount(components.ravel())[1:] if n else np.zeros(0, np.int64)
        largest = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] * voxel_ml >= min_volume_ml]
        finding_labels[name] = int(bool(largest))
        if not largest:
            add(LESION_SECTION, NEGATIVE, f"No {name} is seen.")
        for component in largest[:max_lesions]:
            mask = components == component
            zz, _, xx = np.nonzero(mask)
            host = _neighbour(mask, label_map, {0} | lesion_values)
            inside = f" in the {readable_name(names.get(host, f'label {host}'))}" if host is not None else ""
            place = _place(xx.mean() * sx, zz.mean(), nz, midline)
            add(LESION_SECTION, POSITIVE, f"There is a {mask.sum() * voxel_ml:.1f} ml {name}{inside}, {place}.")

    order = [name for name, _ in SECTION_KEYWORDS] + [LESION_SECTION, OTHER_SECTION]
    findings_sections = [(name, " ".join(described[name])) for name in order if name in described]
    report = ParsedReport(" ".join(t for _, t in findings_sections), findings_sections,
                          {name: sections[name] for name in order if name in sections})
    if not report.has_caption():
        raise ReportError("label map has no labelled structure to describe")
    return report, finding_labels


def read_label_names(path: pathlib.Path) -> dict[int, str]:
    """Label value -> structure name, from JSON {value: name} or a CSV "value,name[,...]" (header optional);
    ValueError naming the file (and line) when it cannot be read as such."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the label names ({e})") from e
    names: dict[int, str] = {}
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
            names = {int(k): str(v) for k, v in mapping.items()}
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: expected a JSON object {{label value: name}} ({e})") from e
        return names
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip():
            continue
        try:
            value = int(row[0])
        except ValueError:
            if line_no == 1:
                continue  # header
            raise ValueError(f"{path}:{line_no}: expected 'label value,name', got {row}") from None
        if len(row) < 2 or not row[1].strip():
            raise ValueError(f"{path}:{line_no}: label value {value} has no name")
        names[value] = row[1].strip()
    if not names:
        raise ValueError(f"{path}: no label names found")
    return names
