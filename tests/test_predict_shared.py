"""Several hosts on one shared output folder: one ledger file per host, no WAL, claim files, stale takeover."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import atomic
from pipeline.errors import ConfigError
from pipeline.predict.cases import slurm_shard
from pipeline.predict.ledger import (
    CLAIMS_DIR,
    LEDGER_DIR,
    LEDGER_FILE,
    filesystem_type,
    read_case_rows,
    resolve_ledger_mode,
    sha256_file,
)
from pipeline.synthetic.phantoms import PhantomOptions

from helpers.predict import SMALL_PHANTOM, write_phantom_nifti, write_small_model

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
server:/export /mnt/shared nfs4 rw,relatime,vers=4.2 0 0
//nas/share /mnt/smb\\040share cifs rw 0 0
sshfs#me@host: /mnt/remote fuse.sshfs rw 0 0
tmpfs /mnt/shared/tmp tmpfs rw 0 0
"""


def test_filesystem_type_is_the_longest_mount_point_holding_the_path():
    assert filesystem_type(Path("/mnt/shared/batch/out"), MOUNTS) == "nfs4"
    assert filesystem_type(Path("/mnt/shared/tmp/x"), MOUNTS) == "tmpfs"
    assert filesystem_type(Path("/mnt/smb share/out"), MOUNTS) == "cifs"  # octal-escaped space
    assert filesystem_type(Path("/mnt/sharedother"), MOUNTS) == "ext4"  # a prefix of the name is not inside
    assert filesystem_type(Path("/mnt/remote/a"), MOUNTS) == "fuse.sshfs"


def test_ledger_mode_follows_the_file_system_unless_set(tmp_path):
    assert resolve_ledger_mode(tmp_path, "shared")[0] == "shared"
    assert resolve_ledger_mode(tmp_path, "local")[0] == "local"
    mode, why = resolve_ledger_mode(tmp_path, "auto")  # the test folder is on a local disk here
    assert mode == ("shared" if filesystem_type(tmp_path).startswith(("nfs", "cifs", "fuse.")) else "local"), why
    assert filesystem_type(tmp_path) in why


def test_slurm_array_gives_the_shard(monkeypatch):
    # SLURM's launcher variables, as sbatch --array=3-6 sets them for its second task
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert slurm_shard() == (1, 4)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    with pytest.raises(ConfigError, match="SLURM job array"):
        slurm_shard()


def _predict(model, inputs, out, host, *extra, stale_minutes=30.0, mode="shared"):
    return [sys.executable, "-m", "pipeline", "predict", "--model", str(model), "--input", str(inputs),
            "--output", str(out), "--set", f"predict.ledger_mode={mode}", "--set", f"predict.host_name={host}",
            "--set", f"predict.stale_minutes={stale_minutes}", "--set", "predict.outputs.seg_nrrd=false", *extra]


def _ledger_files(out: Path) -> list[Path]:
    return sorted((out / LEDGER_DIR).glob("*.sqlite"))


def _assert_no_wal(out: Path) -> None:
    assert not (out / LEDGER_FILE).exists()
    assert not list(out.rglob("*-wal")) and not list(out.rglob("*-shm"))
    for path in _ledger_files(out):
        with sqlite3.connect(str(path)) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete", path


def _done_rows(out: Path) -> dict[str, list[tuple[str, int]]]:
    """case id -> [(ledger file, attempts)] of every row that says done."""
    done: dict[str, list[tuple[str, int]]] = {}
    for path in _ledger_files(out):
        with sqlite3.connect(str(path)) as db:  # not read-only: a killed writer's hot journal is rolled back
            for case_id, attempts in db.execute("SELECT case_id, attempts FROM cases WHERE status = 'done'"):
                done.setdefault(case_id, []).append((path.name, attempts))
    return done


@pytest.mark.slow
def test_four_hosts_work_through_one_folder_each_case_done_once(tmp_path):
    model = write_small_model(tmp_path / "model")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n in range(12):
        write_phantom_nifti(inputs / f"case{n:02d}.nii.gz", seed=100 + n, options=SMALL_PHANTOM)
    out = tmp_path / "out"
    # every host sees every case (no --shard): only the claim files keep two hosts off one case
    processes = [subprocess.Popen(_predict(model, inputs, out, f"node{k}"), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for k in range(4)]
    for process in processes:
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-2000:]
    done = _done_rows(out)
    assert sorted(done) == [f"case{n:02d}" for n in range(12)]
    assert all(len(rows) == 1 and rows[0][1] == 1 for rows in done.values()), done  # once, by one host
    assert len(_ledger_files(out)) == 4
    _assert_no_wal(out)
    assert not list((out / CLAIMS_DIR).iterdir())  # every claim released
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["ok"] == 12 and report["ledger"]["mode"] == "shared"
    assert len(report["ledger"]["files"]) == 4
    # any shard can rebuild the merged report at any time
    rebuilt = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--report-only", str(out)],
                             capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stderr
    again = json.loads((out / "report.json").read_text())
    assert again["counts"]["ok"] == 12 and {c["status"] for c in again["cases"]} == {"ok"}
    assert "case00" in (out / "report.csv").read_text()


@pytest.mark.slow
def test_a_node_killed_mid_case_leaves_a_stale_claim_that_a_rerun_takes_over(tmp_path):
    model = write_small_model(tmp_path / "model")
    inputs = tmp_path / "in"
    inputs.mkdir()
    big = PhantomOptions(shape=112, slices=48, inplane_spacing_min=1.0, inplane_spacing_max=1.0,
                         slice_spacing_min=1.5, slice_spacing_max=1.5, noise_hu=5.0)
    for n in range(3):
        write_phantom_nifti(inputs / f"case{n}.nii.gz", seed=40 + n, options=big)
    out = tmp_path / "out"
    node_a = subprocess.Popen(_predict(model, inputs, out, "nodeA"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    claims = out / CLAIMS_DIR
    try:
        while time.monotonic() < deadline:
            held = list(claims.glob("*.claim")) if claims.is_dir() else []
            if held and any(json.loads(p.read_text() or "{}").get("host") == "nodeA" for p in held if p.stat().st_size):
                break
            if node_a.poll() is not None:
                raise AssertionError(f"node A ended before claiming a case: {node_a.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        else:
            raise AssertionError("node A claimed no case within 300 s")
        os.kill(node_a.pid, signal.SIGKILL)  # power loss in the middle of a case
    finally:
        node_a.wait(timeout=30)
    orphan = json.loads(next(claims.glob("*.claim")).read_text())["case_id"]

    # another host cannot tell a dead node from a slow one until the claim is stale, and then only when asked
    time.sleep(1.5)
    first = subprocess.run(_predict(model, inputs, out, "nodeB", stale_minutes=0.02), capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 3, first.stderr[-2000:]  # the orphan is not finished: not a success
    assert "--take-stale" in first.stderr
    assert orphan not in _done_rows(out)

    second = subprocess.run(_predict(model, inputs, out, "nodeB", "--take-stale", stale_minutes=0.02),
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    done = _done_rows(out)
    assert sorted(done) == ["case0", "case1", "case2"]
    assert all(len(rows) == 1 for rows in done.values()), done  # nothing done twice
    # taken over by node B (its attempt count is 2 when node A's 'running' row was committed before the kill, 1
    # when the kill rolled that transaction back)
    assert done[orphan][0][0] == "nodeB-all.sqlite" and done[orphan][0][1] in (1, 2)
    assert not list(out.rglob(f"*{atomic.PARTIAL_MARK}*")) and not list(claims.iterdir())
    for row in read_case_rows(out):
        for entry in row.outputs.values():
            assert sha256_file(out / entry["path"]) == entry["sha256"]
    _assert_no_wal(out)


def _nfs_available() -> str:
    if os.geteuid() != 0:
        return "mounting NFS needs root"
    filesystems = Path("/proc/filesystems").read_text() if Path("/proc/filesystems").is_file() else ""
    for name in ("nfsd", "nfs4"):  # kernel modules are not loadable in every VM; look at what the kernel has
        if name not in filesystems.split():
            return f"this kernel has no {name} file system (/proc/filesystems), so no NFS can run on loopback"
    for tool in ("exportfs", "rpc.nfsd", "mount.nfs"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            return f"{tool} is missing (Debian packages nfs-kernel-server and nfs-common)"
    return ""


@pytest.mark.slow
def test_shared_ledger_on_a_real_nfs_mount(tmp_path):
    reason = _nfs_available()
    if reason:
        pytest.skip(f"no loopback NFS here: {reason}")
    export, mount = tmp_path / "export", tmp_path / "mnt"
    export.mkdir()
    mount.mkdir()
    subprocess.run(["exportfs", "-o", "rw,sync,no_root_squash,insecure", f"127.0.0.1:{export}"], check=True)
    try:
        subprocess.run(["mount", "-t", "nfs", "-o", "vers=4.2,nolock", f"127.0.0.1:{export}", str(mount)],
                       check=True, timeout=60)
        try:
            assert filesystem_type(mount).startswith("nfs")
            model = write_small_model(tmp_path / "model")
            inputs = tmp_path / "in"
            inputs.mkdir()
            for n in range(8):
                write_phantom_nifti(inputs / f"case{n}.nii.gz", seed=200 + n, options=SMALL_PHANTOM)
            out = mount / "out"
            # auto: the mount itself must make the ledger shared
            processes = [subprocess.Popen(_predict(model, inputs, out, f"node{k}", mode="auto"),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for k in range(4)]
            for process in processes:
                _, stderr = process.communicate(timeout=900)
                assert process.returncode == 0, stderr[-2000:]
            done = _done_rows(out)
            assert len(done) == 8 and all(len(rows) == 1 for rows in done.values())
            _assert_no_wal(out)
        finally:
            subprocess.run(["umount", "-f", str(mount)], timeout=60)
    finally:
        subprocess.run(["exportfs", "-u", f"127.0.0.1:{export}"])
