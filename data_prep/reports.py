"""Stage-3 report records: radiology reports joined to ingested volumes, pseudo-reports for the rest.

    python -m data_prep.reports --dataset DATASET_DIR --output REPORTS_DIR [--reports FILE.csv|FILE.jsonl]

Reads the volumes of DATASET_DIR/manifest.jsonl (written by `python -m data_prep.ingest`) and writes one record
per volume (layout in `flexict_jax.data.report_rules`) into REPORTS_DIR/reports-NNNNN-of-MMMMM.array_record, plus
REPORTS_DIR/index.json (one entry per volume: volume_id, dataset-relative path, split, source, in record order)
and REPORTS_DIR/positive_pool.json (per split and section, the de-duplicated positive findings from which OSL
draws its false pairs, docs/recipe.md §8).

Joining. A report row belongs to the volume whose id (or source file name without .nii/.nii.gz) equals the row's
id after the same clean-up (folders and .nii/.nii.gz/.zarr dropped). A volume named `<id>_<n>` with no row of its
own shares the row of `<id>`: CT-RATE reconstructions `train_1_a_1`, `train_1_a_2` of scan `train_1_a`.

Report text. The Findings are extracted (the recipe's `**4. Findings:** ... **5. Impression:**` template,
"Findings:"/"Impression:" headers, or CT-RATE's plain `report_text`); structured findings come from
--findings-column (JSON {section: {positive_findings: [...], negative_findings: [...]}}, the recipe's
`short_captions`) or, when there is none, are derived from the Findings by rule. Binary (0/1) columns such as
CT-RATE's 18 abnormality labels are kept as finding labels for zero-shot evaluation (--label-columns).

Volumes without a report get a pseudo-report from their label map: the structures and lesions present, their
volumes in ml, side and level, under label names from --label-names (a CSV "index,name,..." such as
TotalSegmentator's class table, or a JSON {index: name}), else the `labels.json` beside the volume's source
label map (the synthetic phantoms), else "label N".

Bad input is reported and skipped, never fatal: empty or malformed report rows (upstream crashes on them, recipe
§13 #10), duplicate rows for one volume, volumes whose array is missing, volumes with neither a report nor a
label map, unreadable label maps. DATASET_DIR, REPORTS_DIR and the reports file may be gs:// URLs
(data_prep/storage.py), and so may --label-names and the source label maps (their labels.json is read beside
them in the bucket). Exit status: 0 every volume has a record and no row was skipped, 2 something
was skipped (listed in index.json), 1 fatal (no manifest, unreadable reports file, no record, refused output).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any

from data_prep import beam, ingest, outputs, slices, storage
from flexict_jax.data import pseudo_reports, report_records, report_rules, volume_store
from flexict_jax.imaging.readers import NIFTI_SUFFIXES, file_sha256
from flexict_jax.progress import Progress

EXIT_OK, EXIT_FATAL, EXIT_SKIPPED = 0, 1, 2
# Column names tried, in order, when the corresponding option is not given.
ID_COLUMNS = ("volume_id", "VolumeName", "file_path", "NameinCTRATE", "id")
TEXT_COLUMNS = ("final_report", "report_text", "report", "text", "Findings_EN")
FINDINGS_COLUMNS = ("short_captions",)
SPLIT_COLUMN = "split"
SHARD_PREFIX = "reports"
_RECONSTRUCTION = re.compile(r"^(?P<scan>.+)_\d+$")


class FatalError(Exception):
    """Stops the whole run (exit 1)."""


@dataclasses.dataclass(frozen=True)
class Columns:
    id: str
    text: str | None
    findings: str | None
    split: str | None
    labels: tuple[str, ...]


# --- reading the inputs ----------------------------------------------------------------------------------------

def read_rows(path: pathlib.Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line number, row) of a CSV or JSONL reports file, and its column names. A JSONL line that is not a JSON
    object comes back as {"__error__": reason}, so it is reported with the other bad rows."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise FatalError(f"{path}: cannot read the reports file ({e})") from e
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        columns: dict[str, None] = {}
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((line_no, {"__error__": f"not valid JSON ({e.msg})"}))
                continue
            if not isinstance(row, dict):
                rows.append((line_no, {"__error__": f"expected a JSON object, got {type(row).__name__}"}))
                continue
            columns.update(dict.fromkeys(row))
            rows.append((line_no, row))
        return rows, list(columns)
    reader = csv.DictReader(text.splitlines(keepends=True), restkey="__extra__")
    try:
        for row in reader:
            if any(value is None for value in row.values()) or "__extra__" in row:
                fields = len([v for k, v in row.items() if k != "__extra__" and v is not None]) \
                    + len(row.get("__extra__", []))
                row = {"__error__": f"malformed CSV row: {fields} fields, the header has {len(reader.fieldnames)}"}
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise FatalError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e
    return rows, list(reader.fieldnames or [])


def _pick(columns: Sequence[str], given: str | None, candidates: Sequence[str], what: str, path: pathlib.Path,
          required: bool) -> str | None:
    if given is not None:
        if given not in columns:
            raise FatalError(f"{path}: no column {given!r} ({what}); columns: {', '.join(columns)}")
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None and required:
        raise FatalError(f"{path}: none of the columns {', '.join(candidates)} ({what}); pass the option naming "
                         f"it. Columns: {', '.join(columns)}")
    return found


def _binary(value: Any) -> int | None:
    """0 or 1 for a 0/1 cell (CSV text, JSON number or bool), None for an empty cell; raises otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1", "0.0", "1.0"):
        return int(float(value))
    raise ValueError(f"{value!r} is not 0 or 1")


def resolve_columns(args: argparse.Namespace, columns: list[str], rows: list[tuple[int, dict]]) -> Columns:
    path = args.reports
    id_column = _pick(columns, args.id_column, ID_COLUMNS, "volume id", path, required=True)
    text = _pick(columns, args.text_column, TEXT_COLUMNS, "report text", path, required=False)
    findings = _pick(columns, args.findings_column, FINDINGS_COLUMNS, "structured findings", path, required=False)
    if text is None and findings is None:
        raise FatalError(f"{path}: no report text column ({', '.join(TEXT_COLUMNS)}) and no structured findings "
                         f"column; pass --text-column or --findings-column. Columns: {', '.join(columns)}")
    split = SPLIT_COLUMN if SPLIT_COLUMN in columns else None
    if args.label_columns == "none":
        labels: tuple[str, ...] = ()
    elif args.label_columns == "auto":
        def is_binary(column: str) -> bool:
            try:
                values = [_binary(row.get(column)) for _, row in rows if "__error__" not in row]
            except ValueError:
                return False
            return any(v is not None for v in values)
        taken = {id_column, text, findings, split}
        labels = tuple(c for c in columns if c not in taken and is_binary(c))
    else:
        labels = tuple(c.strip() for c in args.label_columns.split(",") if c.strip())
        unknown = [c for c in labels if c not in columns]
        if unknown:
            raise FatalError(f"{path}: --label-columns names unknown column(s) {unknown}")
    return Columns(id_column, text, findings, split, labels)


def read_label_names(path: storage.Location) -> dict[int, str]:
    """`pseudo_reports.read_label_names` of a local file or a gs:// object, its refusal a FatalError (a bad
    names file stops the run)."""
    try:
        with storage.local_copy(path) as local, storage.named_as(local, path):
            return pseudo_reports.read_label_names(local)
    except ValueError as e:
        raise FatalError(str(e)) from e
    except OSError as e:  # a missing object (a local file's read error is pseudo_reports' ValueError)
        raise FatalError(f"cannot read the label names ({e})") from e


def volume_key(name: str) -> str:
    """A report id or file name as a volume id: folders and .nii/.nii.gz/.zarr dropped, cleaned like ingest."""
    name = str(name).strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    for suffix in (*NIFTI_SUFFIXES, ".zarr"):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    return ingest.sanitize_id(name)


def _entry_keys(entry: dict) -> list[str]:
    keys = [entry["id"]]
    source = str(entry.get("source") or "")
    if source:
        keys.append(volume_key(source))
    return keys


# --- building records ------------------------------------------------------------------------------------------

def _volume_fields(entry: dict) -> dict[str, Any]:
    return {"volume_id": entry["id"], "path": entry["path"], "label_path": entry.get("label_path"),
            "subject": entry.get("subject"), "split": entry.get("split")}


def report_fields(row: dict, columns: Columns) -> dict[str, Any]:
    """The text fields of a record from one report row; raises ReportError / ValueError for a bad row."""
    text = row.get(columns.text) if columns.text else ""
    structured = row.get(columns.findings) if columns.findings else None
    if text is not None and not isinstance(text, str):
        raise report_rules.ReportError(f"column {columns.text!r}: expected text, got {type(text).__name__}")
    parsed = report_rules.parse_report(text or "", structured)
    labels = {}
    for column in columns.labels:
        try:
            value = _binary(row.get(column))
        except ValueError as e:
            raise ValueError(f"column {column!r}: {e}") from None
        if value is not None:
            labels[column] = value
    return {"source": "report", "report_id": str(row[columns.id]), "findings": parsed.findings,
            "findings_sections": [list(s) for s in parsed.findings_sections], "sections": parsed.sections,
            "structured": "given" if structured not in (None, "") else "derived", "finding_labels": labels}


def join_reports(rows: list[tuple[int, dict]], entries: list[dict], columns: Columns
                 ) -> tuple[dict[str, dict], list[dict], int]:
    """Report records by volume id, the skipped rows ({row, report_id, reason}) and the number of rows that
    match no volume."""
    skipped: list[dict] = []
    rows_of_key: dict[str, list[tuple[int, dict]]] = {}
    for line_no, row in rows:
        report_id = row.get(columns.id)
        if "__error__" in row or report_id is None or not str(report_id).strip():
            skipped.append({"row": line_no, "report_id": None,
                            "reason": row.get("__error__", f"empty id (column {columns.id!r})")})
        else:
            rows_of_key.setdefault(volume_key(report_id), []).append((line_no, row))
    volumes_of_key: dict[str, list[dict]] = {}
    for entry in entries:
        key = next((k for k in _entry_keys(entry) if k in rows_of_key), None)
        parent = _RECONSTRUCTION.match(entry["id"])
        if key is None and parent and parent["scan"] in rows_of_key:
            key = parent["scan"]  # CT-RATE reconstruction `<scan>_<n>`
        if key is not None:
            volumes_of_key.setdefault(key, []).append(entry)

    by_volume: dict[str, dict] = {}
    progress = Progress(len(volumes_of_key), "reports")
    for key, key_entries in volumes_of_key.items():
        used = None
        for line_no, row in rows_of_key[key]:
            if used is not None:
                skipped.append({"row": line_no, "report_id": str(row[columns.id]),
                                "reason": f"duplicate report for volume {key_entries[0]['id']} (row {used} is used)"})
                continue
            try:
                fields = report_fields(row, columns)
            except ValueError as e:  # ReportError included
                skipped.append({"row": line_no, "report_id": str(row[columns.id]), "reason": str(e)})
                continue
            used = line_no
            row_split = str(row[columns.split]) if columns.split and row.get(columns.split) else None
            for entry in key_entries:
                record = _volume_fields(entry)
                by_volume[entry["id"]] = {**record, "split": record["split"] or row_split, **fields}
        progress.advance(1, key)
    progress.close()
    unmatched = sum(len(key_rows) for key, key_rows in rows_of_key.items() if key not in volumes_of_key)
    return by_volume, sorted(skipped, key=lambda s: s["row"]), unmatched


@dataclasses.dataclass(frozen=True)
class PseudoJob:
    dataset_dir: str
    entry: dict
    label_names: dict[int, str]
    min_volume_ml: float


def pseudo_record(job: PseudoJob) -> tuple[dict | None, str | None]:
    """(record, None) or (None, reason) for a volume described from its label map; never raises."""
    entry, dataset_dir = job.entry, storage.location(job.dataset_dir)
    try:
        label_map = volume_store.open_volume(storage.join(dataset_dir, entry["label_path"])).read().result()
        image = volume_store.open_volume(storage.join(dataset_dir, entry["path"]))
        if list(label_map.shape) != list(entry["shape"]) or list(image.shape) != list(entry["shape"]):
            raise ValueError(f"label map {list(label_map.shape)} / image {list(image.shape)} differ from the "
                             f"manifest shape {entry['shape']}")
        _, midline_x_mm = slices.body_centre(image, entry["shape"], entry["spacing"])
        parsed, finding_labels = pseudo_reports.pseudo_report(label_map, entry["spacing"], job.label_names,
                                                       midline_x_mm=midline_x_mm, min_volume_ml=job.min_volume_ml)
    except Exception as e:  # a batch job reports a bad volume and carries on (house rules)
        return None, f"{entry['label_path']}: {type(e).__name__}: {e}"
    return {**_volume_fields(entry), "source": "pseudo", "report_id": None, "findings": parsed.findings,
            "findings_sections": [list(s) for s in parsed.findings_sections], "sections": parsed.sections,
            "structured": "label map", "finding_labels": finding_labels}, None


def _pseudo_record_star(job: PseudoJob) -> tuple[dict | None, str | None]:
    return pseudo_record(job)  # module level, so spawned workers can unpickle it


def _label_names_for(entry: dict, given: dict[int, str] | None) -> tuple[dict[int, str], bool]:
    """(names, found): --label-names, else labels.json beside the source label map, else none."""
    if given is not None:
        return given, True
    source = entry.get("label_source")
    if not source:
        return {}, False
    if storage.is_url(source):
        beside = storage.join(source.rsplit("/", 1)[0], "labels.json")
        present = storage.read_bytes(beside) is not None
    else:
        beside = pathlib.Path(source).parent / "labels.json"
        present = beside.is_file()
    if present:
        try:
            return read_label_names(beside), True
        except FatalError as e:  # one bad labels.json costs that volume its names, not the run
            outputs.report(f"note: {e}")
    return {}, False


# --- the run ---------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    if args.records_per_shard < 1:
        raise FatalError(f"--records-per-shard {args.records_per_shard}: need at least 1")
    if args.workers < 1:
        raise FatalError(f"--workers {args.workers}: need at least 1")
    dataset_dir, output = (p if storage.is_url(p) else p.resolve() for p in (args.dataset, args.output))
    with storage.Mirror(dataset_dir, (volume_store.MANIFEST_NAME,), required=(volume_store.MANIFEST_NAME,)) as mirror:
        entries = volume_store.read_manifest(mirror.local)
        manifest_sha256 = file_sha256(mirror.local / volume_store.MANIFEST_NAME)
    if not entries:
        raise FatalError(f"{storage.join(dataset_dir, volume_store.MANIFEST_NAME)}: no volumes")
    outputs.check_output(output, args.overwrite, kind="reports dir", index_file=report_records.INDEX_FILE,
                         index_format=report_records.REPORTS_FORMAT, error=FatalError)
    given_names = read_label_names(args.label_names) if args.label_names else None

    committed = {e["id"]: storage.exists(storage.join(dataset_dir, e["path"], "zarr.json")) for e in entries}
    skipped_volumes = [{"volume_id": e["id"], "reason": f"{e['path']}: volume array missing"}
                       for e in entries if not committed[e["id"]]]
    present = [e for e in entries if committed[e["id"]]]
    by_volume: dict[str, dict] = {}
    skipped_rows: list[dict] = []
    unmatched = 0
    columns = None
    if args.reports is not None:
        with storage.local_copy(args.reports) as local:
            rows, names = read_rows(local)
            reports_sha256 = file_sha256(local)
        columns = resolve_columns(args, names, rows)
        by_volume, skipped_rows, unmatched = join_reports(rows, present, columns)
        for row in skipped_rows:
            outputs.report(f"skipped {args.reports}:{row['row']} ({row['report_id'] or 'no id'}): {row['reason']}")

    jobs, unnamed = [], 0
    for entry in present:
        if entry["id"] in by_volume:
            continue
        if not entry.get("label_path"):
            skipped_volumes.append({"volume_id": entry["id"], "reason": "no report and no label map"})
            continue
        names, found = _label_names_for(entry, given_names)
        unnamed += not found
        jobs.append(PseudoJob(str(dataset_dir), entry, names, args.min_volume_ml))
    if unnamed:
        outputs.report(f"note: {unnamed} label map(s) without label names (no --label-names, no labels.json "
                       f"beside the source label map): their structures are called 'label N'")

    progress = Progress(len(jobs), "pseudo-reports")
    for job, (record, error) in zip(jobs, outputs.ordered_map(_pseudo_record_star, jobs, args.workers,
                                                              args.pipeline_args, "reports")):
        if error is None:
            by_volume[job.entry["id"]] = record
        else:
            skipped_volumes.append({"volume_id": job.entry["id"], "reason": error})
        progress.advance(1, job.entry["id"])
    progress.close()
    for volume in skipped_volumes:
        outputs.report(f"skipped volume {volume['volume_id']}: {volume['reason']}")

    ordered = [by_volume[e["id"]] for e in entries if e["id"] in by_volume]
    if not ordered:
        raise FatalError(f"no record written: {len(skipped_rows)} report row(s) and {len(skipped_volumes)} "
                         f"volume(s) skipped, {unmatched} report row(s) match no volume of {dataset_dir}")
    splits = sorted({report_records.split_key(r["split"]) for r in ordered})
    pools = {key: report_rules.build_positive_pool([r for r in ordered if report_records.split_key(r["split"]) == key])
             for key in splits}

    with outputs.staged_dir(output, report_records.INDEX_FILE) as tmp:
        writer = outputs.ShardWriter(tmp, args.records_per_shard, SHARD_PREFIX)
        for record in ordered:
            writer.write(report_records.encode_report(record))
        shards = writer.finish()
        index = {
            "format": report_records.REPORTS_FORMAT, "shards": shards, "num_records": len(ordered),
            "dataset": str(dataset_dir), "manifest_sha256": manifest_sha256,
            "reports_file": str(args.reports if storage.is_url(args.reports) else args.reports.resolve())
            if args.reports else None,
            "reports_sha256": reports_sha256 if args.reports else None,
            "columns": dataclasses.asdict(columns) if columns else None,
            "label_names_file": str(args.label_names if storage.is_url(args.label_names)
                                    else args.label_names.resolve()) if args.label_names else None,
            "counts": {source: sum(r["source"] == source for r in ordered) for source in ("report", "pseudo")},
            "splits": {key: sum(report_records.split_key(r["split"]) == key for r in ordered) for key in splits},
            "sections": sorted({name for r in ordered for name in r["sections"]}),
            "finding_names": sorted({name for r in ordered for name in r["finding_labels"]}),
            "pool_file": report_records.POOL_FILE,
            "unmatched_report_rows": unmatched,
            "volumes": [{"volume_id": r["volume_id"], "path": r["path"], "label_path": r["label_path"],
                         "split": r["split"], "source": r["source"]} for r in ordered],
            "skipped_rows": skipped_rows, "skipped_volumes": skipped_volumes,
            "provenance": volume_store.provenance([e for e in entries if e["id"] in by_volume]),
        }
        (tmp / report_records.POOL_FILE).write_text(json.dumps(pools, indent=1, ensure_ascii=False) + "\n", "utf-8")
        (tmp / report_records.INDEX_FILE).write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", "utf-8")

    print(f"reports: {len(ordered)} records ({index['counts']['report']} from reports, {index['counts']['pseudo']} "
          f"pseudo-reports) -> {output}; {len(skipped_rows)} report row(s) and {len(skipped_volumes)} volume(s) "
          f"skipped; {unmatched} report row(s) match no volume")
    return EXIT_SKIPPED if skipped_rows or skipped_volumes else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = outputs.ExitOneParser(
        prog="python -m data_prep.reports", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, type=storage.location, metavar="DATASET_DIR",
                        help="ingested dataset (manifest.jsonl), local or gs://")
    parser.add_argument("--output", required=True, type=storage.location, metavar="DIR",
                        help="reports dir to create, local or gs://")
    parser.add_argument("--reports", type=storage.location, metavar="FILE",
                        help="reports, .csv or .jsonl (default: none, every volume gets a pseudo-report)")
    parser.add_argument("--id-column", help=f"column with the volume id or file name (default: the first of "
                                            f"{', '.join(ID_COLUMNS)})")
    parser.add_argument("--text-column", help=f"column with the report text (default: the first of "
                                              f"{', '.join(TEXT_COLUMNS)})")
    parser.add_argument("--findings-column", help="column with structured findings JSON {section: "
                                                  "{positive_findings: [...], negative_findings: [...]}} "
                                                  f"(default: {', '.join(FINDINGS_COLUMNS)} if present)")
    parser.add_argument("--label-columns", default="auto", metavar="auto|none|COL,COL",
                        help="0/1 columns kept as finding labels for zero-shot evaluation (default auto: every "
                             "other column whose values are all 0 or 1)")
    parser.add_argument("--label-names", type=storage.location, metavar="FILE",
                        help="label value -> structure name for pseudo-reports: CSV 'value,name,...' (e.g. "
                             "TotalSegmentator's ts_total_classes.csv) or JSON {value: name} (default: labels.json "
                             "beside each source label map)")
    parser.add_argument("--min-volume-ml", type=float, default=0.1,
                        help="pseudo-reports ignore labels smaller than this (default %(default)s ml)")
    parser.add_argument("--records-per-shard", type=int, default=4096, help="records per shard (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="label maps read in parallel (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing reports dir at --output")
    beam.add_runner_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = beam.parse_args(build_parser(), argv)
    # ValueError, OSError: also a corrupt manifest.
    return outputs.run_tool("reports", lambda: run(args), (FatalError, ValueError, OSError),
                            "nothing was written to --output")


if __name__ == "__main__":
    sys.exit(main())
