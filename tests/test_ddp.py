"""DDP through torchrun: 2 CPU processes (gloo) train together, split validation, and end with identical weights.

Run as a script by torchrun, this file is the worker: it trains the experiment named on its
command line and writes what its rank ended with to ``<results>/rank_<r>.json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["preprocess.target_spacing=[5,5,5]", "train.channels=[4,8,16]", "train.patch_size=[32,32,16]",
        "train.batch_size=2", "train.max_steps=10", "train.val_every=5", "train.threads=1", "train.norm=batch",
        # gloo on the CPU even where a GPU is present (NCCL needs one GPU per rank); two validation cases, one per rank
        "train.device=cpu", "train.validation_fraction=0.5"]


def _worker(root: str, results: str) -> None:
    sys.path.insert(0, str(REPO))
    from pipeline.config import load_config
    from pipeline.train.stage import run_train

    cfg = load_config([], [f"output_root={root}", "experiment=ddp", *TINY])
    report = run_train(cfg)
    rank = int(os.environ["RANK"])
    fold = report["folds"][0]
    Path(results, f"rank_{rank}.json").write_text(json.dumps({
        "rank": rank, "weights_sha256": fold["weights_sha256"], "final_loss": fold["final_loss"],
        "world_size": report.get("runtime", {}).get("world_size"), "status": report.get("status"),
        "validated": fold["validated_on_this_rank"], "val_cases": sorted(fold["val_cases"])}))


@pytest.mark.slow  # two processes start torch and MONAI: about a minute on a busy 2-core CPU
def test_two_gloo_processes_stay_in_sync(tmp_path):
    from pipeline.config import load_config
    from pipeline.preprocess.stage import run_preprocess

    from helpers.train import write_ingest_folder

    cfg = load_config([], [f"output_root={tmp_path}", "experiment=ddp", *TINY])
    write_ingest_folder(cfg.stage_dir("ingest"), n_train=4)
    run_preprocess(cfg)
    results = tmp_path / "ranks"
    results.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__)), str(tmp_path), str(results)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((results / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # gradients were averaged every step
    assert ranks[0]["final_loss"] != ranks[1]["final_loss"]  # ... over different, rank-sharded patches
    assert ranks[0]["world_size"] == 2 and ranks[0]["status"] == "ok"
    # validation is split across the ranks and gathered: each ran one case, rank 0 recorded both cases' Dice
    assert len(ranks[0]["validated"]) == len(ranks[1]["validated"]) == 1
    assert ranks[0]["val_cases"] == sorted(ranks[0]["validated"] + ranks[1]["validated"])
    train = cfg.stage_dir("train")
    assert (train / "model" / "model.json").is_file() and (train / "done.json").is_file()
    report = json.loads((train / "report.json").read_text())
    assert report["runtime"]["world_size"] == 2


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
