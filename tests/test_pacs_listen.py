"""``ctseg listen`` as a real process: storescu and pynetdicom senders, Orthanc as the destination, kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers.pacs import CTSEG_AET, ORTHANC_AET, Orthanc, free_port, require_orthanc, wait_until, write_export

REPO = Path(__file__).resolve().parents[1]
SENDER_AET = "STORESCU"


def write_config(path: Path, orthanc: Orthanc, **listen) -> Path:
    config = {
        "workers": 1,
        "predict": {"precision": "fp32", "send_to": ["orthanc"], "outputs": {"thumbnails": False, "seg_nrrd": False}},
        "pacs": {"ae_title": CTSEG_AET, "timeout_seconds": 20.0,
                 "peers": [{"name": "orthanc", "ae_title": ORTHANC_AET, "host": "127.0.0.1",
                            "port": orthanc.dicom_port}],
                 "listen": {"host": "127.0.0.1", "port": orthanc.ctseg_port, "allowed_calling_aes": [SENDER_AET],
                            **listen}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


class Listener:
    """``python -m pipeline listen`` in its own process; always killed at the end."""

    def __init__(self, config: Path, model: Path, out: Path):
        self.args = [sys.executable, "-m", "pipeline", "listen", "-c", str(config), "--model", str(model),
                     "--output", str(out)]
        self.out = out
        self.process = None
        self.log = out.parent / "listen.log"

    def start(self) -> Listener:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.args, cwd=self.out.parent, stdout=log, stderr=subprocess.STDOUT,
                                            env=env)
        wait_until(lambda: self._alive() and self.status().get("state") == "listening", 90, "ctseg listen to accept")
        return self

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"ctseg listen exited with {self.process.returncode}:\n{self.log.read_text()}")
        return True

    def status(self) -> dict:
        try:
            return json.loads((self.out / "listen.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def states(self) -> list[str]:
        return sorted(row["state"] for row in self.status().get("series", []))

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            raise AssertionError("ctseg listen did not stop within the timeout after SIGTERM") from None


@pytest.fixture
def listener_factory(tmp_path):
    made = []

    def make(config: Path, model: Path, out: Path) -> Listener:
        listener = Listener(config, model, out)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        if listener.process is not None and listener.process.poll() is None:
            listener.process.kill()
            listener.process.wait(timeout=30)


def storescu(port: int, files: list[Path], calling: str = SENDER_AET) -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", calling, "-aec", CTSEG_AET, "127.0.0.1", str(port),
                           *[str(f) for f in files]], capture_output=True, text=True, timeout=120)


def test_listen_segments_two_series_sent_by_storescu_and_skips_an_mr(orthanc, model, tmp_path, listener_factory):
    require_orthanc()
    import pydicom

    series = write_export(tmp_path / "export", seeds=(11, 12), mr=True)
    out = tmp_path / "out"
    out.mkdir()
    listener = listener_factory(write_config(tmp_path / "node.yaml", orthanc), model, out).start()
    sent = storescu(orthanc.ctseg_port, series[0] + series[1])
    assert sent.returncode == 0, sent.stderr
    sent = storescu(orthanc.ctseg_port, series[2])
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: listener.states() == ["done", "done", "skipped"], 240, "both CT series segmented, MR skipped")
    rows = {row["modality"]: row for row in listener.status()["series"]}
    assert "MR" in rows["MR"]["reason"], rows["MR"]
    # an AE title not on the allow-list is rejected, and nothing it sends is spooled
    rejected = storescu(orthanc.ctseg_port, series[0][:2], calling="INTRUDER")
    assert rejected.returncode != 0
    assert "reject" in (rejected.stdout + rejected.stderr).lower()
    assert len(listener.status()["series"]) == 3
    assert listener.stop() == 0
    ct_uids = {str(pydicom.dcmread(str(files[0]), stop_before_pixels=True).SeriesInstanceUID) for files in series[:2]}
    referenced = set()
    import io

    for found in orthanc.series_of("SEG"):
        for instance in found["Instances"]:
            ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance)))
            referenced |= {str(item.SeriesInstanceUID) for item in ds.ReferencedSeriesSequence}
    assert referenced == ct_uids
    report = json.loads((out / "report.json").read_text())
    assert [case["status"] for case in report["cases"]] == ["ok", "ok"]
    assert {row["status"] for row in report["sends"]} == {"done"}
    text = (listener.log.read_text() + (out / "report.json").read_text() + (out / "listen.json").read_text())
    assert "DOE" not in text and "PID-99" not in text


def test_listen_killed_mid_series_segments_the_resent_series_once_never_half(orthanc, model, tmp_path,
                                                                           listener_factory):
    """kill -9 with half a series received; after the restart it waits (reported), a resend completes it once."""
    require_orthanc()
    import sqlite3

    import pydicom
    from pynetdicom import AE

    [files] = write_export(tmp_path / "export", seeds=(13,))
    out = tmp_path / "out"
    out.mkdir()
    config = write_config(tmp_path / "node.yaml", orthanc)
    listener = listener_factory(config, model, out).start()
    ae = AE(ae_title=SENDER_AET)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", orthanc.ctseg_port, ae_title=CTSEG_AET)
    assert assoc.is_established
    half = len(files) // 2
    for path in files[:half]:
        assert assoc.send_c_store(pydicom.dcmread(str(path))).Status == 0
    wait_until(lambda: [r["instances"] for r in listener.status().get("series", [])] == [half] or
               _spooled(out) == half, 30, "half the series spooled")
    listener.process.send_signal(signal.SIGKILL)
    listener.process.wait(timeout=30)
    assoc.abort()
    # restarted: the half series is reported incomplete and not segmented, even after the quiet time
    listener = listener_factory(config, model, out).start()
    wait_until(lambda: listener.states() == ["incomplete"], 30, "the half series reported incomplete")
    assert "interrupted" in listener.status()["series"][0]["reason"]
    time.sleep(1.0)
    assert not list(out.glob("*.nii.gz"))
    # the sender sends the whole series again: it is segmented once, from every instance
    sent = storescu(orthanc.ctseg_port, files)
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: listener.states() == ["done"], 180, "the resent series segmented")
    [row] = listener.status()["series"]
    assert row["instances"] == len(files)
    assert listener.stop() == 0
    db = sqlite3.connect(str(out / "ledger.sqlite"))
    assert db.execute("SELECT status, attempts FROM cases").fetchall() == [("done", 1)]
    db.close()
    [seg] = orthanc.series_of("SEG")
    ds = pydicom.dcmread(__import__("io").BytesIO(orthanc.instance_file(seg["Instances"][0])))
    assert len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(files)


def _spooled(out: Path) -> int:
    return len(list((out / "private" / "pacs-spool").glob("s*/*.dcm")))


def test_listen_refuses_to_start_without_an_allow_list(tmp_path, model):
    pytest.importorskip("pynetdicom")
    from pipeline.cli import main

    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"pacs": {"listen": {"port": free_port()}}}))
    code = main(["listen", "-c", str(config), "--model", str(model), "--output", str(tmp_path / "out")])
    assert code == 2


@pytest.mark.slow
def test_a_series_that_grows_after_it_was_segmented_is_segmented_again_from_every_instance(orthanc, model, tmp_path,
                                                                                          listener_factory):
    """A sender that releases after half a series and sends the rest later: the second part redoes the case."""
    require_orthanc()
    import io
    import sqlite3

    import pydicom

    [files] = write_export(tmp_path / "export", seeds=(14,))
    out = tmp_path / "out"
    out.mkdir()
    listener = listener_factory(write_config(tmp_path / "node.yaml", orthanc), model, out).start()
    half = 10  # the rules keep series of at least min_slices (10) images; the phantom has 14
    assert storescu(orthanc.ctseg_port, files[:half]).returncode == 0
    wait_until(lambda: listener.states() == ["done"], 180, "the first part segmented")
    assert storescu(orthanc.ctseg_port, files[half:]).returncode == 0
    wait_until(lambda: listener.states() == ["done"] and listener.status()["series"][0]["instances"] == len(files)
               and len(orthanc.series_of("SEG")) == 2, 180, "the grown series segmented again")
    assert listener.stop() == 0
    db = sqlite3.connect(str(out / "ledger.sqlite"))
    assert db.execute("SELECT status, attempts FROM cases").fetchall() == [("done", 2)]
    db.close()
    counts = sorted(len(pydicom.dcmread(io.BytesIO(orthanc.instance_file(s["Instances"][0])))
                        .ReferencedSeriesSequence[0].ReferencedInstanceSequence) for s in orthanc.series_of("SEG"))
    assert counts == [half, len(files)]


@pytest.mark.slow
def test_quiet_mode_segments_a_series_sent_one_association_per_image_once(orthanc, model, tmp_path,
                                                                         listener_factory):
    require_orthanc()
    import sqlite3

    [files] = write_export(tmp_path / "export", seeds=(15,))
    out = tmp_path / "out"
    out.mkdir()
    config = write_config(tmp_path / "node.yaml", orthanc, complete_on="quiet", quiet_seconds=3.0)
    listener = listener_factory(config, model, out).start()
    for path in files:  # each storescu call is one association with one image
        assert storescu(orthanc.ctseg_port, [path]).returncode == 0
    wait_until(lambda: listener.states() == ["done"], 180, "the series segmented after the quiet time")
    assert listener.status()["series"][0]["instances"] == len(files)
    assert listener.stop() == 0
    db = sqlite3.connect(str(out / "ledger.sqlite"))
    assert db.execute("SELECT status, attempts FROM cases").fetchall() == [("done", 1)]
    db.close()
    assert len(orthanc.series_of("SEG")) == 1


@pytest.mark.slow
def test_listen_with_the_destination_down_segments_records_the_failed_send_and_resends_on_restart(
        orthanc, model, tmp_path, listener_factory):
    require_orthanc()
    [files] = write_export(tmp_path / "export", seeds=(16,))
    out = tmp_path / "out"
    out.mkdir()
    config = write_config(tmp_path / "node.yaml", orthanc)
    orthanc.stop()
    listener = listener_factory(config, model, out).start()
    assert storescu(orthanc.ctseg_port, files).returncode == 0
    wait_until(lambda: listener.states() == ["done"], 180, "the series segmented while the destination is down")
    assert listener.stop() == 0
    report = json.loads((out / "report.json").read_text())
    assert [case["status"] for case in report["cases"]] == ["ok"]
    assert [(row["output"], row["status"]) for row in report["sends"]] == [("dicom_seg", "failed"),
                                                                           ("rtstruct", "failed")]
    orthanc.start()
    listener = listener_factory(config, model, out).start()  # a restart retries the failed send first
    wait_until(lambda: len(orthanc.series_of("SEG")) == 1 and len(orthanc.series_of("RTSTRUCT")) == 1, 60,
               "the SEG and the RTSTRUCT sent after the restart")
    assert listener.stop() == 0
    report = json.loads((out / "report.json").read_text())
    assert [(row["status"], row["attempts"]) for row in report["sends"]] == [("done", 2)] * 2
