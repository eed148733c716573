"""The overnight batch: bad cases are reported and skipped, the ledger resumes and verifies, shards partition."""
from __future__ import annotations

import csv
import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline import atomic
from pipeline.config import Config
from pipeline.errors import ConfigError, InputError
from pipeline.geometry import Volume
from pipeline.predict.cases import Case, discover_cases, resolve_shard, select_shard
from pipeline.predict.ledger import LEDGER_FILE, Ledger, process_start_time, sha256_file
from pipeline.predict.stage import EXIT_OK, EXIT_SOME_FAILED, run_predict
from pipeline.synthetic.phantoms import make_phantom
from pipeline.volume_io import save_nifti

from helpers.predict import SMALL_PHANTOM, write_phantom_nifti, write_small_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_small_model(tmp_path_factory.mktemp("model") / "model")


def _config() -> Config:
    cfg = Config()
    cfg.predict.outputs.thumbnails = False
    return cfg


def _ledger_rows(folder: Path) -> dict:
    with sqlite3.connect(str(folder / LEDGER_FILE)) as db:
        db.row_factory = sqlite3.Row
        return {row["case_id"]: dict(row) for row in db.execute("SELECT * FROM cases")}


def _good_inputs(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_phantom_nifti(folder / f"case{n:02d}_0000.nii.gz", seed=n) for n in range(count)]


def test_ten_cases_three_broken_finish_the_seven_and_report_the_three(tmp_path: Path, model_dir: Path):
    inputs = tmp_path / "in"
    good = _good_inputs(inputs, 7)
    data = good[0].read_bytes()
    (inputs / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    (inputs / "zero.nii.gz").write_bytes(b"")
    phantom = make_phantom(11, SMALL_PHANTOM)
    display = np.clip(phantom.image.array / 4 + 128, 0, 255).astype(np.uint8)  # an 8-bit screenshot, not HU
    save_nifti(Volume(display, phantom.image.affine), inputs / "display.nii.gz")
    out = tmp_path / "out"

    result = run_predict(_config(), model_dir, inputs, out)

    assert result.exit_code == EXIT_SOME_FAILED == 3
    assert result.report["status"] == "failed"
    assert result.report["counts"]["ok"] == 7 and result.report["counts"]["failed"] == 3
    cases = {c["id"]: c for c in result.report["cases"]}
    assert {cid for cid, c in cases.items() if c["status"] == "failed"} == {"truncated", "zero", "display"}
    assert "could not be read" in cases["truncated"]["error"] and "truncated.nii.gz" in cases["truncated"]["error"]
    assert "empty (0 bytes)" in cases["zero"]["error"]
    assert "HU" in cases["display"]["error"]
    for n in range(7):
        case_id = f"case{n:02d}"
        assert cases[case_id]["status"] == "ok"
        label = nib.load(str(out / f"{case_id}.nii.gz"))
        source = nib.load(str(good[n]))
        assert label.shape == source.shape and np.allclose(label.affine, source.affine)
        assert label.get_data_dtype() == np.uint8
        for suffix in (".seg.nrrd", ".labels.json", ".provenance.json"):
            assert (out / f"{case_id}{suffix}").is_file()
    assert not list(out.rglob(f"*{atomic.PARTIAL_MARK}*"))
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 10 and {r["status"] for r in rows} == {"done", "failed"}
    page = (out / "report.html").read_text()
    assert all(case_id in page for case_id in cases) and "http" not in page.replace("http-equiv", "")
    ledger = _ledger_rows(out)
    assert all(ledger[f"case{n:02d}"]["status"] == "done" for n in range(7))
    assert ledger["zero"]["status"] == "failed" and ledger["zero"]["attempts"] == 1

    # a rerun skips what is done (checksums verified) and does not retry failures by default
    again = run_predict(_config(), model_dir, inputs, out)
    assert again.exit_code == 3 and again.report["counts"]["resumed"] == 7
    assert again.report["counts"]["done_this_run"] == 0
    assert all(row["attempts"] == 1 for row in _ledger_rows(out).values())

    # a changed or deleted output is redone; a fixed input is retried only with retry_failed
    with open(out / "case01.nii.gz", "ab") as handle:
        handle.write(b"tampered")
    (out / "case02.seg.nrrd").unlink()
    write_phantom_nifti(inputs / "zero.nii.gz", seed=12)
    third = run_predict(_config(), model_dir, inputs, out)
    rows3 = _ledger_rows(out)
    assert rows3["case01"]["attempts"] == 2 and rows3["case02"]["attempts"] == 2 and rows3["case03"]["attempts"] == 1
    assert rows3["zero"]["status"] == "failed" and rows3["zero"]["attempts"] == 1
    assert third.exit_code == 3
    entry = json.loads(rows3["case01"]["outputs"])["labels"]
    assert sha256_file(out / entry["path"]) == entry["sha256"]
    fourth = run_predict(_config(), model_dir, inputs, out, retry_failed=True)
    rows4 = _ledger_rows(out)
    assert rows4["zero"]["status"] == "done" and rows4["zero"]["attempts"] == 2
    assert rows4["truncated"]["status"] == "failed" and rows4["truncated"]["attempts"] == 2
    assert fourth.exit_code == 3 and fourth.report["counts"]["ok"] == 8


def test_all_good_exits_zero_and_changed_settings_redo_cases(tmp_path: Path, model_dir: Path):
    inputs = tmp_path / "in"
    _good_inputs(inputs, 2)
    out = tmp_path / "out"
    assert run_predict(_config(), model_dir, inputs, out).exit_code == EXIT_OK
    cfg = _config()
    cfg.predict.postprocess.keep_largest_component = ["liver"]  # changes what is written
    result = run_predict(cfg, model_dir, inputs, out)
    assert result.exit_code == 0 and result.report["counts"]["done_this_run"] == 2
    cfg.predict.batch_size = 1  # speed only: nothing is redone
    assert run_predict(cfg, model_dir, inputs, out).report["counts"]["resumed"] == 2


def test_bad_options_and_inputs_stop_before_the_batch(tmp_path: Path, model_dir: Path):
    inputs = tmp_path / "in"
    _good_inputs(inputs, 1)
    with pytest.raises(InputError, match="does not exist"):
        run_predict(_config(), model_dir, tmp_path / "missing", tmp_path / "out")
    with pytest.raises(InputError, match="model.json"):
        run_predict(_config(), tmp_path, inputs, tmp_path / "out")
    with pytest.raises(ConfigError, match="shard"):
        run_predict(_config(), model_dir, inputs, tmp_path / "out", shard=(2, 2))
    cfg = _config()
    cfg.predict.postprocess.fill_holes = ["lung"]  # checked against the model's labels once it is loaded
    with pytest.raises(ConfigError, match="lung"):
        run_predict(cfg, model_dir, inputs, tmp_path / "out2")
    assert _ledger_rows(tmp_path / "out2")["case00"]["status"] == "pending"  # handed back, not failed
    (model_dir.parent / "broken").mkdir(exist_ok=True)
    broken = write_small_model(model_dir.parent / "broken")
    (broken / "fold_0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="state_dict"):
        run_predict(_config(), broken, inputs, tmp_path / "out3")


def test_shards_partition_the_sorted_cases_exactly(tmp_path: Path):
    cases = [Case(f"c{n:02d}", f"/x/c{n:02d}.nii.gz") for n in range(10)]
    for shard_by in ("index", "hash"):
        for count in (1, 2, 3, 4):
            parts = [select_shard(cases, (i, count), shard_by) for i in range(count)]
            ids = [c.case_id for part in parts for c in part]
            assert sorted(ids) == [c.case_id for c in cases] and len(ids) == len(set(ids))
    assert [c.case_id for c in select_shard(cases, (1, 3))] == ["c01", "c04", "c07"]
    assert select_shard(cases, None) == cases


def test_torchrun_rank_and_world_size_select_the_shard(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert resolve_shard(None) == (2, 3)
    assert resolve_shard((0, 2)) == (0, 2)  # an explicit --shard wins
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_shard(None) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="RANK"):
        resolve_shard(None)


def test_two_shards_share_one_output_folder(tmp_path: Path, model_dir: Path):
    inputs = tmp_path / "in"
    _good_inputs(inputs, 4)
    out = tmp_path / "out"
    first = run_predict(_config(), model_dir, inputs, out, shard=(0, 2))
    assert first.exit_code == 0 and first.report["counts"]["this_shard"] == 2
    assert first.report["counts"]["not_finished"] == 2  # the other shard's cases are listed as pending
    second = run_predict(_config(), model_dir, inputs, out, shard=(1, 2))
    assert second.exit_code == 0 and second.report["counts"]["ok"] == 4
    rows = _ledger_rows(out)
    assert {cid: r["shard"] for cid, r in rows.items()} == {"case00": "0/2", "case01": "1/2", "case02": "0/2",
                                                           "case03": "1/2"}


def test_inputs_from_a_list_file_a_single_file_and_id_rules(tmp_path: Path):
    folder = tmp_path / "scans"
    paths = _good_inputs(folder, 3)
    other = tmp_path / "other"
    other.mkdir()
    twin = write_phantom_nifti(other / "case00.nii.gz", seed=20)  # same case id as scans/case00_0000
    listing = tmp_path / "cases.txt"
    listing.write_text("# overnight list\nscans/case02_0000.nii.gz\n\n  scans/case01_0000.nii.gz  # second\n"
                       "other/case00.nii.gz\nscans/case00_0000.nii.gz\n")
    found = discover_cases(listing)
    ids = [c.case_id for c in found.cases]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert {c.case_id for c in found.cases if c.path in (paths[1], paths[2])} == {"case01", "case02"}
    twins = [c for c in found.cases if c.case_id.startswith("case00")]
    assert len(twins) == 2 and all(c.case_id != "case00" for c in twins) and {c.path for c in twins} == {paths[0],
                                                                                                        twin}
    single = discover_cases(paths[1])
    assert [c.case_id for c in single.cases] == ["case01"]
    (tmp_path / "bad.txt").write_text("scans/nothing.nii.gz\n")
    refused = discover_cases(tmp_path / "bad.txt").cases  # a bad line is a failed case, not a failed batch
    assert [c.case_id for c in refused] == ["bad-line1"]
    assert "line 1" in refused[0].error and "does not exist" in refused[0].error


def test_a_case_left_running_by_a_dead_process_is_redone_but_not_a_live_ones(tmp_path: Path, model_dir: Path):
    inputs = tmp_path / "in"
    _good_inputs(inputs, 2)
    out = tmp_path / "out"
    ledger = Ledger(out)
    ledger.register([("case00", str(inputs / "case00_0000.nii.gz")), ("case01", str(inputs / "case01_0000.nii.gz"))])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert process_start_time(dead.pid) is None
    with sqlite3.connect(str(out / LEDGER_FILE)) as db:
        db.execute("UPDATE cases SET status='running', host=?, pid=?, proc_start='1', run_id='gone', attempts=1 "
                   "WHERE case_id='case00'", (socket.gethostname(), dead.pid))
        # case01 is held by a live process (this test process, another run id)
        db.execute("UPDATE cases SET status='running', host=?, pid=?, proc_start=?, run_id='alive', attempts=1 "
                   "WHERE case_id='case01'", (socket.gethostname(), os.getpid(), process_start_time(os.getpid())))
    (out / f".case00.nii.gz{atomic.PARTIAL_MARK}abc.nii.gz").write_bytes(b"half written")
    (out / f".case01.nii.gz{atomic.PARTIAL_MARK}def.nii.gz").write_bytes(b"being written")
    ledger.close()
    result = run_predict(_config(), model_dir, inputs, out)
    rows = _ledger_rows(out)
    assert rows["case00"]["status"] == "done" and rows["case00"]["attempts"] == 2
    assert rows["case01"]["status"] == "running" and rows["case01"]["run_id"] == "alive"
    assert not (out / f".case00.nii.gz{atomic.PARTIAL_MARK}abc.nii.gz").exists()
    assert (out / f".case01.nii.gz{atomic.PARTIAL_MARK}def.nii.gz").exists()  # its live writer keeps it
    assert result.exit_code == 0 and result.report["counts"]["not_finished"] == 1


def test_a_four_dimensional_or_two_dimensional_file_is_refused_with_a_clear_message(tmp_path: Path):
    from pipeline.predict.cases import read_case

    four_d = tmp_path / "dynamic.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), dtype=np.int16) - 1000, np.eye(4)), str(four_d))
    flat = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), dtype=np.int16) - 1000, np.eye(4)), str(flat))
    for path in (four_d, flat):
        case = discover_cases(path).cases[0]
        with pytest.raises(InputError, match="3D"):
            read_case(case)
