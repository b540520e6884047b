"""The pieces the method rests on, each checked against a hand computation."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from hf_gradprune.data import align_classes, draw_few_shot
from hf_gradprune.errors import UserError
from hf_gradprune.prune import FilterPruner, accuracy_dropped, filter_scores, norms_fed_by_convs, unit_scores
from hf_gradprune.triggers import TriggerSpec, badnet_patch_size, make_trigger
from hf_gradprune.units import UnitPruner, find_units


def images(n=4, size=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 200, (n, 3, size, size), dtype=np.uint8))


# ---- triggers -------------------------------------------------------------------------------------------------

def test_badnet_is_backdoorbench_patch_and_scales():
    x = images()
    y = make_trigger(TriggerSpec("badnet"), (32, 32))(x)
    assert (y[..., -3:, -3:] == 255).all()
    assert torch.equal(y[..., :-3, :], x[..., :-3, :]) and torch.equal(y[..., :, :-3], x[..., :, :-3])
    assert badnet_patch_size((224, 224)) == 21 and badnet_patch_size((32, 32)) == 3


def test_blended_patch_bpp_additive_pixel_math(tmp_path):
    x = images()
    t = np.full((16, 16, 3), 250, np.uint8)  # resized to 32x32 on load
    Image.fromarray(t).save(tmp_path / "t.png")
    y = make_trigger(TriggerSpec("blended", image=str(tmp_path / "t.png"), alpha=0.2), (32, 32))(x)
    assert torch.equal(y, (0.8 * x.float() + 0.2 * 250).to(torch.uint8))  # truncating cast

    mask = np.zeros((32, 32), np.uint8)
    mask[:4, :4] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    y = make_trigger(TriggerSpec("patch", image=str(tmp_path / "t.png"), mask=str(tmp_path / "m.png")), (32, 32))(x)
    assert (y[..., :4, :4] == 250).all() and torch.equal(y[..., 4:, :], x[..., 4:, :])

    y = make_trigger(TriggerSpec("bpp", bpp_levels=8), (32, 32))(x)
    assert len(torch.unique(y)) <= 8 and (y.float() - x.float()).abs().max() <= 255 / 7 / 2 + 1

    pert = np.full((8, 8, 3), 10.0, np.float32)
    np.save(tmp_path / "p.npy", pert)
    y = make_trigger(TriggerSpec("additive", image=str(tmp_path / "p.npy")), (32, 32))(x)
    assert torch.equal(y, (x.int() + 10).clamp(0, 255).to(torch.uint8))


def test_bad_trigger_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(UserError, match="--trigger-image .*bad.png: cannot read"):
        make_trigger(TriggerSpec("blended", image=str(tmp_path / "bad.png")), (32, 32))
    np.save(tmp_path / "four.npy", np.zeros((32, 32, 4)))
    with pytest.raises(UserError, match="shape"):
        make_trigger(TriggerSpec("additive", image=str(tmp_path / "four.npy")), (32, 32))
    with pytest.raises(UserError, match="needs --trigger-image"):
        make_trigger(TriggerSpec("blended"), (32, 32))
    with pytest.raises(UserError, match="no such file"):
        make_trigger(TriggerSpec("blended", image=str(tmp_path / "missing.png")), (32, 32))


# ---- few-shot draw ------------------------------------------------------------------------------------------

def test_spc_counts_train_plus_val_and_draws_are_seeded_and_balanced():
    labels = np.repeat(np.arange(5), 30)
    tr, va = draw_few_shot(labels, 5, 2, 0.1, 0, None, "train")
    assert sorted(labels[tr]) == list(range(5)) and sorted(labels[va]) == list(range(5))  # 2 SPC = 1 + 1
    tr, va = draw_few_shot(labels, 5, 10, 0.1, 0, None, "train")
    assert np.bincount(labels[tr]).tolist() == [9] * 5 and np.bincount(labels[va]).tolist() == [1] * 5
    assert not set(tr) & set(va)
    assert draw_few_shot(labels, 5, 10, 0.1, 0, None, "train") == (tr, va)
    assert draw_few_shot(labels, 5, 10, 0.1, 1, None, "train") != (tr, va)
    tr, va = draw_few_shot(labels, 5, 20, 0.1, 0, None, "train")
    assert len(va) == 10 and len(tr) == 90


def test_class_too_small_is_an_error_not_dropped():
    labels = np.array([0] * 20 + [1] * 3)
    with pytest.raises(UserError, match=r"--spc 10: class 1 \(b\) has only 3 images"):
        draw_few_shot(labels, 2, 10, 0.1, 0, ["a", "b"], "split 'train'")


def test_class_names_are_aligned_to_the_model_or_refused():
    assert align_classes(["cat", "dog"], np.array([0, 1]), ["Cat", "dog"], 2, "d", "m") is None
    assert align_classes(["cat", "dog"], np.array([0, 1]), ["LABEL_0", "LABEL_1"], 2, "d", "m") is None
    # an image folder sorts its class names: each dataset label goes to the model's index of the same name
    assert align_classes(["eight", "five", "one"], np.array([0, 1, 2]), ["one", "Five", "eight"], 3, "d", "m") \
        == [2, 1, 0]
    with pytest.raises(UserError, match=r"not MODEL m's labels \(only in the data: 'dog'; only in the model: 'bird'\)"):
        align_classes(["cat", "dog"], np.array([0, 1]), ["cat", "bird"], 2, "d", "m")
    with pytest.raises(UserError, match="3 classes, but MODEL m has 2 outputs"):
        align_classes(["a", "b", "c"], np.array([0, 1]), None, 2, "d", "m")


# ---- stop rule ------------------------------------------------------------------------------------------------

def test_alpha_compares_counts():
    assert not accuracy_dropped(10, 9, 10, 0.1)  # one miss in 10 is tolerated
    assert accuracy_dropped(10, 8, 10, 0.1)  # two stop
    assert not accuracy_dropped(30, 27, 30, 0.1)  # 0.1 * 30 is 3.0000000000000004 in floats
    assert accuracy_dropped(30, 26, 30, 0.1)


# ---- pruning mechanics ----------------------------------------------------------------------------------------

class Tangled(nn.Module):
    """Module order lies: bn_a is declared next to conv_b but is fed by conv_a."""

    def __init__(self):
        super().__init__()
        self.conv_b = nn.Conv2d(4, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn_a(self.conv_a(x.float() / 255)))
        x = F.relu(self.bn_b(self.conv_b(x)))
        x = self.dw(x)
        return self.head(x.mean((2, 3)))


def randomised(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-1, 1)
    return model.eval()


def test_norm_pairing_follows_tensors_not_module_order():
    model = randomised(Tangled())
    pairs = norms_fed_by_convs(model, model, images(1, 8))
    assert pairs == {"conv_a": [model.bn_a], "conv_b": [model.bn_b]}


def test_pruned_channel_is_zero_after_norm_and_stays_zero_through_training():
    model = randomised(Tangled())
    pruner = FilterPruner(model, model, images(1, 8))
    assert [n for n, _ in pruner.convs] == ["conv_b", "conv_a", "dw"] and pruner.num_filters == 16
    pruner.prune(1, 2)  # conv_a filter 2
    out = {}
    hook = model.bn_a.register_forward_hook(lambda m, i, o: out.setdefault("a", o))
    with torch.no_grad():
        model(images(2, 8))
    hook.remove()
    assert out["a"][:, 2].abs().max() == 0 and out["a"][:, 1].abs().max() > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(images(4, 8)).sum().backward()
        opt.step()
        pruner.reapply()
    assert model.conv_a.weight[2].abs().sum() == 0 and model.bn_a.weight[2] == 0 and model.bn_a.bias[2] == 0
    before = model.conv_a.weight.detach().clone()
    pruner.undo_last()
    assert model.conv_a.weight[2].abs().sum() > 0 and torch.equal(model.conv_a.weight[:2], before[:2])


def test_filter_scores_are_mean_abs_grad_of_unlearning_loss():
    model = randomised(Tangled())
    x, y = images(6, 8, seed=1), torch.tensor([0, 1, 2, 0, 1, 2])
    pruner = FilterPruner(model, model, x[:1])
    scores = filter_scores(model, pruner.convs, x, y, batch_size=4)  # two batches, summed
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    expected = torch.cat([c.weight.grad.abs().mean((1, 2, 3)) for _, c in pruner.convs])
    assert torch.allclose(scores, expected, rtol=1e-5, atol=1e-7)
    assert scores.shape == (16,)  # depthwise filters scored too
    assert all(p.grad is None or p is None for p in [model.head.weight.grad])


def test_score_variants_grad_x_weight_and_layer_normalisation():
    model = randomised(Tangled())
    x, y = images(6, 8, seed=1), torch.tensor([0, 1, 2, 0, 1, 2])
    pruner = FilterPruner(model, model, x[:1])
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    gxw = [(c.weight.grad * c.weight).abs().mean((1, 2, 3)) for _, c in pruner.convs]
    model.zero_grad()
    scores = filter_scores(model, pruner.convs, x, y, batch_size=4, score="grad_x_weight")
    assert torch.allclose(scores, torch.cat(gxw), rtol=1e-5, atol=1e-7)
    normed = filter_scores(model, pruner.convs, x, y, batch_size=4, score="grad_x_weight", normalise="layer")
    sizes = [c.out_channels for _, c in pruner.convs]
    for layer, raw in zip(normed.split(sizes), gxw):
        assert torch.allclose(layer, raw / raw.mean(), rtol=1e-5)
        assert abs(float(layer.mean()) - 1) < 1e-5  # every layer competes on the same scale


def test_unit_scores_on_a_cnn_are_the_papers_filter_scores_bit_for_bit():
    """The engine scores every unit kind; on a CNN whose convs all feed batch norms it must give the paper's filter
    scores exactly, so the ResNet results of the filter-only engine are reproduced. Tangled's depthwise conv feeds
    no norm: a per-channel norm is what makes a filter a unit, so it is the one filter left out."""
    model = randomised(Tangled())
    x, y = images(6, 8, seed=1), torch.tensor([0, 1, 2, 0, 1, 2])
    pruner = FilterPruner(model, model, x[:1])
    families = find_units(model, model, x[:2])
    assert [(f.kind, f.layer) for f in families] == [("filter", "conv_b"), ("filter", "conv_a")]
    for score in ("grad", "grad_x_weight"):
        expected = filter_scores(model, pruner.convs, x, y, batch_size=4, score=score)[:10]  # conv_b, conv_a
        got = unit_scores(model, UnitPruner(families), x, y, batch_size=4, score=score)
        assert torch.equal(got, expected), score
