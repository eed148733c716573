"""Benchmark: OpenVINO against PyTorch (eager and torch.compile) for predict's network pass on the CPU.

    python bench/openvino_backend.py --output bench/results/openvino.json [--repeats 5] [--threads 2]

Issue 11, item 5: is OpenVINO (PyPI ``openvino``) a faster CPU backend for the U-Net pass of
``ctseg predict``? Measured for two trained networks, each loaded with
:func:`pipeline.predict.model.load_predictor` as predict loads it (``predict.optimize_network``:
batch norms folded, channels-last layout on the CPU):

- ``spleen``: the spleen-size MONAI UNet (16-128, 2 residual units, batch norm) that ``bench/predict.py``
  trains with ctseg and caches under ``bench/results/predict_model/`` (trained there if missing);
- ``demo``: the demo's UNet (16-128, 1 residual unit, batch norm), from a model folder given with
  ``--demo-model`` (default ``bench/results/demo_model``, e.g. a copy of ``outputs/demo/train/model``).

The input is one forward batch as predict runs it: ``predict.batch_size`` (4) windows of 96^3 taken
from a synthetic phantom prepared for the model (:func:`pipeline.preprocess.transform.prepare_image`:
resampled, cropped to the body, windowed), so the logits are those of real use, not of noise.

Backends, each with ``--threads`` threads, run interleaved (one forward of each per repeat, in a
rotating order) so that load from other work hits each alike:

- ``torch_eager``: the predict network in fp32 (predict's default precision ``auto`` = fp32);
- ``torch_compile``: ``torch.compile`` of the same network (compilation time reported separately);
- ``torch_bf16``: the same network under CPU bf16 autocast (``predict.precision: bf16``), for the bf16 row;
- ``openvino_fp32``: ``openvino.convert_model`` of the network as trained (OpenVINO does its own
  fusions), compiled for the CPU with ``INFERENCE_PRECISION_HINT = f32`` pinned: OpenVINO's CPU plugin
  defaults to bf16 on CPUs that offer it (recorded in the JSON), which would silently change the labels;
- ``openvino_bf16``: the same with ``INFERENCE_PRECISION_HINT = bf16``, only where the CPU offers BF16.

Every backend's logits are compared with ``torch_eager``'s: max abs difference and the number of
voxels whose argmax over the classes differs. The adoption rule of the issue: OpenVINO becomes an
optional ``predict.backend`` only if its fp32 argmax is identical and it is >= 1.3x faster than the
best PyTorch path (fp32; the default precision).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

WINDOW = 96
BATCH = 4  # predict.batch_size default: 3D windows per forward pass
ADOPT_SPEEDUP = 1.3


def cpu_description() -> dict:
    """lscpu's model name and the flags that decide bf16 support."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {"model_name": fields.get("Model name", "").strip() or platform.processor(),
            "flags_of_interest": [f for f in wanted if f in flags]}


def phantom_windows(plan: dict, crop_align, seed: int = 7):
    """``BATCH`` windows of ``WINDOW``^3 from a synthetic phantom prepared for ``plan`` (float32 [B, 1, ...])."""
    import numpy as np

    from pipeline.preprocess.transform import prepare_image
    from pipeline.synthetic.phantoms import PhantomOptions, make_phantom

    spacing = [float(s) for s in plan["target_spacing"]]
    # a 384 mm field of view and 300 mm of slices, sampled at about the model's spacing
    options = PhantomOptions(shape=int(round(384 / spacing[0])), slices=int(round(300 / spacing[2])),
                             inplane_spacing_min=spacing[0], inplane_spacing_max=spacing[0],
                             slice_spacing_min=spacing[2], slice_spacing_max=spacing[2], random_origin=False)
    prepared = prepare_image(make_phantom(seed, options).image, plan, crop_align)
    array = np.asarray(prepared.array, dtype=np.float32)
    pad = [(0, max(0, WINDOW - n)) for n in array.shape]
    array = np.pad(array, pad, mode="edge")
    # the centre window and three shifted by half a window (one per axis): the organs, the body wall, air
    centre = [max(0, (n - WINDOW) // 2) for n in array.shape]
    starts = [centre]
    for axis in range(3):
        start = list(centre)
        start[axis] = min(array.shape[axis] - WINDOW, start[axis] + WINDOW // 2)
        starts.append(start)
    windows = [array[s[0]:s[0] + WINDOW, s[1]:s[1] + WINDOW, s[2]:s[2] + WINDOW] for s in starts[:BATCH]]
    return np.stack(windows)[:, None].copy(), {"model_grid_shape": list(prepared.array.shape),
                                               "window_starts": starts[:BATCH]}


def backends(model_dir: Path, threads: int, x):
    """name -> (callable returning float32 logits as a numpy array, info); plus the loaded predictor."""
    import numpy as np
    import openvino as ov
    import torch

    from pipeline.predict.model import load_predictor

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    predictor = load_predictor(model_dir, device, optimize=True)
    network = predictor.networks[0]
    plain = load_predictor(model_dir, device, optimize=False).networks[0]  # as trained, for OpenVINO
    layout = torch.channels_last_3d if predictor.optimisation.get("layout") == "channels_last" else \
        torch.contiguous_format
    tensor = torch.from_numpy(x)

    def torch_runner(net, dtype=None):
        def run():
            with torch.inference_mode():
                inp = tensor.contiguous(memory_format=layout)
                if dtype is None:
                    out = net(inp)
                else:
                    with torch.autocast("cpu", dtype=dtype):
                        out = net(inp)
                return out.float().contiguous().numpy()
        return run

    runners: dict = {"torch_eager": (torch_runner(network), {"optimisation": predictor.optimisation})}
    clock = time.perf_counter()
    compiled_torch = torch.compile(network)
    compiled_run = torch_runner(compiled_torch)
    compiled_run()  # compile now, not inside the first timed repeat
    runners["torch_compile"] = (compiled_run, {"compile_seconds": round(time.perf_counter() - clock, 1)})
    runners["torch_bf16"] = (torch_runner(network, torch.bfloat16), {"autocast": "bf16"})

    core = ov.Core()
    capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    default_hint = str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
    clock = time.perf_counter()
    with torch.no_grad():
        ov_model = ov.convert_model(plain, example_input=tensor)
    convert_seconds = time.perf_counter() - clock
    precisions = ["f32"] + (["bf16"] if "BF16" in capabilities else [])
    for hint in precisions:
        clock = time.perf_counter()
        compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                         "INFERENCE_NUM_THREADS": threads,
                                                         "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()

        def run(request=request):
            request.infer({0: x})
            return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

        run()  # first inference (kernel selection) outside the clock, as for torch.compile
        runners["openvino_" + ("fp32" if hint == "f32" else hint)] = (run, {
            "inference_precision_hint": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "compile_seconds": round(time.perf_counter() - clock, 2), "convert_seconds": round(convert_seconds, 2)})
    openvino_info = {"version": ov.__version__, "cpu_capabilities": capabilities,
                     "default_inference_precision_hint": default_hint, "precisions_measured": precisions}
    return runners, openvino_info, predictor


def measure(name: str, model_dir: Path, threads: int, repeats: int) -> dict:
    import numpy as np

    from pipeline.predict.model import load_predictor

    probe = load_predictor(model_dir, __import__("torch").device("cpu"), optimize=False)
    x, window_info = phantom_windows(probe.plan, probe.crop_align)
    runners, openvino_info, predictor = backends(model_dir, threads, x)
    reference = runners["torch_eager"][0]()
    reference_classes = reference.argmax(1)
    times = {key: [] for key in runners}
    order = list(runners)
    for repeat in range(repeats):
        rotated = order[repeat % len(order):] + order[:repeat % len(order)]
        for key in rotated:
            clock = time.perf_counter()
            runners[key][0]()
            times[key].append(round(time.perf_counter() - clock, 3))
    results = {}
    for key, (run, info) in runners.items():
        logits = run()
        classes = logits.argmax(1)
        differing = int(np.count_nonzero(classes != reference_classes))
        results[key] = {**info, "seconds": times[key], "best_s": min(times[key]),
                        "median_s": statistics.median(times[key]),
                        "max_abs_logit_difference_vs_torch_eager": float(np.abs(logits - reference).max()),
                        "argmax_voxels_differing_vs_torch_eager": differing,
                        "argmax_identical_to_torch_eager": differing == 0}
    torch_fp32 = ["torch_eager", "torch_compile"]
    best_torch = min(torch_fp32, key=lambda k: results[k]["median_s"])
    for key in results:
        results[key]["speedup_vs_torch_eager_median"] = round(results["torch_eager"]["median_s"] /
                                                              results[key]["median_s"], 3)
        results[key]["speedup_vs_best_torch_fp32_median"] = round(results[best_torch]["median_s"] /
                                                                  results[key]["median_s"], 3)
        results[key]["speedup_vs_best_torch_fp32_best"] = round(min(results[k]["best_s"] for k in torch_fp32) /
                                                                results[key]["best_s"], 3)
    if "openvino_bf16" in results:
        results["openvino_bf16"]["speedup_vs_torch_bf16_median"] = round(
            results["torch_bf16"]["median_s"] / results["openvino_bf16"]["median_s"], 3)
    ov32 = results["openvino_fp32"]
    adopt = ov32["argmax_identical_to_torch_eager"] and ov32["speedup_vs_best_torch_fp32_median"] >= ADOPT_SPEEDUP
    spec = predictor.spec
    return {"network": spec["network"], "model_folder": str(model_dir),
            "validation_dice": spec["folds"][0].get("val_dice"), "training_steps": spec["training"]["max_steps"],
            "input": {"batch": list(x.shape), **window_info, "source": "pipeline.synthetic.phantoms seed 7, "
                      "prepared with the model's plan"},
            "openvino": openvino_info, "best_torch_fp32_path": best_torch, "backends": results,
            "adopt_rule": f"openvino_fp32 argmax identical and >= {ADOPT_SPEEDUP}x the best PyTorch fp32 path "
                          "(medians)",
            "adopt": adopt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "openvino.json")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per backend, interleaved")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every backend")
    parser.add_argument("--demo-model", type=Path, default=REPO / "bench" / "results" / "demo_model",
                        help="a trained demo model folder (e.g. a copy of outputs/demo/train/model)")
    parser.add_argument("--networks", default="spleen,demo", help="comma-separated: spleen, demo")
    args = parser.parse_args()
    from bench_machine import machine_info

    load_before = os.getloadavg()
    networks = {}
    for name in [n for n in args.networks.split(",") if n]:
        if name == "spleen":
            from predict import trained_model

            folder = trained_model()
        elif name == "demo":
            folder = args.demo_model
            if not (folder / "model.json").is_file():
                raise SystemExit(f"--demo-model must be a trained model folder with model.json, got {folder}. "
                                 "Run 'python -m pipeline demo' and pass outputs/demo/train/model.")
        else:
            raise SystemExit(f"--networks must list spleen and/or demo, got {name!r}.")
        print(f"openvino_backend: {name} ({folder})", flush=True)
        networks[name] = measure(name, folder, args.threads, args.repeats)
        print(json.dumps({k: {b: {m: v[m] for m in ("median_s", "speedup_vs_best_torch_fp32_median",
                                                     "argmax_voxels_differing_vs_torch_eager",
                                                     "max_abs_logit_difference_vs_torch_eager")}
                              for b, v in networks[name]["backends"].items()}
                          for k in [name]}, indent=1), flush=True)
    result = {"benchmark": "predict network pass: OpenVINO vs PyTorch eager and torch.compile, CPU",
              "settings": {"window": WINDOW, "batch": BATCH, "threads": args.threads, "repeats": args.repeats,
                           "timing": "one forward of a batch per backend per repeat, interleaved in rotating "
                                     "order; warm-up and compilation outside the clock"},
              "machine": {**machine_info(load_before), "cpu": cpu_description()},
              "networks": networks,
              "adopt_openvino": all(n["adopt"] for n in networks.values()) if networks else False}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"adopt OpenVINO: {result['adopt_openvino']}; written {args.output}")


if __name__ == "__main__":
    main()
