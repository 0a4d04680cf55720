"""data_prep.ingest as an Apache Beam pipeline (DirectRunner) on real CT: the same manifest and arrays as the
local path, a corrupt file in the dead-letter report, finished volumes skipped on a re-run.

Beam is an optional extra (about 390 MB with pyarrow); without it these tests skip.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from run_utils import run_cli

from data_prep import ingest
from flexict_jax.data import volume_store as vs

pytest.importorskip("apache_beam", reason="Apache Beam is not installed (pip install 'flexict_jax[beam]')")

BEAM = ["--runner=DirectRunner", "--direct_num_workers=1"]


@pytest.fixture(scope="module")
def inputs(ct_dir, tmp_path_factory):
    """Two real CT volumes (one with its label map) and a truncated copy of a third."""
    raw = tmp_path_factory.mktemp("beam_raw")
    for name in ("ts_example_ct_sm.nii.gz", "ts_example_ct_sm_label.nii.gz", "vtk_headsq.nii.gz"):
        shutil.copy(ct_dir / name, raw / name)
    (raw / "corrupt.nii.gz").write_bytes((ct_dir / "ts_example_ct.nii.gz").read_bytes()[:5000])
    return raw


def _ingest(inputs, output, *extra) -> int:
    return run_cli(ingest.main, ["--input", str(inputs), "--output", str(output), "--spacing", "3",
                                 "--licence", "Apache-2.0", *extra])


def test_direct_runner_equals_the_local_path(inputs, tmp_path, capsys):
    assert _ingest(inputs, tmp_path / "local") == ingest.EXIT_REFUSED
    assert _ingest(inputs, tmp_path / "beam", *BEAM) == ingest.EXIT_REFUSED
    local, beam = vs.read_manifest(tmp_path / "local"), vs.read_manifest(tmp_path / "beam")
    assert [e["id"] for e in beam] == ["ts_example_ct_sm", "vtk_headsq"]
    assert beam == local
    for entry in local:
        for key in ("path", "label_path"):
            if entry[key]:
                a = vs.open_volume(tmp_path / "local" / entry[key]).read().result()
                b = vs.open_volume(tmp_path / "beam" / entry[key]).read().result()
                np.testing.assert_array_equal(a, b)
    (dead,) = [json.loads(line) for line in (tmp_path / "beam" / "dead_letter.jsonl").read_text().splitlines()]
    assert dead["reason"].startswith(f"{inputs / 'corrupt.nii.gz'}: ") and "truncated or corrupt" in dead["reason"]
    assert "refused: " + dead["reason"] in capsys.readouterr().err

    # a re-run skips what the manifest lists; the corrupt file is reported again
    assert _ingest(inputs, tmp_path / "beam", *BEAM) == ingest.EXIT_REFUSED
    assert "0 written, 2 skipped" in capsys.readouterr().out
    assert vs.read_manifest(tmp_path / "beam") == beam


def test_runner_options_without_runner_are_refused(inputs, tmp_path, capsys):
    assert _ingest(inputs, tmp_path / "out", "--direct_num_workers=1") == 1
    assert "runner options need --runner" in capsys.readouterr().err


def test_slices_volume_stats_and_reports_on_direct_runner_equal_the_local_path(inputs, tmp_path):
    from data_prep import reports, slices, volume_stats
    assert _ingest(inputs, tmp_path / "dataset") == ingest.EXIT_REFUSED
    shutil.copytree(tmp_path / "dataset", tmp_path / "dataset_beam")
    assert run_cli(volume_stats.main, ["--dataset", str(tmp_path / "dataset")]) == 0
    assert run_cli(volume_stats.main, ["--dataset", str(tmp_path / "dataset_beam"), *BEAM]) == 0
    assert ((tmp_path / "dataset" / "stats.json").read_text()
            == (tmp_path / "dataset_beam" / "stats.json").read_text())

    # reports: vtk_headsq has neither a report nor a label map, so it is skipped (exit 2) on both paths
    for tool, name, extra, code in ((slices, "slices", ["--size", "64"], 0), (reports, "reports", [], 2)):
        argv = ["--dataset", str(tmp_path / "dataset"), *extra]
        assert run_cli(tool.main, [*argv, "--output", str(tmp_path / f"{name}_local")]) == code
        assert run_cli(tool.main, [*argv, "--output", str(tmp_path / f"{name}_beam"), *BEAM]) == code
        local, beam = sorted((tmp_path / f"{name}_local").iterdir()), sorted((tmp_path / f"{name}_beam").iterdir())
        assert [p.name for p in local] == [p.name for p in beam]
        for a, b in zip(local, beam):  # index, shards (and the reports' positive pool) byte for byte
            assert a.read_bytes() == b.read_bytes(), a.name
