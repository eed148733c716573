"""Shared pytest fixtures: the real scans in ../shared/data and temporary output folders."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test with a reason when the folder is absent (a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-scan data not found at {SHARED_DATA}; these tests need ../shared/data beside the "
                    f"checkout (CI provides it)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """An experiment folder with ingest and preprocess done (copied by each test that changes it)."""
    from pipeline.config import load_config
    from pipeline.preprocess.stage import run_preprocess

    from helpers.train import TINY, write_ingest_folder

    root = tmp_path_factory.mktemp("train")
    cfg = load_config([], [f"output_root={root}", "experiment=base", *TINY])
    write_ingest_folder(cfg.stage_dir("ingest"), n_train=5)
    run_preprocess(cfg)
    return root


@pytest.fixture
def orthanc(tmp_path):
    """A real Orthanc on loopback for this test (skips with the reason where the binary is absent); always stopped."""
    from helpers.pacs import Orthanc, free_port, require_orthanc

    require_orthanc()
    server = Orthanc(tmp_path / "orthanc", ctseg_port=free_port()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small random model folder, shared by the DICOM node tests of one module."""
    from helpers.predict import write_small_model

    return write_small_model(tmp_path_factory.mktemp("pacs-model") / "model")

