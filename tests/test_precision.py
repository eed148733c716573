"""The precision policy: what `auto` resolves to per device and stage, and every precision path forced and run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import precision as policy
from pipeline.config import Config, load_config
from pipeline.errors import ConfigError
from pipeline.precision import Capability, probe, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def _fake_probe(monkeypatch, native: bool):
    """Replace the one capability probe (not the hardware): every device answers ``native``."""
    monkeypatch.setattr(policy, "probe", lambda device: Capability(native, f"fake {device.type} "
                                                                          f"{'with' if native else 'without'} bf16"))


# what `auto` must give, as documented in the options' help and bench/README.md "Precision"
AUTO_EXPECTED = {
    # (device, native bf16, stage): (precision, GradScaler)
    ("cuda", True, "train"): ("bf16", False),
    ("cuda", False, "train"): ("fp16", True),   # V100 / T4: fp16 with a GradScaler, not emulated bf16
    ("cpu", True, "train"): ("bf16", False),   # measured faster at the same Dice
    ("cpu", False, "train"): ("fp32", False),
    ("cuda", True, "predict"): ("fp32", False),  # bf16 failed the 0.995 agreement rule on real CT: opt-in
    ("cuda", False, "predict"): ("fp32", False),
    ("cpu", True, "predict"): ("fp32", False),
    ("cpu", False, "predict"): ("fp32", False),
}


@pytest.mark.parametrize("device,native,stage", sorted(AUTO_EXPECTED))
def test_auto_resolves_as_documented_for_each_device_and_capability(monkeypatch, device, native, stage):
    _fake_probe(monkeypatch, native)
    resolved = resolve_precision("auto", torch.device(device, 0) if device == "cuda" else CPU, stage)
    name, scaler = AUTO_EXPECTED[(device, native, stage)]
    assert (resolved.name, resolved.grad_scaler) == (name, scaler)
    assert resolved.dtype == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    assert resolved.reason.startswith("auto: fake") and name in resolved.reason  # the reason names what and why
    assert resolved.to_json() == {"requested": "auto", "used": name, "reason": resolved.reason}


def test_predict_auto_uses_reduced_precision_only_with_a_measured_agreement_above_the_limit():
    """Where predict's auto leaves fp32, its reason must quote a measured agreement of at least 0.995; where it
    keeps fp32 on a device with native bf16, the reason says which measurement fell below the limit."""
    import re

    for table in (policy.AUTO_WITH_NATIVE_BF16, policy.AUTO_WITHOUT_NATIVE_BF16):
        for (stage, device_type), (name, why) in table.items():
            if stage == "predict" and name != "fp32":
                measured = [float(v) for v in re.findall(r"Dice >= (0\.\d+)", why)]
                assert measured and min(measured) >= policy.PREDICT_AGREEMENT_LIMIT, (device_type, why)
    for device_type in ("cpu", "cuda"):
        name, why = policy.AUTO_WITH_NATIVE_BF16[("predict", device_type)]
        if name == "fp32":
            assert "0.995" in why and "bench/README.md" in why


def test_forced_precisions_are_kept_and_fp16_training_on_the_cpu_is_refused(monkeypatch):
    _fake_probe(monkeypatch, False)
    assert resolve_precision("fp32", CUDA, "train").name == "fp32"
    assert resolve_precision("bf16", CPU, "predict").name == "bf16"
    assert "emulated" in resolve_precision("bf16", CPU, "train").reason
    forced = resolve_precision("fp16", CUDA, "train")
    assert forced.grad_scaler and forced.dtype == torch.float16
    assert not resolve_precision("bf16", CUDA, "train").grad_scaler  # bf16 has fp32's range: no scaler
    with pytest.raises(ConfigError, match=r"train.precision must be 'auto', 'fp32' or 'bf16' on the CPU, got 'fp16'"):
        resolve_precision("fp16", CPU, "train")
    with pytest.raises(ConfigError, match=r"predict.precision must be one of auto, fp32, bf16, fp16, got 'fp64'"):
        resolve_precision("fp64", CPU, "predict")


def test_the_probe_reports_this_cpu_as_its_flags_say():
    found = probe(CPU)
    assert isinstance(found.native_bf16, bool) and found.detail.startswith("CPU ")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: the kernel's flags and torch's cpuinfo must agree
        flags = set(" ".join(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
        assert found.native_bf16 == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_train_runtime_and_window_predictor_take_the_policy_s_answer(monkeypatch):
    from pipeline.predict.inference import WindowPredictor
    from pipeline.train.runtime import setup_runtime

    from helpers.predict import TinyNet, _predictor

    for native in (True, False):
        _fake_probe(monkeypatch, native)
        options = Config().train
        options.device, options.threads = "cpu", None
        runtime = setup_runtime(options)
        expected = resolve_precision("auto", CPU, "train")
        assert (runtime.precision, runtime.autocast_dtype, runtime.precision_reason) == \
            (expected.name, expected.dtype, expected.reason)
        window = WindowPredictor(_predictor([TinyNet()], (8, 8, 8)), "auto")
        assert window.precision == resolve_precision("auto", CPU, "predict")


def _capture_dtypes(network):
    seen = []
    network.b.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


def test_predict_in_bf16_runs_the_network_in_bf16_and_stays_close_to_fp32():
    """The bf16 path, forced, on a small volume (emulated bf16 is slow but correct on any CPU)."""
    from pipeline.predict.inference import sliding_window_predict

    from helpers.predict import TinyNet, _options, _predictor

    net = TinyNet(seed=7)
    seen = _capture_dtypes(net)
    predictor = _predictor([net], (16, 16, 16))
    array = np.random.default_rng(3).random((24, 20, 18)).astype(np.float32)
    exact = sliding_window_predict(array, predictor, _options(precision="fp32"), need_probabilities=True)
    assert set(seen) == {torch.float32}
    seen.clear()
    half = sliding_window_predict(array, predictor, _options(precision="bf16"), need_probabilities=True)
    assert set(seen) == {torch.bfloat16}
    assert half.stats["autocast"] == "bf16" and half.stats["precision"]["used"] == "bf16"
    assert exact.stats["autocast"] == "fp32"
    assert half.probabilities.dtype == np.float32  # blended in fp32 whatever the network ran in
    np.testing.assert_allclose(half.probabilities, exact.probabilities, atol=2e-2)  # bf16: 8 significant bits
    assert np.mean(half.classes == exact.classes) > 0.95


def test_training_runs_in_each_forced_precision_and_records_it(prepared, tmp_path):
    """Both CPU training paths, forced by configuration, on tiny patches: each trains, in its own precision
    (the losses differ, but not by much), and says so in report.json and model.json."""
    from pipeline.train.stage import run_train

    from helpers.train import TINY

    losses = {}
    for requested in ("fp32", "bf16"):
        for stage in ("ingest", "preprocess"):
            shutil.copytree(prepared / "base" / stage, tmp_path / requested / stage)
        cfg = load_config([], [f"output_root={tmp_path}", f"experiment={requested}", *TINY,
                               f"train.precision={requested}", "train.max_steps=10", "train.val_every=10"])
        report = run_train(cfg)
        assert report["status"] == "ok"
        runtime = report["runtime"]
        assert runtime["precision"] == requested
        assert runtime["precision_reason"].startswith(f"train.precision={requested}")
        losses[requested] = report["folds"][0]["final_loss"]
        model = json.loads((cfg.stage_dir("train") / "model" / "model.json").read_text())
        assert model["training"]["precision"] == {"used": requested, "reason": runtime["precision_reason"]}
    assert np.isfinite(losses["bf16"]) and losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.1)


def test_predict_report_and_provenance_name_the_precision_and_its_reason(tmp_path):
    from pipeline.predict.stage import run_predict

    from helpers.predict import write_phantom_nifti, write_small_model

    model = write_small_model(tmp_path / "model")
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_phantom_nifti(inputs / "case1.nii.gz", seed=1)
    cfg = Config()
    cfg.predict.outputs.seg_nrrd = cfg.predict.outputs.thumbnails = False
    result = run_predict(cfg, model, inputs, tmp_path / "out")
    assert result.exit_code == 0
    expected = resolve_precision("auto", CPU, "predict").to_json()
    assert result.report["precision"] == expected
    provenance = json.loads(next((tmp_path / "out").rglob("*.provenance.json")).read_text())
    assert provenance["inference"]["precision"] == expected
