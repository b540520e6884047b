"""Prunable units beyond conv filters, found from the model itself, on the popular Hub architectures of timm and
transformers: the expected kinds are found, a zeroed unit is truly inactive (random values on its producer side
leave the logits bit for bit unchanged), a zeroed neuron or head gets exactly zero gradient (fine-tuning cannot
revive it), and zeroing keeps every state-dict key and shape. Then real backdoors, really removed, through the CLI."""

import json

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file

from conftest import PRUNING, built_once, read_report, run_cli
from hf_gradprune.demo import TINY_VIT, build_backdoored_digits, digits_architectures
from hf_gradprune.hub import Classifier, load_model
from hf_gradprune.units import KINDS, UnitPruner, find_units
from test_errors import assert_one_line_error

HALF = [0.5] * 3


def timm_net(arch, **kw):
    return lambda: Classifier(timm.create_model(arch, num_classes=10, **kw), "timm", 1 / 255, HALF, HALF)


def hf_net(config, **kw):
    def build():
        cfg = getattr(transformers, f"{config}Config")(num_labels=10, **kw)
        return Classifier(transformers.AutoModelForImageClassification.from_config(cfg), "transformers", 1 / 255,
                          HALF, HALF)
    return build


TINY_SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(2, 4))
ARCHS = {  # name: (builder, the unit kinds it must have)
    "timm-vit": (timm_net("vit_tiny_patch16_224", **TINY_VIT), {"head", "neuron"}),
    "timm-deit-distilled": (timm_net("deit_tiny_distilled_patch16_224", **TINY_VIT), {"head", "neuron"}),
    "timm-swin": (timm_net("swin_tiny_patch4_window7_224", **TINY_SWIN), {"head", "neuron"}),
    "timm-convnext": (timm_net("convnext_atto", dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)), {"neuron"}),
    "timm-mobilenetv3": (timm_net("mobilenetv3_small_050"), {"filter", "neuron"}),  # neurons: squeeze-excite
    "timm-regnety": (timm_net("regnety_002"), {"filter", "neuron"}),
    # pre-activation: conv3 writes the stream
    "timm-resnetv2": (timm_net("resnetv2_50", layers=(1, 1, 1, 1)), {"filter"}),
    "hf-vit": (hf_net("ViT", image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                      intermediate_size=96), {"head", "neuron"}),
    "hf-swin": (hf_net("Swin", image_size=32, patch_size=2, embed_dim=24, depths=[1, 1], num_heads=[2, 4],
                       window_size=4), {"head", "neuron"}),
    "hf-convnext": (hf_net("ConvNext", hidden_sizes=[16, 32], depths=[1, 1], num_stages=2), {"neuron"}),
    "hf-resnet": (hf_net("ResNet", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"),
                  {"filter"}),
}


def as_if_trained(model: torch.nn.Module) -> torch.nn.Module:
    """timm zero-initialises the last norm of each residual branch (and layer scales start small): give every norm
    and layer scale trained-looking values, so that every branch matters as in a real checkpoint."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and (name.endswith("norm.weight") or "bn" in name or "norm" in name.split(".")[-2]
                                 or name.endswith("gamma") or "layer_scale" in name):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def images(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_units_are_found_and_truly_inactive_once_zeroed(arch):
    build, kinds = ARCHS[arch]
    torch.manual_seed(0)
    model = as_if_trained(build())
    x = images()
    families = find_units(model, model.net, x[:2])
    assert {f.kind for f in families} == kinds
    layers = [f.layer for f in families]
    assert len(layers) == len(set(layers)), "a layer's units are found once"
    keys = {k: v.shape for k, v in model.net.state_dict().items()}
    pruner = UnitPruner(families)
    for i, fam in enumerate(families):
        pruner.prune(i, fam.count // 2)
    assert {k: v.shape for k, v in model.net.state_dict().items()} == keys
    with torch.no_grad():
        pruned = model(x)
        for fam in families:  # random values on everything the unit writes before the cut
            for part in (p for p in fam.parts if p.producer):
                idx = part.index[fam.count // 2]
                part.param.index_copy_(part.dim, idx, torch.randn_like(part.param.index_select(part.dim, idx)))
        assert torch.equal(model(x), pruned)
    pruner.reapply()
    model.train()
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
    for fam in families:
        if fam.kind == "filter":
            continue  # a filter's batch-norm bias still learns in train mode: fine-tuning re-zeroes it every step
        for part in fam.parts:
            grad = part.param.grad.index_select(part.dim, part.index[fam.count // 2])
            assert torch.count_nonzero(grad) == 0, (fam.kind, fam.layer)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_layer_whose_units_were_all_pruned_is_still_found(arch):
    """A defended model reloaded (or defended twice) may have a layer with no unit left: what it reads and writes
    has not changed, so it is the same family, found the same way."""
    build, _ = ARCHS[arch]
    torch.manual_seed(0)
    model = as_if_trained(build())
    x = images(2)
    before = [(f.kind, f.layer, f.count) for f in find_units(model, model.net, x)]
    pruner = UnitPruner(find_units(model, model.net, x))
    by_kind: dict[str, list[int]] = {}
    for i, fam in enumerate(pruner.families):
        by_kind.setdefault(fam.kind, []).append(i)
    for i in (members[len(members) // 2] for members in by_kind.values()):  # one layer of each kind, in turn
        fam = pruner.families[i]
        for unit in range(fam.count):
            pruner.prune(i, unit)
        zeroed = {k: v.clone() for k, v in model.net.state_dict().items()}
        assert [(f.kind, f.layer, f.count) for f in find_units(model, model.net, x)] == before, fam.layer
        assert all(torch.equal(v, zeroed[k]) for k, v in model.net.state_dict().items())  # the check left no trace
        for _ in range(fam.count):
            pruner.undo_last()


def test_a_residual_stream_channel_is_never_a_unit():
    """ViT's patch embedding and ConvNeXt's stem feed every block (the stem through a LayerNorm over all channels):
    zeroing one of their channels is not silencing a unit, so they are not candidates."""
    for arch, stream in (("timm-vit", "patch_embed.proj"), ("timm-convnext", "stem.0")):
        model = as_if_trained(ARCHS[arch][0]())
        layers = {f.layer for f in find_units(model, model.net, images(2))}
        assert stream not in layers and not any(name.endswith(("fc2", "proj")) for name in layers)


# a tiny digits model of each family with a real BadNets backdoor, defended through the CLI (kinds: ARCHS); the
# transformers ResNet: tests/test_main_job.py
E2E = {name: recipe for name, recipe in digits_architectures().items() if name != "hf-resnet"}


@pytest.fixture(scope="module", params=list(E2E))
def defended(request, tmp_path_factory):
    def build(folder):
        built = build_backdoored_digits(folder, **{"library": "timm", **E2E[request.param]})
        out = folder / "sanitised"
        assert run_cli(built["model"], "--data", built["data"], "--output", out, "--quiet", *PRUNING) == 0
        return built, out

    built, out = built_once(tmp_path_factory, f"arch-{request.param}", build)
    return built, out, read_report(out), ARCHS[request.param][1]


@pytest.mark.slow
def test_backdoor_removed_by_pruning_units_of_the_architecture(defended):
    built, out, report, kinds = defended
    before, after = report["before"], report["after"]
    assert before["asr"] > 0.9 and after["asr"] < 0.1
    assert before["acc"] - after["acc"] <= 0.10
    tried = {r["kind"] for r in report["prune"]["rounds"]}  # pruning worked on the architecture's own units
    assert tried and tried <= kinds and {p["kind"] for p in report["pruned"]} <= tried


@pytest.mark.slow
def test_output_reloads_with_the_same_config_and_keys_and_pruned_units_stay_silent(defended):
    built, out, report, _ = defended
    assert json.loads((out / "config.json").read_text()) == json.loads((built["model"] / "config.json").read_text())
    source, saved = load_file(built["model"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in source.items()}
    loaded = load_model(str(out))  # through the library's own loading (timm local-dir:, from_pretrained)
    model = loaded.model
    families = {(f.kind, f.layer): f for f in find_units(model, loaded.net, images(2))}
    x = images(8)
    with torch.no_grad():
        logits = model(x)
        for unit in report["pruned"]:
            fam = families[(unit["kind"], unit["layer"])]
            for part in fam.parts:  # every slice of the unit is exactly zero after fine-tuning
                assert torch.count_nonzero(part.param.index_select(part.dim, part.index[unit["index"]])) == 0, unit
            for part in (p for p in fam.parts if p.producer):
                idx = part.index[unit["index"]]
                part.param.index_copy_(part.dim, idx, torch.randn_like(part.param.index_select(part.dim, idx)))
        assert torch.equal(model(x), logits)  # the pruned units are inactive in the saved model


@pytest.mark.slow
def test_card_names_the_unit_kinds(defended):
    built, out, report, _ = defended
    card = (out / "README.md").read_text()
    for unit in report["pruned"]:  # the table's row of the unit's layer names its kind
        assert f"| `{unit['layer']}` | {KINDS[unit['kind']]} |" in card


@pytest.mark.slow
@pytest.mark.parametrize("defended", ["timm-vit", "timm-convnext", "hf-swin"], indirect=True)
@pytest.mark.parametrize("method", ["clp", "anp"])
def test_batch_norm_methods_refuse_a_model_without_one(defended, method, tmp_path, capsys):
    built, _, _, kinds = defended
    assert "filter" not in kinds
    out = tmp_path / "out"
    code = run_cli(built["model"], "--data", built["data"], "--output", out, "--quiet", "--method", method)
    assert_one_line_error(capsys, out, f"--method {method} works on", "methods for this model: gradprune, ft, fp",
                          code=code)
