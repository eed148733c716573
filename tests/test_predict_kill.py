"""kill -9 in the middle of a batch, then rerun: every output valid and verified, nothing partial, nothing lost."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline import atomic
from pipeline.config import Config
from pipeline.predict.ledger import LEDGER_FILE, sha256_file
from pipeline.predict.stage import run_predict
from pipeline.synthetic.phantoms import PhantomOptions

from helpers.predict import write_phantom_nifti, write_small_model

REPO = Path(__file__).resolve().parents[1]
# big enough that a case takes a few seconds on a loaded CPU, so the kill lands mid-batch
CASE_PHANTOM = PhantomOptions(shape=112, slices=48, inplane_spacing_min=1.0, inplane_spacing_max=1.0,
                              slice_spacing_min=1.5, slice_spacing_max=1.5, noise_hu=5.0)
PLAN = {"target_spacing": [1.2, 1.2, 1.5], "intensity": {"mode": "window", "low": -200.0, "high": 300.0},
        "crop_to_body": True, "body_threshold_hu": -500.0}


def _statuses(out: Path) -> dict[str, str]:
    if not (out / LEDGER_FILE).is_file():
        return {}
    try:
        with sqlite3.connect(str(out / LEDGER_FILE), timeout=5) as db:
            return dict(db.execute("SELECT case_id, status FROM cases").fetchall())
    except sqlite3.OperationalError:  # the schema is being created
        return {}


def test_kill_minus_nine_mid_batch_then_rerun_resumes_cleanly(tmp_path: Path):
    model = write_small_model(tmp_path / "model", plan=PLAN)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n in range(4):
        write_phantom_nifti(inputs / f"case{n}.nii.gz", seed=30 + n, options=CASE_PHANTOM)
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from pipeline.config import Config
        from pipeline.predict.stage import run_predict
        run_predict(Config(), Path({str(model)!r}), Path({str(inputs)!r}), Path({str(out)!r}))
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            statuses = _statuses(out)
            if "done" in statuses.values():
                break
            if process.poll() is not None:
                raise AssertionError(f"the batch ended before a case was done: {process.stderr.read().decode()}")
            time.sleep(0.05)
        else:
            raise AssertionError("no case finished within 240 s")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    before = _statuses(out)
    done_before = {case for case, status in before.items() if status == "done"}
    assert done_before and len(done_before) < 4, before  # killed mid-batch
    interrupted = {case for case, status in before.items() if status == "running"}

    result = run_predict(Config(), model, inputs, out)

    assert result.exit_code == 0
    assert not list(out.rglob(f"*{atomic.PARTIAL_MARK}*"))
    with sqlite3.connect(str(out / LEDGER_FILE)) as db:
        db.row_factory = sqlite3.Row
        rows = {row["case_id"]: dict(row) for row in db.execute("SELECT * FROM cases")}
    assert {row["status"] for row in rows.values()} == {"done"} and len(rows) == 4
    for case_id, row in rows.items():
        assert row["attempts"] == (1 if case_id in done_before else 2 if case_id in interrupted else 1)
        for entry in json.loads(row["outputs"]).values():
            assert sha256_file(out / entry["path"]) == entry["sha256"]
        label = nib.load(str(out / f"{case_id}.nii.gz"))
        source = nib.load(str(inputs / f"{case_id}.nii.gz"))
        assert label.shape == source.shape and np.allclose(label.affine, source.affine)
        np.asarray(label.dataobj)  # decompresses completely: the file is whole
    assert result.report["counts"]["resumed"] == len(done_before)
