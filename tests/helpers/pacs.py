"""A real Orthanc for the DICOM node tests: started on loopback with a temporary config, always stopped.

(No tests here; pytest collects nothing from this module.)
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.pacs.options import PeerOptions
from pipeline.synthetic.phantoms import PhantomOptions, make_phantom

ORTHANC_AET = "ORTHANC"
CTSEG_AET = "CTSEG"
START_SECONDS = 60.0
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (str(Path("/usr/sbin/Orthanc")) if Path("/usr/sbin/Orthanc").is_file() else None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], bool], seconds: float, what: str, step: float = 0.2) -> None:
    """Poll ``check`` until true; fail the test naming ``what`` after ``seconds`` (bounded in time and count)."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / step) + 2):
        if check():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


class Orthanc:
    """One Orthanc process: DICOM and HTTP on free loopback ports, storage in ``folder``, ctseg registered."""

    def __init__(self, folder: Path, ctseg_port: int, dicomweb: bool = False):
        self.folder = Path(folder)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.ctseg_port = ctseg_port
        self.process: subprocess.Popen | None = None
        self.config = self.folder / "orthanc.json"
        (self.folder / "storage").mkdir(parents=True, exist_ok=True)
        (self.folder / "logs").mkdir(exist_ok=True)
        self.config.write_text(json.dumps({
            "Name": "ctseg-test", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"), "Plugins": [],
            "HttpServerEnabled": True, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomServerEnabled": True, "DicomAet": ORTHANC_AET,
            "DicomPort": self.dicom_port, "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False, "UnknownSopClassAccepted": False,
            "DicomModalities": {"ctseg": [CTSEG_AET, "127.0.0.1", ctseg_port]},
            "StableAge": 2, "HttpTimeout": 30, "DicomScpTimeout": 30,
            **({"Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
               if dicomweb else {})}))

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        binary = orthanc_binary()
        log = open(self.folder / "logs" / "stdout.txt", "ab")
        self.process = subprocess.Popen([binary, f"--logdir={self.folder / 'logs'}", str(self.config)],
                                        cwd=self.folder, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_until(self._answers, START_SECONDS, "Orthanc's REST API to answer")
        except AssertionError:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited with code {self.process.returncode}; see "
                                 f"{self.folder / 'logs'}")
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self.process = None

    # -- REST --------------------------------------------------------------------------------
    def request(self, method: str, path: str, data: bytes | None = None, content_type: str = "application/json"):
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type} if data is not None else {})
        with urllib.request.urlopen(req, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def get(self, path: str):
        return self.request("GET", path)

    def upload(self, files: list[Path]) -> None:
        for path in files:
            self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom")

    def series_of(self, modality: str) -> list[dict]:
        found = self.request("POST", "/tools/find", json.dumps({"Level": "Series", "Query": {"Modality": modality},
                                                                 "Expand": True}).encode())
        return found

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")


def require_orthanc() -> str:
    binary = orthanc_binary()
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install -y orthanc); the DICOM node tests run against a "
                    "real Orthanc")
    pytest.importorskip("pynetdicom", reason="the DICOM node needs the pacs extra: pip install 'ctseg[pacs]'")
    return binary


def node_config(orthanc: Orthanc, **pacs) -> Config:
    cfg = Config()
    cfg.workers = 1
    cfg.predict.outputs.thumbnails = False
    cfg.predict.outputs.seg_nrrd = False
    cfg.predict.precision = "fp32"
    cfg.pacs.ae_title = CTSEG_AET
    cfg.pacs.peers = [PeerOptions(name="orthanc", ae_title=ORTHANC_AET, host="127.0.0.1", port=orthanc.dicom_port)]
    cfg.pacs.source = "orthanc"
    cfg.pacs.listen.port = orthanc.ctseg_port
    cfg.pacs.timeout_seconds = 20.0
    cfg.predict.send_to = ["orthanc"]
    for key, value in pacs.items():
        setattr(cfg.pacs, key, value)
    return cfg


def write_export(root: Path, seeds=(3, 4), mr: bool = False, study_date: str = "20261130") -> list[list[Path]]:
    """Phantom CT series (patients with names, to check they stay out of logs) and optionally an MR series."""
    from pydicom.uid import generate_uid

    from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series

    series = []
    for n, seed in enumerate(seeds):
        phantom = make_phantom(seed, SMALL)
        series.append(write_ct_series(phantom.image, root / f"ct{n}", SeriesWriteOptions(
            patient_name=f"DOE^JANE{n}", patient_id=f"PID-99{n}", study_uid=generate_uid(), series_uid=generate_uid(),
            frame_of_reference_uid=generate_uid(), study_date=study_date)))
    if mr:
        phantom = make_phantom(9, SMALL)
        series.append(write_ct_series(phantom.image, root / "mr", SeriesWriteOptions(
            patient_name="DOE^MARY", patient_id="PID-777", modality="MR", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            study_uid=generate_uid(), series_uid=generate_uid(), frame_of_reference_uid=generate_uid(),
            study_date=study_date)))
    return series


SMALL = PhantomOptions(shape=40, slices=14, inplane_spacing_min=1.4, inplane_spacing_max=1.6,
                       slice_spacing_min=3.0, slice_spacing_max=3.5, noise_hu=0.0, direction="oblique",
                       feet_first=True)
