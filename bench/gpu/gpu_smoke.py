"""ctseg GPU smoke checks: one line of JSON per check (name, ok, info/error, seconds).

Run from the repository root:  python3 bench/gpu/gpu_smoke.py (see README.md beside it)
Each check is independent (a failure is reported and the next one runs). Nothing is written
inside the repository: work folders go to a temporary directory. Each check names the finding
of issue 20 it measures on real hardware (tests/test_gpu_paths.py covers the same logic on a CPU
with faked CUDA probes).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, os.getcwd())
from pipeline.devices import request_deterministic_cublas  # noqa: E402

request_deterministic_cublas()  # as the ctseg CLI does at process start for train.deterministic (finding 4)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda", 0) if CUDA else torch.device("cpu")
TMP = Path(tempfile.mkdtemp(prefix="ctseg-gpu-smoke-"))
RESULTS: dict = {}
BIG = (128, 128, 128) if CUDA else (32, 32, 32)  # small on a CPU dry run
MID = (64, 64, 64) if CUDA else (32, 32, 32)


def check(fn):
    start = time.perf_counter()
    try:
        RESULTS[fn.__name__] = {"ok": True, "info": fn()}
    except Exception as exc:  # report and go on
        RESULTS[fn.__name__] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}",
                                "where": traceback.format_exc().strip().splitlines()[-3][:300]}
    RESULTS[fn.__name__]["s"] = round(time.perf_counter() - start, 2)
    print(fn.__name__, json.dumps(RESULTS[fn.__name__], default=str), flush=True)
    if CUDA:
        torch.cuda.empty_cache()
    return fn


def sync():
    if CUDA:
        torch.cuda.synchronize()


def _options(**train):
    from pipeline.config import Config

    cfg = Config()
    cfg.train.max_steps = 1000  # a fixed schedule: these checks time steps, they do not plan a budget
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg.train


def _trainer(options, channels=(16, 32, 64, 128), patch=BIG, norm="instance", batch=2, val_cases=()):
    from pipeline.models import network_spec
    from pipeline.train.data import SamplingSpec
    from pipeline.train.loop import FoldJob, FoldTrainer
    from pipeline.train.runtime import setup_runtime

    runtime = setup_runtime(options)
    spec = network_spec("UNet", 3, 1, 4, list(channels), list(patch), norm=norm)
    job = FoldJob(fold=0, folder=TMP / "fold", options=options, seed=0, stage_hash="smoke", network_spec=spec,
                  sampling=SamplingSpec("3d", list(patch), 0), batch_size=batch, class_names=["a", "b", "c"],
                  train_cases=[], val_cases=list(val_cases), resume=False)
    return runtime, FoldTrainer(job, runtime)


def _batch(batch=2, patch=BIG, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((batch, 1, *patch), generator=g)
    labels = torch.randint(0, 4, (batch, 1, *patch), generator=g).to(torch.uint8)
    return images, labels


@check
def environment():
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "cuda": CUDA}
    if CUDA:
        info.update({"gpu": torch.cuda.get_device_name(0), "capability": torch.cuda.get_device_capability(0),
                     "cudnn": torch.backends.cudnn.version(), "nccl": torch.cuda.nccl.version(),
                     "bf16": torch.cuda.is_bf16_supported(),
                     "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
                     "cudnn_benchmark": torch.backends.cudnn.benchmark,
                     "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32})
    import monai

    info["monai"] = monai.__version__
    return info


@check
def runtime_resolution():
    from pipeline.train.runtime import setup_runtime

    rt = setup_runtime(_options())
    return {"device": str(rt.device), "precision": rt.precision, "grad_scaler": rt.use_grad_scaler,
            "channels_last": rt.channels_last, "world": rt.world_size}


@check
def rank_to_gpu_mapping():
    """Findings 1, 8 and 11 on real hardware: more local ranks than GPUs refused for training; predict binds the
    rank's GPU; a checkpoint holds the training GPU's RNG state only, and restores on this device."""
    from pipeline.errors import ConfigError
    from pipeline.predict.model import resolve_device as predict_device
    from pipeline.train.runtime import resolve_device, rng_state, set_rng_state

    if not CUDA:
        return "skipped: no CUDA"
    count = torch.cuda.device_count()
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(count + 1))
    try:
        try:
            resolve_device("cuda")
            refused = "not refused"
        except ConfigError as exc:
            refused = str(exc)
        predict = str(predict_device("cuda"))
    finally:
        del os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"]
    state = rng_state(DEV)
    set_rng_state(state, DEV)
    return {"gpus": count, "training_refusal": refused[:160], "predict_device": predict,
            "current_device": torch.cuda.current_device(), "cuda_rng_state_shape": list(state["cuda"].shape)}


@check
def deterministic_train_steps_repeat():
    """Finding 4: train.deterministic=true on this device: same seed + batch twice -> same weights? which ops
    does the trainer log as nondeterministic (expected on CUDA: nll_loss2d forward; the README says exact
    repeats hold on the CPU only)?"""
    from pipeline.train.loop import weights_checksum

    images, labels = _batch(2, MID)
    sums, alerts = [], set()
    for _ in range(2):
        _, trainer = _trainer(_options(deterministic=True), patch=MID)
        for _step in range(3):
            with trainer.surface_nondeterminism(True):
                trainer.train_step(images, labels)
        sync()
        alerts |= set(trainer.nondeterministic_ops)
        sums.append(weights_checksum(trainer.network))
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    return {"identical_weights": sums[0] == sums[1], "nondeterministic_ops_logged": sorted(alerts),
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "cudnn_benchmark_after": torch.backends.cudnn.benchmark}


@check
def train_step_layouts():
    """Finding 5: seconds per step, UNet 16-128 instance norm, 128^3 x 2, default precision: channels_last vs
    contiguous (the CUDA default), with and without cudnn.benchmark (on by default outside deterministic mode)."""
    out = {"default_layout_channels_last": _trainer(_options())[0].channels_last}
    images, labels = _batch()
    for benchmark in (False, True):
        for channels_last in (True, False):
            rt, trainer = _trainer(_options(channels_last=channels_last))
            torch.backends.cudnn.benchmark = benchmark  # after setup_runtime, which turns it on
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(3):
                    trainer.train_step(images, labels)
                sync()
                start = time.perf_counter()
                steps = 10 if CUDA else 1
                for _ in range(steps):
                    trainer.train_step(images, labels)
                sync()
            key = f"{'cl' if channels_last else 'contig'}{'_bench' if benchmark else ''}"
            out[key] = {"s_per_step": round((time.perf_counter() - start) / steps, 4),
                        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if CUDA else None,
                        "warnings": sorted({str(w.message)[:90] for w in caught})[:3]}
            out["precision"] = rt.precision
            del trainer
    torch.backends.cudnn.benchmark = False
    return out


@check
def fp16_grad_scaler_path():
    """train.precision=fp16 on CUDA: GradScaler enabled, steps finite, scale reported."""
    if not CUDA:
        return "skipped: no CUDA"
    rt, trainer = _trainer(_options(precision="fp16"), patch=(64, 64, 64))
    images, labels = _batch(2, (64, 64, 64))
    losses = [float(trainer.train_step(images, labels)) for _ in range(5)]
    return {"scaler": rt.use_grad_scaler, "scale": trainer.scaler.get_scale(),
            "losses": [round(loss, 4) for loss in losses],
            "state_keys": sorted(trainer.scaler.state_dict())}


@check
def validation_on_device():
    """Finding 6: FoldTrainer.validate: sliding window on the GPU, stitching on the CPU (MONAI sw_device/device);
    how long one large validation case keeps the other ranks waiting (DDP timeout is train.ddp_timeout_minutes)."""
    rng = np.random.default_rng(0)
    shape = (200, 180, 120) if CUDA else (40, 40, 40)
    image = rng.random(shape, dtype=np.float32)
    label = (rng.random(shape) * 4).astype(np.uint8)
    _, trainer = _trainer(_options(), val_cases=[("v", image, label)])
    sync()
    start = time.perf_counter()
    dice, _ = trainer.validate()
    sync()
    return {"seconds": round(time.perf_counter() - start, 2), "dice": [round(d, 3) for d in dice]}


@check
def dataloader_workers_after_cuda_init():
    """Finding 7: worker processes forked after CUDA started, pinned batches; the CUDA defaults of setup_runtime."""
    from pipeline.train.data import PatchDataset, SamplingSpec, batches, prepare_case

    torch.zeros(1, device=DEV)  # CUDA is initialised before the workers fork
    spec = SamplingSpec("3d", [64, 64, 64], 0)
    rng = np.random.default_rng(1)
    label = np.zeros((90, 90, 70), dtype=np.uint8)
    label[20:50, 20:50, 20:40] = 1
    case = prepare_case("c", rng.random((90, 90, 70), dtype=np.float32), label, spec, 0, 2)
    dataset = PatchDataset([case], spec, _options(), 0, 0, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [(step, tuple(images.shape), images.is_pinned())
               for step, images, _ in batches(dataset, 1, 4, 2, 2, pin_memory=CUDA)]
    rt, _ = _trainer(_options(), patch=MID)
    return {"batches": got, "warnings": sorted({str(w.message)[:100] for w in caught})[:3],
            "default_loader_workers": rt.loader_workers, "default_pin_memory": rt.pin_memory}


class TinyNet(nn.Module):
    def __init__(self, classes=14):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv3d(1, 6, 3, padding=1)
        self.b = nn.Conv3d(6, classes, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) * 3.0


def _predictor(classes=14, patch=(64, 64, 64), net=None):
    from pipeline.predict.model import LabelInfo, Predictor

    spec = {"mode": "3d", "patch_size": list(patch), "context_slices": 0, "plan": {},
            "network": {"name": "tiny", "spatial_dims": 3, "in_channels": 1, "out_channels": classes}}
    labels = [LabelInfo(v, f"l{v}", (255, 0, 0)) for v in range(1, classes)]
    net = (net or TinyNet(classes)).to(DEV).eval()
    return Predictor(Path("tiny"), spec, "0" * 64, [net], list(range(classes)), labels, DEV, {})


def _predict_options(**memory):
    from pipeline.config import Config

    cfg = Config().predict
    for key, value in memory.items():
        setattr(cfg.memory, key, value)
    return cfg


@check
def memory_plan_counts_cached_gpu_memory_as_free():
    """Finding 3: plan_memory budgets from free + cached-but-unused: the budget after an 80 GB case is unchanged."""
    if not CUDA:
        return "skipped: no CUDA"
    from pipeline.predict.inference import plan_memory
    from pipeline.predict.options import MemoryOptions

    args = ((512, 512, 500), 105, 1, (128, 128, 128), 4, DEV, MemoryOptions())  # a 105-class whole-body model
    before = plan_memory(*args, need_probabilities=False, prefer_probabilities=True)
    block = torch.empty(int(80e9) // 4, device=DEV)  # a previous case's 80 GB of buffers ...
    del block  # ... freed, but kept by the caching allocator
    after = plan_memory(*args, need_probabilities=False, prefer_probabilities=True)
    reserved = torch.cuda.memory_reserved(DEV)
    torch.cuda.empty_cache()
    return {"budget_gb_before": round(before.budget_bytes / 1e9, 1),
            "budget_gb_after": round(after.budget_bytes / 1e9, 1),
            "plan_before": [before.stitch_device, before.mode, before.accumulate],
            "plan_after": [after.stitch_device, after.mode, after.accumulate],
            "reserved_gb_while_planning": round(reserved / 1e9, 1),
            "expected": "budget_gb_after == budget_gb_before"}


@check
def cpu_stitching_fallback_matches_gpu():
    """Compute on the GPU, stitch on the CPU (plan over budget) gives the labels of the all-GPU plan."""
    from pipeline.predict.inference import sliding_window_predict

    predictor = _predictor()
    array = np.random.default_rng(3).random((150, 140, 130) if CUDA else (70, 66, 60)).astype(np.float32)
    results = {}
    for name, memory in {"gpu_full": {}, "cpu_streaming_fp32": {"budget_gb": 0.001, "accumulate": "fp32"},
                         "cpu_streaming_fp16": {"budget_gb": 0.001}}.items():
        sync()
        start = time.perf_counter()
        out = sliding_window_predict(array, predictor, _predict_options(**memory))
        results[name] = (out, round(time.perf_counter() - start, 2))
    ref = results["gpu_full"][0].classes
    return {name: {"plan": [r.plan.compute_device, r.plan.stitch_device, r.plan.mode, r.plan.accumulate],
                   "seconds": s, "agree": float(np.mean(r.classes == ref))} for name, (r, s) in results.items()}


@check
def optimise_for_inference_check_on_device():
    """Findings 5 and 10: the rewrite check (fp32 with TF32 off): accepted? On CUDA the rewrite keeps the contiguous
    layout; bf16 seconds per batch of the network as trained, the rewrite, and a channels-last copy."""
    import copy

    from pipeline.models import build_network, network_spec
    from pipeline.predict.model import optimise_for_inference

    spec = {"network": network_spec("UNet", 3, 1, 14, [32, 64, 128, 256], list(BIG)), "patch_size": list(BIG)}
    net = build_network(spec["network"]).to(DEV).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    rewritten, report = optimise_for_inference(net, spec, DEV)
    x = torch.rand(4, 1, *BIG, device=DEV)
    timing = {}
    dtype = torch.bfloat16 if CUDA else None
    channels_last = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
    rewritten_format = torch.channels_last_3d if report.get("layout") == "channels_last" else torch.contiguous_format
    for name, model, fmt in (("as_trained", net, torch.contiguous_format),
                             ("rewritten", rewritten, rewritten_format),
                             ("as_trained_channels_last", channels_last, torch.channels_last_3d)):
        xi = x.contiguous(memory_format=fmt)
        with torch.inference_mode(), torch.autocast(DEV.type, dtype=dtype, enabled=dtype is not None):
            model(xi)
            sync()
            start = time.perf_counter()
            for _ in range(5 if CUDA else 1):
                model(xi)
            sync()
        timing[name] = round((time.perf_counter() - start) / (5 if CUDA else 1), 4)
    return {"report": report, "bf16_s_per_batch": timing}


@check
def full_fp16_probabilities_peak_memory():
    """Finding 2: a volume whose fp32 buffer misses the budget gets 'full fp16'; the final softmax now runs slab by
    slab into a CPU float32 array (normalise_probabilities), so the peak stays near the plan.

    The allocator is capped at (what is reserved now) + 1.3 GB; the plan budget is 0.9 GB. Before the fix the
    review predicted OutOfMemoryError in the whole-buffer buffer.float(); expected now: no OOM, peak_gb close to
    planned_gb.
    """
    if not CUDA:
        return "skipped: no CUDA"
    from pipeline.predict.inference import sliding_window_predict

    predictor = _predictor()
    array = np.random.default_rng(4).random((256, 256, 256)).astype(np.float32)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(DEV).total_memory
    cap = torch.cuda.memory_reserved(DEV) + int(1.3e9)
    torch.cuda.set_per_process_memory_fraction(cap / total, DEV)
    outcome = {}
    try:
        for name, memory in {"auto_prefer_probs": {"budget_gb": 0.9}, "streaming": {"budget_gb": 0.9,
                                                                                   "stitch": "streaming"}}.items():
            torch.cuda.reset_peak_memory_stats(DEV)
            try:
                out = sliding_window_predict(array, predictor, _predict_options(**memory), prefer_probabilities=True)
                outcome[name] = {"plan": [out.plan.mode, out.plan.accumulate], "planned_gb": out.plan.need_bytes / 1e9,
                                 "peak_gb": round(torch.cuda.max_memory_allocated(DEV) / 1e9, 2)}
            except torch.OutOfMemoryError as exc:
                outcome[name] = {"OOM": str(exc).splitlines()[0][:160],
                                 "peak_gb": round(torch.cuda.max_memory_allocated(DEV) / 1e9, 2)}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, DEV)
    return outcome


if __name__ == "__main__":
    print("SUMMARY", json.dumps({name: r["ok"] for name, r in RESULTS.items()}))
