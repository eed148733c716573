"""Sliding-window inference: MONAI-identical windows and blending, streaming = full, TTA, 2.5D, rewrites, memory."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.predict.inference import WindowPredictor, network_input, plan_memory, sliding_window_predict, window_grid
from pipeline.predict.model import load_predictor, optimise_for_inference
from pipeline.predict.options import MemoryOptions

from helpers.predict import TinyNet, _options, _predictor, write_small_model


@pytest.mark.parametrize("shape,roi,overlap", [((50, 37, 29), (16, 16, 16), 0.5), ((16, 40, 70), (16, 24, 32), 0.25),
                                               ((10, 12, 9), (16, 16, 8), 0.5), ((33, 33, 33), (32, 32, 32), 0.7)])
def test_window_placement_is_monai_s(shape, roi, overlap):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    grid = window_grid(shape, roi, overlap)
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    assert grid.padded_shape == padded
    interval = _get_scan_interval(padded, roi, 3, (overlap,) * 3)
    expected = {tuple(sl.start for sl in slices) for slices in dense_patch_slices(padded, roi, interval)}
    assert set(grid.starts) == expected and len(grid.starts) == len(expected)
    assert grid.starts == sorted(grid.starts, key=lambda s: (s[2], s[1], s[0]))


def test_probabilities_equal_monai_gaussian_sliding_window():
    from monai.inferers import sliding_window_inference

    net = TinyNet()
    predictor = _predictor([net], (16, 16, 16))
    rng = np.random.default_rng(0)
    array = rng.random((40, 30, 27)).astype(np.float32)
    ours = sliding_window_predict(array, predictor, _options(overlap=0.5, batch_size=3), need_probabilities=True)
    with torch.inference_mode():  # MONAI blends the logits, then the bundle applies a softmax
        logits = sliding_window_inference(torch.from_numpy(array)[None, None], (16, 16, 16), 3, net, overlap=0.5,
                                          mode="gaussian")[0]
        theirs = torch.softmax(logits, 0)
    np.testing.assert_allclose(ours.probabilities, theirs.numpy(), atol=2e-5)
    np.testing.assert_array_equal(ours.classes, theirs.numpy().argmax(0))
    assert ours.stats["windows"] == len(window_grid((40, 30, 27), (16, 16, 16), 0.5).starts)



def _validation_window(net, mode, patch, context=0, precision="fp32", channels_last=False, overlap=0.25):
    """Training validation's window (pipeline.train.loop.ValidationWindow) as a fold's trainer builds it."""
    from pipeline.train.data import SamplingSpec
    from pipeline.train.loop import FoldJob, ValidationWindow
    from pipeline.train.options import TrainConfig
    from pipeline.train.runtime import Runtime

    options = TrainConfig()
    options.precision, options.val_overlap = precision, overlap
    dims = 3 if mode == "3d" else 2
    spec = {"name": "tiny", "spatial_dims": dims, "in_channels": 2 * context + 1, "out_channels": 3}
    job = FoldJob(fold=0, folder=Path("fold_0"), options=options, seed=0, stage_hash="0" * 64, network_spec=spec,
                  sampling=SamplingSpec(mode, list(patch), context), batch_size=3, class_names=["a", "b"],
                  train_cases=[], val_cases=[], resume=False)
    runtime = Runtime(device=torch.device("cpu"), autocast_dtype=None if precision == "fp32" else torch.bfloat16,
                      use_grad_scaler=False, channels_last=channels_last, precision_reason="pinned by the test")
    return ValidationWindow.for_job(net.eval(), job, runtime, channels_last=channels_last)


def _asymmetric_phantom() -> np.ndarray:
    """The train tests' synthetic abdomen (organs off-centre, i axis flipped) at 6 mm, z-scored."""
    from helpers.train import synthetic_case

    image, _ = synthetic_case(1, spacing=(6.0, 6.0, 6.0), flip_i=True)  # (37, 28, 20)
    hu = image.array.astype(np.float32)
    return (hu - hu.mean()) / hu.std()


@pytest.mark.parametrize("channels_last", [False, True])
def test_training_validation_equals_monai_gaussian_sliding_window_in_3d(channels_last):
    """Validation Dice is unchanged by the merge: its probabilities are MONAI's (what validation ran before)."""
    from monai.inferers import sliding_window_inference

    net = TinyNet(seed=3)
    array = _asymmetric_phantom()
    window = _validation_window(net, "3d", (16, 16, 24), channels_last=channels_last)  # k (20) padded to 24
    ours = sliding_window_predict(array, window.predictor, window.options, need_probabilities=True,
                                  window_predictor=window.window)
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(array)[None, None], (16, 16, 24), 3, net, overlap=0.25,
                                          mode="gaussian")[0]
        theirs = torch.softmax(logits, 0).numpy()
    np.testing.assert_allclose(ours.probabilities, theirs, atol=2e-5)
    labels = window.labels(array)
    np.testing.assert_array_equal(labels, theirs.argmax(0))
    assert window.window.precision.name == "fp32" and window.window.channels_last == channels_last
    assert len(np.unique(labels)) == 3  # the comparison covers every class


def test_training_validation_equals_monai_gaussian_sliding_window_slice_by_slice_in_two_and_a_half_d():
    from monai.inferers import sliding_window_inference

    net = TinyNet(in_channels=3, dims=2, seed=8)
    array = _asymmetric_phantom()
    window = _validation_window(net, "2d", (16, 16), context=1)
    ours = sliding_window_predict(array, window.predictor, window.options, need_probabilities=True,
                                  window_predictor=window.window)
    # the former validation: slice k with k-1 and k+1 as channels (edge slices repeated), a 2D window per slice
    padded = np.concatenate([array[:, :, :1], array, array[:, :, -1:]], axis=2)
    stacks = np.stack([padded[:, :, k:k + 3] for k in range(array.shape[2])])  # [k, i, j, 3]
    with torch.inference_mode():
        batch = torch.from_numpy(stacks).permute(0, 3, 1, 2).contiguous()
        logits = sliding_window_inference(batch, (16, 16), 3, net, overlap=0.25, mode="gaussian")
        theirs = torch.softmax(logits, 1).permute(1, 2, 3, 0).numpy()
    np.testing.assert_allclose(ours.probabilities, theirs, atol=2e-5)
    labels = window.labels(array)
    np.testing.assert_array_equal(labels, theirs.argmax(0))
    assert len(np.unique(labels)) == 3


def test_training_validation_runs_in_the_training_precision():
    """bf16 training validates in bf16 (the precision it passes), fp32 in plain fp32; the labels nearly agree."""
    net = TinyNet(seed=3)
    array = _asymmetric_phantom()
    fp32 = _validation_window(net, "3d", (16, 16, 16))
    bf16 = _validation_window(net, "3d", (16, 16, 16), precision="bf16")
    assert fp32.window.autocast is None and bf16.window.autocast == torch.bfloat16
    assert bf16.window.precision.stage == "train" and bf16.window.precision.reason == "pinned by the test"
    assert np.mean(bf16.labels(array) == fp32.labels(array)) > 0.98


def test_streaming_gives_the_same_labels_as_full_with_less_memory():
    predictor = _predictor([TinyNet(seed=1)], (12, 12, 12))
    array = np.random.default_rng(1).random((30, 26, 70)).astype(np.float32)
    full = sliding_window_predict(array, predictor, _options(memory=MemoryOptions(stitch="full")))
    streaming = sliding_window_predict(array, predictor, _options(memory=MemoryOptions(stitch="streaming")))
    half = sliding_window_predict(array, predictor, _options(memory=MemoryOptions(stitch="streaming",
                                                                                   accumulate="fp16")))
    assert full.plan.mode == "full" and streaming.plan.mode == "streaming"
    np.testing.assert_array_equal(full.classes, streaming.classes)
    assert np.mean(half.classes == full.classes) > 0.999  # fp16 sums may flip a near-tie
    assert streaming.plan.need_bytes < full.plan.need_bytes


def test_memory_plan_is_decided_from_shape_and_budget():
    cpu = torch.device("cpu")
    shape, roi = (300, 300, 400), (96, 96, 96)
    roomy = plan_memory(shape, 14, 1, roi, 2, cpu, MemoryOptions(budget_gb=64), need_probabilities=False)
    assert (roomy.mode, roomy.accumulate) == ("full", "fp32")
    # 14 classes x 36 M voxels x 4 B = 2 GB: a 1.2 GB budget streams two-window-deep slabs instead
    tight = plan_memory(shape, 14, 1, roi, 2, cpu, MemoryOptions(budget_gb=1.2), need_probabilities=False)
    assert (tight.mode, tight.accumulate) == ("streaming", "fp32") and tight.need_bytes <= 1.2e9
    tighter = plan_memory(shape, 14, 1, roi, 2, cpu, MemoryOptions(budget_gb=0.6), need_probabilities=False)
    assert (tighter.mode, tighter.accumulate) == ("streaming", "fp16")
    maps = plan_memory(shape, 14, 1, roi, 2, cpu, MemoryOptions(budget_gb=1.5), need_probabilities=True)
    assert (maps.mode, maps.accumulate) == ("full", "fp16")
    # on the CPU an fp16 buffer is normalised into a new float32 array (2 GB here), so kept probabilities need
    # more than 1.5 GB in either precision: labels only, streaming in fp32
    prefer = plan_memory(shape, 14, 1, roi, 2, cpu, MemoryOptions(budget_gb=1.5), need_probabilities=False,
                         prefer_probabilities=True)
    assert (prefer.mode, prefer.accumulate) == ("streaming", "fp32")
    prefer = plan_memory(shape, 14, 1, roi, 2, cpu, MemoryOptions(budget_gb=2.8), need_probabilities=False,
                         prefer_probabilities=True)
    assert (prefer.mode, prefer.accumulate) == ("full", "fp32")  # normalised in place: no second array
    with pytest.raises(ConfigError, match="streaming"):
        plan_memory(shape, 14, 1, roi, 2, cpu, MemoryOptions(stitch="streaming"), need_probabilities=True)


def test_tta_averages_the_mirrored_predictions_and_skips_left_right_by_default():
    net = TinyNet(seed=2)
    predictor = _predictor([net], (8, 8, 8))
    x = torch.rand(2, 1, 8, 8, 8)
    tta = WindowPredictor(predictor, "fp32", tta=True, tta_axes=["AP", "SI"])
    assert len(tta.flip_sets) == 4 and all("LR" not in axes for axes in tta.flip_sets)
    with torch.inference_mode():
        expected = sum(torch.softmax(net(x.flip(dims)), 1).flip(dims) if dims else torch.softmax(net(x), 1)
                       for dims in ([], [3], [4], [3, 4])) / 4
        np.testing.assert_allclose(tta(x).exp().numpy(), expected.numpy(), atol=1e-6)
    assert Config().predict.tta_axes == ["AP", "SI"]
    with pytest.raises(ConfigError, match="tta_axes"):
        WindowPredictor(predictor, "fp32", tta=True, tta_axes=["XY"])


def test_fold_ensemble_averages_softmax():
    nets = [TinyNet(seed=3), TinyNet(seed=4)]
    predictor = _predictor(nets, (8, 8, 8))
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.inference_mode():
        expected = (torch.softmax(nets[0](x), 1) + torch.softmax(nets[1](x), 1)) / 2
        np.testing.assert_allclose(WindowPredictor(predictor, "fp32")(x).exp().numpy(), expected.numpy(), atol=1e-6)


def test_two_d_model_sees_context_slices_and_predicts_every_slice():
    net = TinyNet(in_channels=3, dims=2, seed=5)
    predictor = _predictor([net], (20, 16), mode="2d", context=1)
    array = np.random.default_rng(2).random((20, 16, 7)).astype(np.float32)
    image, roi = network_input(array, predictor)
    assert roi == (20, 16, 1) and image.shape == (3, 20, 16, 7)
    np.testing.assert_array_equal(image[0, :, :, 0].numpy(), array[:, :, 0])   # clamped below the first slice
    np.testing.assert_array_equal(image[0, :, :, 3].numpy(), array[:, :, 2])
    np.testing.assert_array_equal(image[2, :, :, 6].numpy(), array[:, :, 6])   # clamped above the last
    out = sliding_window_predict(array, predictor, _options(batch_size_2d=3), need_probabilities=True)
    with torch.inference_mode():
        direct = torch.softmax(net(image.permute(3, 0, 1, 2)), 1).permute(1, 2, 3, 0).numpy()
    np.testing.assert_allclose(out.probabilities, direct, atol=1e-5)
    si = WindowPredictor(predictor, "fp32", tta=True, tta_axes=["SI"])
    assert len(si.flip_sets) == 2  # SI mirroring of 2.5D input = reversed context order


@pytest.mark.parametrize("network", [
    {"name": "UNet", "kwargs": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 2, "norm": "INSTANCE"}},
    {"name": "UNet", "kwargs": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 2, "norm": "BATCH"}},
    {"name": "ClassicUNet", "kwargs": {"features": [4, 8, 16], "norm": "instance"}},
    {"name": "DynUNet", "kwargs": {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2],
                                   "filters": [8, 16, 32], "norm_name": "INSTANCE", "deep_supervision": False}},
])
def test_inference_rewrites_keep_the_network_s_outputs(network):
    from pipeline.models import build_network

    spec = {"network": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, **network}, "patch_size": [32] * 3}
    torch.manual_seed(0)
    original = build_network(spec["network"]).eval()
    for module in original.modules():  # non-trivial batch-norm statistics, so folding is really tested
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    rewritten, report = optimise_for_inference(original, spec, torch.device("cpu"))
    assert report["checked"] and "channels-last layout" in report["applied"]
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.inference_mode():
        expected = original(x)
        got = rewritten(x.contiguous(memory_format=torch.channels_last_3d))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4, rtol=1e-4)


def test_model_folder_loads_with_labels_and_rewrites(tmp_path: Path):
    folder = write_small_model(tmp_path / "model", folds=2)
    predictor = load_predictor(folder, torch.device("cpu"))
    assert len(predictor.networks) == 2 and predictor.class_values == [0, 1, 2, 3]
    assert [lbl.name for lbl in predictor.labels] == ["liver", "spleen", "kidneys"]
    assert predictor.optimisation["checked"] and len(predictor.spec_sha256) == 64


def test_predict_folds_selects_networks_of_the_model_folder(tmp_path: Path):
    from pipeline.errors import ConfigError

    folder = write_small_model(tmp_path / "model", folds=3)
    everything = load_predictor(folder, torch.device("cpu"), optimize=False)
    only_second = load_predictor(folder, torch.device("cpu"), optimize=False, folds=[1])
    assert len(everything.networks) == 3 and len(only_second.networks) == 1
    assert [f["fold"] for f in only_second.spec["folds"]] == [1]
    for mine, reference in zip(only_second.networks[0].state_dict().values(),
                               everything.networks[1].state_dict().values()):
        assert torch.equal(mine, reference)  # fold 1's weights, not fold 0's
    with pytest.raises(ConfigError, match=r"predict.folds must name folds .*\(\[0, 1, 2\]\), got \[5\]"):
        load_predictor(folder, torch.device("cpu"), folds=[5])


def test_window_count_matches_overlap():
    grid = window_grid((186, 148, 150), (96, 96, 96), 0.5)
    assert len(grid.starts) == 27
    assert math.prod(len({s[d] for s in grid.starts}) for d in range(3)) == 27


ZSCORE = {"mode": "percentile_zscore", "low": -71.0, "high": 236.6, "mean": 36.6, "std": 74.4}


@pytest.mark.parametrize("intensity,air", [({"mode": "window", "low": -200.0, "high": 300.0}, 0.0),
                                           (ZSCORE, (-71.0 - 36.6) / 74.4)])
def test_a_volume_smaller_than_the_window_is_padded_with_air_not_with_zero(intensity, air):
    """Training pads small cases with their minimum (air); predict and validation pad with the plan's air value
    too. Under percentile_zscore 0 is the foreground mean (soft tissue): padding with it changed border labels."""
    from pipeline.preprocess.transform import air_input_value

    assert air_input_value(intensity) == pytest.approx(air, abs=1e-6)
    predictor = _predictor([TinyNet(seed=4)], (16, 16, 16))
    predictor.spec["plan"] = {"intensity": intensity}
    assert predictor.pad_value == pytest.approx(air, abs=1e-6)
    rng = np.random.default_rng(1)
    array = (air + rng.random((11, 16, 9))).astype(np.float32)  # padded to 16 along i and k
    padded = np.full((16, 16, 16), air, dtype=np.float32)
    padded[2:13, :, 3:12] = array  # where the window grid puts it: (16 - 11) // 2, (16 - 9) // 2
    ours = sliding_window_predict(array, predictor, _options(), need_probabilities=True)
    explicit = sliding_window_predict(padded, predictor, _options(), need_probabilities=True)
    np.testing.assert_allclose(ours.probabilities, explicit.probabilities[:, 2:13, :, 3:12], atol=1e-6)
    if air != 0.0:  # and zero padding would have given other probabilities at the borders
        predictor.spec["plan"] = {}
        zero = sliding_window_predict(array, predictor, _options(), need_probabilities=True)
        assert np.abs(zero.probabilities - ours.probabilities).max() > 1e-3


def test_training_validation_pads_with_the_plans_air_value():
    from pipeline.train.data import SamplingSpec
    from pipeline.train.loop import FoldJob, ValidationWindow
    from pipeline.train.options import TrainConfig
    from pipeline.train.runtime import Runtime

    options = TrainConfig()
    options.precision = "fp32"
    spec = {"name": "tiny", "spatial_dims": 3, "in_channels": 1, "out_channels": 3}
    job = FoldJob(fold=0, folder=Path("fold_0"), options=options, seed=0, stage_hash="0" * 64, network_spec=spec,
                  sampling=SamplingSpec("3d", [16, 16, 16], 0), batch_size=2, class_names=["a", "b"],
                  train_cases=[], val_cases=[], resume=False, intensity=ZSCORE)
    runtime = Runtime(device=torch.device("cpu"), autocast_dtype=None, use_grad_scaler=False, channels_last=False,
                      precision_reason="pinned by the test")
    window = ValidationWindow.for_job(TinyNet().eval(), job, runtime, channels_last=False)
    assert window.predictor.pad_value == pytest.approx((-71.0 - 36.6) / 74.4, abs=1e-6)


def test_the_class_choice_is_argmax_with_its_tie_and_nan_rules():
    # sliding_window_predict takes the classes with torch.max(dim=0).indices (faster than argmax on the CPU);
    # it must pick exactly what argmax picks, ties (the first class) and NaN included
    scores = torch.randn(4, 9, 7, 40)
    scores[2, :3] = scores[1, :3]             # ties between classes 1 and 2
    scores[:, 3:5] = 0.5                      # all four classes tied
    scores[3, 5, 0, :5] = float("nan")        # a NaN
    assert torch.equal(torch.max(scores, dim=0).indices, scores.argmax(dim=0))
    assert torch.equal(torch.max(scores[:, :, :, 8:30], dim=0).indices, scores[:, :, :, 8:30].argmax(dim=0))


def test_one_network_blends_logits_and_gives_the_labels_and_probabilities_of_log_probabilities(monkeypatch):
    net = TinyNet(seed=7)
    predictor = _predictor([net], (8, 8, 8))
    x = torch.rand(2, 1, 8, 8, 8)
    window = WindowPredictor(predictor, "fp32")
    with torch.inference_mode():
        logits = net(x)
        np.testing.assert_array_equal(window(x, logits_ok=True).numpy(), logits.numpy())  # one network: as they are
        np.testing.assert_allclose(window(x).numpy(), torch.log_softmax(logits, 1).numpy(), atol=1e-6)
        tta = WindowPredictor(predictor, "fp32", tta=True, tta_axes=["AP"])  # two passes: always log(mean softmax)
        np.testing.assert_array_equal(tta(x, logits_ok=True).numpy(), tta(x).numpy())
    # the whole sliding window, with overlapping windows: the blend of logits against the blend of log-probabilities
    array = np.random.default_rng(3).random((21, 17, 13)).astype(np.float32)
    fast = sliding_window_predict(array, predictor, _options(overlap=0.5), need_probabilities=True)
    calls = []
    original = WindowPredictor.__call__

    def log_probabilities_only(self, patches, logits_ok=False):
        calls.append(logits_ok)
        return original(self, patches)

    monkeypatch.setattr(WindowPredictor, "__call__", log_probabilities_only)
    slow = sliding_window_predict(array, predictor, _options(overlap=0.5), need_probabilities=True)
    assert calls and all(calls)  # a float32 buffer asked for logits
    np.testing.assert_allclose(fast.probabilities, slow.probabilities, atol=1e-6)
    np.testing.assert_array_equal(fast.classes, slow.classes)
    # a half-precision buffer blends log-probabilities (its clamp at -60 is only right for those)
    calls.clear()
    half = sliding_window_predict(array, predictor, _options(overlap=0.5, memory=MemoryOptions(accumulate="fp16")))
    assert calls and not any(calls) and half.plan.accumulate == "fp16"
