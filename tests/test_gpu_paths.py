"""The CUDA and multi-GPU paths, tested on a CPU: CUDA probes and memory figures are faked with monkeypatch.

No GPU has run these paths yet (README.md, "GPU status"); bench/gpu/check.sh runs the real checks in one
device call. Each test names the review finding of issue 20 it covers.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings

import numpy as np
import pytest
import torch

from pipeline import devices, precision
from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, CtsegError
from pipeline.predict.inference import plan_memory, sliding_window_predict
from pipeline.predict.options import MemoryOptions

from helpers.predict import TinyNet, _predictor

GB = 10 ** 9
CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch sees ``n`` CUDA GPUs (no kernels run on them); set_device calls are recorded with their thread."""
    bound: list[tuple[int, torch.device]] = []

    def install(n: int = 1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append((threading.get_ident(), torch.device(d))))
        # the one capability probe of pipeline.precision (its own tests cover each answer): a native-bf16 GPU
        real_probe = precision.probe
        monkeypatch.setattr(precision, "probe", lambda device: precision.Capability(
            True, "fake CUDA GPU with native bf16") if device.type == "cuda" else real_probe(device))
        return bound
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return install


def _torchrun(monkeypatch, rank: int, world: int):
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", rank), ("LOCAL_WORLD_SIZE", world)):
        monkeypatch.setenv(name, str(value))


def _fake_memory(monkeypatch, free: float, reserved: float, allocated: float):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free), int(141 * GB)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(reserved))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(allocated))


# -- finding 1: ranks sharing one GPU ------------------------------------------------------------------

def test_training_refuses_more_torchrun_processes_than_gpus(fake_gpus, monkeypatch):
    from pipeline.train.runtime import resolve_device

    fake_gpus(1)
    _torchrun(monkeypatch, rank=1, world=2)
    with pytest.raises(ConfigError) as error:
        resolve_device("auto")
    message = str(error.value)
    assert "\n" not in message and "LOCAL_WORLD_SIZE" in message and "got 2 processes for 1 GPU" in message
    assert "--nproc_per_node 1" in message
    fake_gpus(2)
    assert resolve_device("cuda") == CUDA1  # one GPU per local rank


def test_prediction_ranks_may_share_a_gpu_and_bind_their_own(fake_gpus, monkeypatch, caplog):
    from pipeline.predict.model import resolve_device

    bound = fake_gpus(1)
    _torchrun(monkeypatch, rank=1, world=2)
    with caplog.at_level(logging.WARNING, logger="ctseg"):
        assert resolve_device("auto") == CUDA0
    assert "2 processes share 1 GPU" in caplog.text
    bound.clear()
    fake_gpus(2)
    assert resolve_device("cuda") == CUDA1 and bound == [(threading.get_ident(), CUDA1)]  # finding 11


def test_the_gloo_ddp_test_is_pinned_to_the_cpu():
    import test_ddp

    assert "train.device=cpu" in test_ddp.TINY  # with a GPU present it would otherwise start NCCL on one GPU


# -- finding 11: the model-loading thread binds the rank's GPU -------------------------------------------

def test_the_model_loading_thread_binds_the_ranks_gpu(fake_gpus, monkeypatch, tmp_path):
    from pipeline.predict import stage

    bound = fake_gpus(2)

    class Loaded(Exception):
        pass

    def load_predictor(*args, **kwargs):
        raise Loaded  # stop here: what matters is which device the thread had bound before loading
    monkeypatch.setattr(stage, "load_predictor", load_predictor)
    monkeypatch.setattr(stage.case_io, "read_case", lambda *args: None)
    batch = stage._Batch(Config(), tmp_path, tmp_path, CUDA1, "hash", ledger=None)
    with pytest.raises(Loaded):
        batch._read_while_loading(case=None)
    assert len(bound) == 1 and bound[0][1] == CUDA1 and bound[0][0] != threading.get_ident()


# -- finding 3: the budget counts PyTorch's cached memory as free ------------------------------------------

def test_the_gpu_budget_does_not_shrink_after_a_large_case(monkeypatch):
    shape, roi = (512, 512, 500), (128, 128, 128)  # a 105-class whole-body model
    args = (shape, 105, 1, roi, 4, CUDA0, MemoryOptions())
    _fake_memory(monkeypatch, free=139 * GB, reserved=0, allocated=0)
    first = plan_memory(*args, need_probabilities=False, prefer_probabilities=True)
    # the first case's 110 GB of buffers were freed, but the caching allocator keeps them reserved
    _fake_memory(monkeypatch, free=29 * GB, reserved=110 * GB, allocated=0)
    second = plan_memory(*args, need_probabilities=False, prefer_probabilities=True)
    assert second.budget_bytes == first.budget_bytes
    assert (second.stitch_device, second.mode, second.accumulate) == (first.stitch_device, first.mode,
                                                                      first.accumulate) == ("cuda:0", "full", "fp32")
    # memory another tensor still holds is not free
    _fake_memory(monkeypatch, free=29 * GB, reserved=110 * GB, allocated=100 * GB)
    assert devices.cuda_free_bytes(CUDA0) == 39 * GB


def test_measuring_activations_returns_the_peak_to_the_allocator(monkeypatch):
    from pipeline.predict.inference import WindowPredictor
    from pipeline.predict.stage import _measure_activations

    calls = []
    figures = iter([3 * GB, 5 * GB])  # allocated before, peak during
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: next(figures))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(figures))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    predictor = _predictor([TinyNet()], (16, 16, 16))
    options = Config().predict
    assert _measure_activations(predictor, WindowPredictor(predictor, "fp32"), options) == 2 * GB
    assert calls == ["empty_cache"]  # not left cached, where the plan would miss it a second time


# -- finding 2: no unbudgeted fp32 copy of a half-precision buffer ---------------------------------------------

def _largest_torch_allocation(run) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    return max(event.cpu_memory_usage for event in prof.events()), result


def test_fp16_probabilities_are_normalised_slab_by_slab(monkeypatch):
    import pipeline.predict.inference as inference

    monkeypatch.setattr(inference, "NORMALISE_SLAB_BYTES", 4 * 40 * 36 * 4 * 8)  # 8 slices per slab here
    predictor = _predictor([TinyNet(classes=4)], (16, 16, 16), classes=4)
    array = np.random.default_rng(5).random((40, 36, 64)).astype(np.float32)
    fp32 = sliding_window_predict(array, predictor, _fp32_options(), need_probabilities=True)
    options = _fp32_options(memory=MemoryOptions(stitch="full", accumulate="fp16", budget_gb=100))
    largest, half = _largest_torch_allocation(lambda: sliding_window_predict(array, predictor, options,
                                                                             need_probabilities=True))
    assert half.plan.accumulate == "fp16" and half.probabilities.dtype == np.float32
    whole_fp32_buffer = 4 * array.size * 4
    # the largest allocation is the fp16 buffer itself; the old buffer.float() allocated the whole fp32 size at once
    assert largest == whole_fp32_buffer // 2
    np.testing.assert_allclose(half.probabilities, fp32.probabilities, atol=2e-3)
    np.testing.assert_allclose(half.probabilities.sum(0), 1.0, atol=1e-5)


def _fp32_options(**changes):
    cfg = Config().predict
    cfg.precision = "fp32"  # numbers are compared: the network runs in fp32 on every CPU
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def test_the_gpu_plan_budgets_the_final_normalisation(monkeypatch):
    from pipeline.predict.inference import NORMALISE_SLAB_BYTES

    shape, roi = (300, 300, 400), (96, 96, 96)  # 14 classes: an fp32 buffer is 2.0 GB, fp16 1.0 GB
    _fake_memory(monkeypatch, free=2.5 * GB / MemoryOptions().gpu_fraction, reserved=0, allocated=0)
    plan = plan_memory(shape, 14, 1, roi, 2, CUDA0, MemoryOptions(), need_probabilities=False,
                       prefer_probabilities=True)
    assert (plan.stitch_device, plan.mode, plan.accumulate) == ("cuda:0", "full", "fp16")
    assert plan.estimates["normalise_slab"] == NORMALISE_SLAB_BYTES
    buffer = 14 * plan.estimates["voxels"] * 2
    weights = plan.estimates["voxels"] * 4
    assert plan.need_bytes == (plan.estimates["image"] + plan.estimates["windows"] + buffer + weights +
                               NORMALISE_SLAB_BYTES)


# -- finding 4: train.deterministic on CUDA -----------------------------------------------------------------

def test_the_cli_sets_the_cublas_workspace_before_torch_starts_cuda(monkeypatch, tmp_path):
    from pipeline import api, cli

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = {}

    def train(cfg, force=False, resume=False):  # the stage itself is tested elsewhere; here: the environment it gets
        seen["value"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        return {"stage": "train", "status": "ok"}
    monkeypatch.setattr(api, "train", train)
    assert cli.main(["train", "--set", f"output_root={tmp_path}", "--set", "train.deterministic=true"]) == 0
    assert seen["value"] == devices.CUBLAS_DETERMINISTIC
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    assert cli.main(["train", "--set", f"output_root={tmp_path}"]) == 0
    assert seen["value"] is None  # not deterministic: cuBLAS keeps its default workspaces


def test_deterministic_cuda_training_refuses_a_cublas_that_already_started(monkeypatch):
    from pipeline.train.runtime import require_deterministic_cuda_start

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ConfigError, match="CUBLAS_WORKSPACE_CONFIG must be set before CUDA starts"):
        require_deterministic_cuda_start()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    require_deterministic_cuda_start()  # not started yet: set now, in time
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == devices.CUBLAS_DETERMINISTIC


def _tiny_trainer(tmp_path, *overrides):
    from pipeline.models import network_spec
    from pipeline.train.data import SamplingSpec
    from pipeline.train.loop import FoldJob, FoldTrainer
    from pipeline.train.runtime import setup_runtime

    cfg = load_config([], ["train.device=cpu", "train.precision=fp32", "train.max_steps=10", *overrides])
    runtime = setup_runtime(cfg.train)
    spec = network_spec("UNet", 3, 1, 3, [4, 8], [16, 16, 16], norm="instance")
    job = FoldJob(fold=0, folder=tmp_path, options=cfg.train, seed=0, stage_hash="t", network_spec=spec,
                  sampling=SamplingSpec("3d", [16, 16, 16], 0), batch_size=2, class_names=["a", "b"],
                  train_cases=[], val_cases=[], resume=False)
    return FoldTrainer(job, runtime)


def test_nondeterministic_kernel_warnings_reach_the_log_once(tmp_path, caplog):
    trainer = _tiny_trainer(tmp_path, "train.deterministic=true")
    try:
        network = trainer.model

        def forward(x):  # what torch warns (warn_only) when CUDA has no deterministic kernel for an op
            warnings.warn("nll_loss2d_forward_out_cuda_template does not have a deterministic implementation, but "
                          "you set 'torch.use_deterministic_algorithms(True, warn_only=True)'.", UserWarning,
                          stacklevel=2)
            return network(x)
        trainer.model = forward
        images, labels = torch.rand(2, 1, 16, 16, 16), torch.randint(0, 3, (2, 1, 16, 16, 16))
        logging.captureWarnings(True)  # as the CLI does: library warnings go to a logger shown only with --debug
        logging.getLogger("py.warnings").setLevel(logging.ERROR)
        with caplog.at_level(logging.WARNING, logger="ctseg"):
            for _ in range(2):
                with trainer.surface_nondeterminism(True):
                    loss = trainer.train_step(images, labels)
        assert trainer.nondeterministic_ops == ["nll_loss2d_forward_out_cuda_template"]
        assert caplog.text.count("has no deterministic kernel") == 1
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0  # finding 7: no host sync inside the step
    finally:
        logging.captureWarnings(False)
        torch.use_deterministic_algorithms(False)


def test_the_exact_resume_tests_are_pinned_to_the_cpu():
    import inspect

    import test_train_stage

    for test in (test_train_stage.test_resume_continues_exactly,
                 test_train_stage.test_compiled_training_matches_eager_training_and_saves_plain_weights):
        assert "train.device=cpu" in inspect.getsource(test)


# -- findings 5 and 7: layout, cuDNN autotuning and data loading per device type ------------------------------

def test_cuda_defaults_contiguous_layout_autotuning_and_pinned_loader_workers(fake_gpus, monkeypatch):
    from pipeline.train.runtime import setup_runtime

    fake_gpus(1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", devices.CUBLAS_DETERMINISTIC)
    runtime = setup_runtime(Config().train)
    assert runtime.device == CUDA0 and runtime.channels_last is False
    assert runtime.memory_format(3) == torch.contiguous_format
    assert torch.backends.cudnn.benchmark is True
    assert (runtime.loader_workers, runtime.pin_memory) == (8, True)
    deterministic = Config().train
    deterministic.deterministic = True
    setup_runtime(deterministic)
    assert torch.backends.cudnn.benchmark is False  # autotuning picks kernels by timing: not repeatable
    cpu = setup_runtime(load_config([], ["train.device=cpu"]).train)
    assert cpu.channels_last is True and (cpu.loader_workers, cpu.pin_memory) == (0, False)


def test_the_memory_layout_is_not_part_of_the_train_hash(monkeypatch):
    from pipeline.train import stage

    monkeypatch.setattr(stage, "upstream_hash", lambda folder, name: "preprocess-hash")
    train_hash = stage.train_hash
    a = load_config([], ["train.channels_last=true"])
    b = load_config([], ["train.channels_last=false"])
    assert train_hash(a) == train_hash(b)


def test_losses_reach_the_host_once_per_n_steps_and_a_nan_names_its_step():
    from pipeline.train.loop import LossLog

    log = LossLog(every=3, fold=2)
    assert log.add(1, torch.tensor(0.5)) == [] and log.add(2, torch.tensor(0.4)) == []
    assert log.add(3, torch.tensor(0.25)) == [(1, 0.5), (2, pytest.approx(0.4)), (3, 0.25)]
    log.add(4, torch.tensor(float("nan")))
    with pytest.raises(CtsegError, match="at step 4 of fold 2"):
        log.flush()


def test_batches_are_pinned_when_asked(monkeypatch):
    from pipeline.train import data

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(tuple(self.shape)) or self)

    class Items:
        def __getitem__(self, item):
            return torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.uint8)
    steps = list(data.batches(Items(), 1, 2, 2, workers=0, pin_memory=True))
    assert [s for s, _, _ in steps] == [1, 2] and len(pinned) == 4


# -- finding 6: DDP timeout, thread count ---------------------------------------------------------------------

def test_ddp_gets_an_explicit_timeout_and_a_share_of_the_cores(monkeypatch):
    import datetime

    from pipeline.train import runtime as rt

    seen = {}
    _torchrun(monkeypatch, rank=0, world=2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    threads = torch.get_num_threads()
    try:
        runtime = rt.setup_runtime(load_config([], ["train.device=cpu"]).train)
        assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=60)}
        assert runtime.distributed and torch.get_num_threads() == 8  # 16 cores, 2 processes on this node
    finally:
        torch.set_num_threads(threads)
    assert devices.threads_per_process(3, 2) == 3 and devices.threads_per_process(None, 1) is None


# -- finding 8: resume with fewer GPUs -----------------------------------------------------------------------

def test_only_the_training_gpus_random_state_is_saved_and_old_checkpoints_still_resume(monkeypatch, caplog):
    from pipeline.train.runtime import rng_state, set_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.full((16,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state was read"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: restored.append((int(state[0]),
                                                                                                  device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every GPU's state was set"))
    state = rng_state(CUDA1)
    assert int(state["cuda"][0]) == 7 and state["cuda"].shape == (16,)
    set_rng_state(state, CUDA0)  # resumed on another (or the only remaining) GPU
    assert restored == [(7, CUDA0)]
    old = dict(state, cuda=[torch.full((16,), v, dtype=torch.uint8) for v in (1, 2, 3, 4)])  # 4 GPUs, as saved
    restored.clear()
    set_rng_state(old, CUDA1)
    assert restored == [(2, CUDA1)]
    restored.clear()
    with caplog.at_level(logging.WARNING, logger="ctseg"):
        set_rng_state(dict(state, cuda=[torch.zeros(16, dtype=torch.uint8)]), CUDA1)
    assert restored == [] and "no CUDA random state for cuda:1" in caplog.text
    assert "cuda" not in rng_state(torch.device("cpu"))


# -- finding 10: the rewrite check runs with TF32 off ---------------------------------------------------------

def test_the_inference_rewrite_is_checked_in_full_fp32():
    from pipeline.predict.model import optimise_for_inference

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

        def forward(self, x):
            if isinstance(x, torch.Tensor):  # not torch.fx tracing it
                seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
            return self.conv(x)
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    spec = {"network": {"spatial_dims": 3, "in_channels": 1}, "patch_size": [8, 8, 8]}
    _, report = optimise_for_inference(Recorder().eval(), spec, torch.device("cpu"))
    assert report["checked"] and seen and all(flags == ("ieee", "ieee") for flags in seen)
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before


# -- finding 13: ranks and devices in writes, runs and benchmarks ---------------------------------------------

def test_only_rank_zero_records_the_config(monkeypatch, tmp_path):
    from pipeline import api

    _torchrun(monkeypatch, rank=1, world=2)
    api._record_config(Config(), tmp_path / "a")
    assert not (tmp_path / "a" / "config.yaml").exists()
    _torchrun(monkeypatch, rank=0, world=2)
    api._record_config(Config(), tmp_path / "a")
    assert (tmp_path / "a" / "config.yaml").is_file()


def test_ctseg_run_under_torchrun_is_refused_with_the_stage_by_stage_commands(monkeypatch, tmp_path, capsys):
    from pipeline import cli

    _torchrun(monkeypatch, rank=0, world=2)
    assert cli.main(["run", "--set", f"output_root={tmp_path}"]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "WORLD_SIZE=2" in message and "torchrun --nproc_per_node N -m pipeline train" in \
        message
    assert not any(tmp_path.iterdir())  # refused before any stage wrote anything
