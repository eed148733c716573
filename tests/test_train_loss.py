"""The DiceCE loss options: per-patch against batch Dice, with and without the background class."""
from __future__ import annotations

import torch

from pipeline.config import load_config, section_hash, to_dict
from pipeline.train import stage
from pipeline.train.loop import make_loss


def _batch():
    # patch 0 holds foreground in one corner and the network finds it; patch 1 has none and the network
    # predicts a little foreground there (logits favour background everywhere but 8 voxels)
    target = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    target[0, 0, :4, :4, :4] = 1
    logits = torch.zeros(2, 2, 8, 8, 8)
    logits[:, 0] = 4.0
    logits[0, 1, :4, :4, :4] = 8.0
    logits[1, 1, :2, :2, :2] = 8.0
    return logits, target


def test_batch_dice_does_not_score_an_empty_patch_on_its_own():
    logits, target = _batch()
    per_patch = make_loss(3, load_config([], ["train.dice_include_background=false"]).train)
    batch = make_loss(3, load_config([], ["train.dice_include_background=false", "train.batch_dice=true"]).train)
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0])
    # per patch: the empty patch's foreground Dice is ~0 whatever is predicted there, so the mean Dice loss is
    # about (small + 1) / 2; over the batch the 8 false voxels only dilute one Dice of 64 true ones
    probs = logits.softmax(1)[:, 1]
    fg = target[:, 0].float()
    batch_dice = 2 * (probs * fg).sum() / (probs.sum() + fg.sum())
    patch_dice = [2 * (probs[i] * fg[i]).sum() / (probs[i].sum() + fg[i].sum()) for i in range(2)]
    assert torch.isclose(batch(logits, target), ce + 1 - batch_dice, atol=1e-4)
    assert torch.isclose(per_patch(logits, target), ce + 1 - sum(patch_dice) / 2, atol=1e-4)
    assert per_patch(logits, target) - batch(logits, target) > 0.3


def test_the_background_class_enters_the_dice_by_default():
    logits, target = _batch()
    default = make_loss(3, load_config([], []).train)
    no_background = make_loss(3, load_config([], ["train.dice_include_background=false"]).train)
    assert not torch.isclose(default(logits, target), no_background(logits, target))


def test_the_new_loss_options_at_their_defaults_keep_the_hash_of_models_trained_before_them(monkeypatch):
    monkeypatch.setattr(stage, "upstream_hash", lambda folder, name: "preprocess-hash")
    cfg = load_config([], [])
    options = {k: v for k, v in to_dict(cfg.train).items()
               if k not in stage.RUNTIME_ONLY and k not in ("batch_dice", "dice_include_background")}
    assert stage.train_hash(cfg) == section_hash(options, {"seed": cfg.seed}, "preprocess-hash")
    assert stage.train_hash(load_config([], ["train.batch_dice=true"])) != stage.train_hash(cfg)
    assert stage.train_hash(load_config([], ["train.dice_include_background=false"])) != stage.train_hash(cfg)
