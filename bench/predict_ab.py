"""Benchmark: ctseg predict of this tree against another source tree (before/after a change), side by side.

    python bench/predict_ab.py --base /path/to/old/checkout --output bench/results/predict_ab.json

Both trees run ``bench/predict.py``'s ``ours`` (labels only) and ``ours_all`` (every default output)
variants on the same synthetic CT, each run in its own process, interleaved base/new so that the
load of a shared machine hits both alike. Reported: every run, the fastest of each, and the ratio
new / base (below 1.05 = no more than 5% slower).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def run(tree: Path, work: Path, variant: str, repeat: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, str(tree / "bench" / "predict.py"), "--variant", variant, "--workdir",
                           str(work), "--repeat", str(repeat)], capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode != 0:
        raise SystemExit(f"{tree} {variant} failed:\n{done.stderr[-3000:]}")
    result = json.loads((work / f"{variant}_r{repeat}.json").read_text())
    if result["status"] != "ok":
        raise SystemExit(f"{tree} {variant}: case {result['status']}: {result['error']}")
    return result


def main() -> None:
    from bench_machine import machine_info
    from predict import prepare_inputs, trained_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the other source tree (e.g. a git archive of main)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "predict_ab.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ctseg-bench-predict-ab"))
    parser.add_argument("--shape", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    for old in args.workdir.glob("ours*_r*"):  # an earlier run's outputs: the ledger would skip the case
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    inputs = prepare_inputs(args.workdir, trained_model(), args.shape, args.slices)
    load_before = os.getloadavg()
    runs: dict = {variant: {"base": [], "new": []} for variant in ("ours", "ours_all")}
    for repeat in range(args.repeats):
        for variant in runs:
            for n, (side, tree) in enumerate((("base", args.base.resolve()), ("new", REPO))):
                order = repeat * 2 + n  # distinct output folders per run (the ledger would skip a done case)
                runs[variant][side].append(run(tree, args.workdir, variant, 100 + order if side == "new" else order))
    summary = {}
    for variant, sides in runs.items():
        seconds = {side: [r["seconds"] for r in results] for side, results in sides.items()}
        summary[variant] = {"base_seconds": seconds["base"], "new_seconds": seconds["new"],
                            "ratio_of_fastest": round(min(seconds["new"]) / min(seconds["base"]), 3),
                            "ratio_of_medians": round(sorted(seconds["new"])[len(seconds["new"]) // 2] /
                                                      sorted(seconds["base"])[len(seconds["base"]) // 2], 3)}
    result = {"summary": summary, "inputs": inputs, "base": str(args.base), "machine": machine_info(list(load_before)),
              "runs": runs, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
