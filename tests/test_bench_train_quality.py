"""bench/train.py (time to quality) in its --quick mode, so that the benchmark cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_time_to_quality_quick_run_writes_every_variants_curve(tmp_path):
    output = tmp_path / "train_quality.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "train.py"), "--quick", "--output", str(output)],
                          capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(output.read_text())
    assert result["target_mean_dice"] == 0.90 and result["settings"]["cap_minutes"] == 1.0
    assert set(result["variants"]) == {"ours_default", "tutorial", "ours_tutorial_net"}
    for name, variant in result["variants"].items():
        assert "error" not in variant, (name, variant)
        curve = variant["curve"]
        assert curve and all(0.0 <= point["mean_dice"] <= 1.0 for point in curve), name
        assert [p["train_seconds"] for p in curve] == sorted(p["train_seconds"] for p in curve)
        # a variant stops at the target or at the cap (one slice of training past it at most)
        assert variant["reached"] or variant["trained_seconds"] >= 60.0, name
    assert set(result["comparison"]) == set(result["variants"])
    assert result["machine"]["cpu"] and "goal_met" in result
    # ours trains on the CPU plan's patch (at most cpu_max_patch_voxels) with the step planner's count
    ours = result["variants"]["ours_default"]
    assert ours["planned_steps"] >= 20 and ours["patch"][0] * ours["patch"][1] * ours["patch"][2] <= 64 ** 3
