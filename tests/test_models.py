"""Networks: the paper U-Net's exact size and shapes, every buildable spec, and the model-folder loader."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline import atomic
from pipeline.errors import ConfigError, InputError
from pipeline.models import MODEL_FORMAT, ClassicUNet, build_network, load_model_folder, network_spec


def test_paper_unet_has_31030658_parameters_and_maps_572_to_388():
    net = ClassicUNet(2, 1, 2, padding="valid", upsample="transposed", norm=None)
    assert sum(p.numel() for p in net.parameters()) == 31_030_658
    with torch.no_grad():
        out = net.eval()(torch.zeros(1, 1, 572, 572))
    assert tuple(out.shape) == (1, 2, 388, 388)


@pytest.mark.parametrize("upsample", ["interp", "transposed"])
def test_same_padding_keeps_odd_sizes(upsample):
    net = ClassicUNet(2, 1, 3, features=(4, 8, 16, 32, 64), padding="same", upsample=upsample).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 255, 255))
    assert tuple(out.shape) == (1, 3, 255, 255)


def test_classic_unet_3d_and_instance_norm():
    net = ClassicUNet(3, 2, 4, features=(4, 8, 16), norm="instance").eval()
    with torch.no_grad():
        out = net(torch.randn(1, 2, 17, 20, 23))
    assert tuple(out.shape) == (1, 4, 17, 20, 23)


def test_valid_padding_3d_centre_crops_skips():
    net = ClassicUNet(3, 1, 2, features=(4, 8), padding="valid", upsample="transposed", norm=None).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 20, 20, 20))
    # 20 -conv-conv-> 16 -pool-> 8 -conv-conv-> 4 -up-> 8 -conv-conv-> 4
    assert tuple(out.shape) == (1, 2, 4, 4, 4)


def test_gradient_checkpointing_gives_same_output_and_gradients():
    torch.manual_seed(0)
    plain = ClassicUNet(2, 1, 2, features=(4, 8, 16), norm=None, dropout=0.0)
    ckpt = ClassicUNet(2, 1, 2, features=(4, 8, 16), norm=None, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 32)
    out_plain, out_ckpt = plain(x), ckpt(x)
    torch.testing.assert_close(out_plain, out_ckpt)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_dropout_sits_at_the_bottleneck():
    net = ClassicUNet(2, 1, 2, features=(4, 8, 16), dropout=0.5)
    assert isinstance(net.downs[-1].conv.block[-1], torch.nn.Dropout2d)
    assert not any(isinstance(m, torch.nn.Dropout2d) for m in net.downs[0].modules())


@pytest.mark.parametrize("name", ["UNet", "DynUNet", "SegResNet", "ClassicUNet"])
@pytest.mark.parametrize("dims,patch", [(3, [16, 16, 16]), (2, [32, 32])])
def test_every_network_builds_from_a_json_spec_and_keeps_size(name, dims, patch):
    spec = network_spec(name, dims, 3, 4, [4, 8, 16], patch)
    spec = json.loads(json.dumps(spec))  # what model.json stores
    net = build_network(spec).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, *patch))
    assert tuple(out.shape) == (1, 4, *patch)


def test_dynunet_deep_supervision_stacks_heads_in_training_only():
    net = build_network(network_spec("DynUNet", 3, 1, 3, [4, 8, 16, 32], [16, 16, 16]))
    out = net.train()(torch.randn(2, 1, 16, 16, 16))
    assert tuple(out.shape) == (2, 3, 3, 16, 16, 16)  # [batch, 1 + deep_supr_num, classes, ...]
    with torch.no_grad():
        assert tuple(net.eval()(torch.randn(1, 1, 16, 16, 16)).shape) == (1, 3, 16, 16, 16)


def test_patch_not_divisible_by_levels_is_a_config_error():
    with pytest.raises(ConfigError, match="multiple of 8"):
        network_spec("UNet", 3, 1, 2, [4, 8, 16, 32], [20, 20, 20])


def test_unknown_network_name_in_spec_is_an_input_error():
    with pytest.raises(InputError, match="network name must be one of"):
        build_network({"name": "VNet9000", "spatial_dims": 3, "in_channels": 1, "out_channels": 2})


def _write_model_folder(folder, network_name="UNet"):
    spec = network_spec(network_name, 3, 1, 2, [4, 8], [8, 8, 8])
    torch.manual_seed(1)
    net = build_network(spec)
    (folder / "fold_0").mkdir(parents=True)
    torch.save(net.state_dict(), folder / "fold_0" / "model_best.pt")
    model = {"format": MODEL_FORMAT, "network": spec, "mode": "3d", "context_slices": 0, "patch_size": [8, 8, 8],
             "plan": {"target_spacing": [2.0, 2.0, 2.0], "intensity": {"mode": "window", "low": -200, "high": 300}},
             "labels": [{"name": "liver", "value": 1, "color": [255, 0, 0]}],
             "folds": [{"fold": 0, "checkpoint": "fold_0/model_best.pt", "val_dice": {"liver": 0.5}}]}
    atomic.write_json(folder / "model.json", model)
    return net


def test_loader_round_trips_weights(tmp_path):
    net = _write_model_folder(tmp_path / "model")
    bundle = load_model_folder(tmp_path / "model")
    assert len(bundle.networks) == 1 and not bundle.networks[0].training
    assert bundle.class_values == [0, 1]
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(bundle.networks[0](x), net.eval()(x))


def test_loader_names_a_missing_checkpoint(tmp_path):
    _write_model_folder(tmp_path / "model")
    (tmp_path / "model" / "fold_0" / "model_best.pt").unlink()
    with pytest.raises(InputError, match="fold_0/model_best.pt"):
        load_model_folder(tmp_path / "model")


def test_loader_rejects_unknown_format_and_missing_json(tmp_path):
    _write_model_folder(tmp_path / "model")
    spec = json.loads((tmp_path / "model" / "model.json").read_text())
    spec["format"] = "other-tool/3"
    (tmp_path / "model" / "model.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="format 'ctseg-model/1'"):
        load_model_folder(tmp_path / "model")
    (tmp_path / "model" / "model.json").unlink()
    with pytest.raises(InputError, match="must contain model.json"):
        load_model_folder(tmp_path / "model")
    with pytest.raises(InputError, match="does not exist"):
        load_model_folder(tmp_path / "nowhere")


def test_loader_rejects_weights_of_another_network(tmp_path):
    _write_model_folder(tmp_path / "model")
    other = build_network(network_spec("UNet", 3, 1, 2, [4, 8, 16], [8, 8, 8]))
    torch.save(other.state_dict(), tmp_path / "model" / "fold_0" / "model_best.pt")
    with pytest.raises(InputError, match="must match the network in model.json"):
        load_model_folder(tmp_path / "model")


def test_loader_refuses_checkpoint_paths_outside_the_folder(tmp_path):
    _write_model_folder(tmp_path / "model")
    spec = json.loads((tmp_path / "model" / "model.json").read_text())
    spec["folds"][0]["checkpoint"] = "../../etc/passwd"
    (tmp_path / "model" / "model.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="inside the model folder"):
        load_model_folder(tmp_path / "model")
