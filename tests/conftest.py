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
    from helpers.train import TINY, write_ingest_folder

    from pipeline.config import load_config
    from pipeline.preprocess.stage import run_preprocess

    root = tmp_path_factory.mktemp("train")
    cfg = load_config([], [f"output_root={root}", "experiment=base", *TINY])
    write_ingest_folder(cfg.stage_dir("ingest"), n_train=5)
    run_preprocess(cfg)
    return root
