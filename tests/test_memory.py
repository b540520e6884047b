"""Memory set by the batch, not by the number of images; classes aligned by name when a dataset lists them in
another order; each local dataset folder read as itself."""

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from conftest import read_report, run_cli
from hf_gradprune.data import load_splits
from hf_gradprune.demo import DIGIT_NAMES, digits, timm_classifier, write_hub_dataset
from hf_gradprune.errors import UserError
from hf_gradprune.memory import choose_batch_size, parse_batch_size, parse_memory, saved_bytes


def test_memory_amounts_and_batch_sizes_parse():
    assert parse_memory("4GiB") == parse_memory("4g") == 4 * 2**30
    assert parse_memory("3.5GB") == 3_500_000_000 and parse_memory("512MiB") == 512 * 2**20
    assert parse_batch_size("auto") == "auto" and parse_batch_size("32") == 32
    for bad in ("lots", "-1GB", "4 parsecs"):
        with pytest.raises(UserError, match="--max-memory"):
            parse_memory(bad)


def test_saved_bytes_grow_with_the_batch_and_the_choice_with_the_budget():
    model = timm_classifier("resnet18", DIGIT_NAMES, size=32).eval()
    x = torch.zeros(3, 32, 32, dtype=torch.uint8)
    one, two, four = (saved_bytes(model, x.expand(n, -1, -1, -1).contiguous()) for n in (1, 2, 4))
    assert 0 < one < two < four and abs((four - two) - 2 * (two - one)) <= 0.01 * four  # linear in the batch
    assert all(p.grad is None for p in model.parameters())  # measuring leaves no gradient behind
    small = choose_batch_size(model, x, torch.device("cpu"), max_memory=40 * (two - one))
    large = choose_batch_size(model, x, torch.device("cpu"), max_memory=80 * (two - one))
    assert 1 <= small.batch_size < large.batch_size <= 256
    assert abs(large.batch_size - 2 * small.batch_size) <= 2
    assert choose_batch_size(model, x, torch.device("cpu"), max_memory=10**12).batch_size == 256
    assert choose_batch_size(model, x, torch.device("cpu"), max_memory=1).batch_size == 1


@pytest.mark.slow
def test_pruning_decisions_do_not_depend_on_the_batch_size(timm_backdoor, tmp_path):
    """Gradients are summed over chunks, checks count over chunks: 7 images at a time prunes what 256 at a time
    does; fine-tuning steps of 128 images are accumulated over chunks of 7 and still remove the backdoor."""
    reports = {}
    for batch in ("256", "7"):
        out = tmp_path / f"b{batch}"
        assert run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], "--output", out, "--quiet",
                       "--max-rounds", "40", "--batch-size", batch, "--eval-limit", "200") == 0
        reports[batch] = read_report(out)
    big, small = reports["256"], reports["7"]
    assert small["batch"] == {**small["batch"], "batch_size": 7, "source": "--batch-size"}
    assert len(big["pruned"]) >= 1
    assert [(p["layer"], p["index"]) for p in small["pruned"]] == [(p["layer"], p["index"]) for p in big["pruned"]]
    assert small["after"]["asr"] < 0.15 and big["before"]["acc"] - small["after"]["acc"] <= 0.10, small["after"]


def test_auto_batch_is_measured_and_reported(timm_result):
    _, report = timm_result
    b = report["batch"]
    assert report["config"]["batch_size"] == "auto" and b["source"].startswith("auto (cpu")
    assert 1 <= b["batch_size"] <= 256 and b["per_image_mib"] > 0 and b["budget_gib"] > 0


def _image_folder(root, names: list[str], splits: dict) -> None:
    """The layout people keep their own images in: <split>/<class name>/<file>.png; `datasets` sorts the names."""
    for split, (x, y) in splits.items():
        for i, (im, label) in enumerate(zip(x, y)):
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(folder / f"{i:04d}.png")


def _few_digits(per_class_train: int = 12, per_class_test: int = 20) -> dict:
    out = {}
    for split, k in (("train", per_class_train), ("test", per_class_test)):
        x, y = digits()[split]
        rows = np.concatenate([np.flatnonzero(y == c)[:k] for c in range(10)])
        out[split] = (x[rows], y[rows])
    return out


@pytest.mark.slow
def test_image_folder_classes_are_aligned_to_the_model_by_name(timm_backdoor, tmp_path):
    data = tmp_path / "digits-folder"
    _image_folder(data, DIGIT_NAMES, _few_digits())  # alphabetical on disk: eight, five, four, nine, one, ...
    out = tmp_path / "out"
    assert run_cli(timm_backdoor["model"], "--data", data, "--output", out, "--quiet") == 0
    report = read_report(out)
    aligned = report["data"]["class_alignment"]
    assert aligned["data_order"] == sorted(DIGIT_NAMES)
    assert [DIGIT_NAMES[m] for m in aligned["data_to_model"]] == sorted(DIGIT_NAMES)
    assert report["data"]["class_names"] == DIGIT_NAMES
    # measured against the model's own classes: without the mapping ACC would be near chance
    assert report["before"]["acc"] > 0.9 and report["before"]["asr"] > 0.9, report["before"]
    assert report["target"] == {"index": 0, "name": "zero", "auto": True}
    assert report["after"]["asr"] < 0.15 and report["before"]["acc"] - report["after"]["acc"] <= 0.10
    card = ModelCard.load(out / "README.md").text
    assert "mapped onto the" in card and "model's by name" in card


def test_image_folder_with_other_class_names_is_refused(timm_backdoor, tmp_path, capsys):
    names = [n if n != "nine" else "neun" for n in DIGIT_NAMES]
    data = tmp_path / "other-folder"
    _image_folder(data, names, _few_digits(2, 2))
    out = tmp_path / "out"
    code = run_cli(timm_backdoor["model"], "--data", data, "--output", out, "--quiet")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "only in the data: 'neun'; only in the model: 'nine'" in err
    assert not out.exists()


def test_two_local_folders_with_one_name_are_two_datasets(tmp_path):
    """`datasets` names its cache after a local folder's name: without a cache of its own per folder, the second
    `data` folder would silently load the first one's images and classes."""
    for n in (3, 5):
        x, y = np.zeros((2 * n, 8, 8, 3), np.uint8), np.repeat(np.arange(n), 2)
        write_hub_dataset(tmp_path / f"p{n}" / "data", {"train": (x, y)}, [f"c{i}" for i in range(n)])
    for n in (3, 5, 3):
        train = load_splits(str(tmp_path / f"p{n}" / "data"))["train"]
        assert (len(train), train.features["label"].num_classes) == (2 * n, n)
    # a changed file is read again, not taken from the old copy
    x, y = np.zeros((8, 8, 8, 3), np.uint8), np.repeat(np.arange(4), 2)
    write_hub_dataset(tmp_path / "p3" / "data", {"train": (x, y)}, [f"c{i}" for i in range(4)])
    assert load_splits(str(tmp_path / "p3" / "data"))["train"].features["label"].num_classes == 4


def test_streamed_images_are_the_decoded_images_chunk_by_chunk(timm_backdoor):
    """A test set too large to hold is decoded a chunk at a time: the same pixels as decoding it whole, in slices,
    single images and index lists, with the trigger stamped per chunk; a chunk measured clean and triggered is
    decoded once, and N processes' strided chunks (prefetched ahead) are the right rows."""
    from hf_gradprune.data import decode, decode_streamed
    from hf_gradprune.hub import load_model
    from hf_gradprune.metrics import attack_metrics
    from hf_gradprune.triggers import TriggerSpec, make_trigger

    loaded = load_model(str(timm_backdoor["model"]))
    test = load_splits(str(timm_backdoor["data"]))["test"]
    rows = list(range(3, 203, 2))
    held = decode(test, rows, "image", "label", loaded.to_pixels)
    # however the decode is chunked, the same pixels in the same memory layout (the convolutions' kernels, and so
    # the last bits of every output, follow the layout)
    chunked = decode(test, rows, "image", "label", loaded.to_pixels, chunk=7)
    assert torch.equal(chunked.pixels, held.pixels) and chunked.pixels.stride() == held.pixels.stride()
    assert held.pixels.stride() == torch.from_numpy(loaded.to_pixels(test.select(rows[:2])["image"])).stride()
    streamed = decode_streamed(test, rows, "image", "label", loaded.to_pixels)
    assert streamed.streamed and not held.streamed and len(streamed.pixels) == len(held.pixels) == 100
    assert torch.equal(streamed.labels, held.labels)
    assert torch.equal(torch.cat([streamed.pixels[s:s + 16] for s in range(0, 100, 16)]), held.pixels)
    assert (torch.equal(streamed.pixels[7], held.pixels[7])
            and torch.equal(streamed.pixels[[9, 2, 50]], held.pixels[[9, 2, 50]]))
    for stride in (2, 3):  # process 1 of 2 (or 3) takes chunks 1, 1 + N, ...: prefetched ahead by that stride
        for s in range(16, 100, 16 * stride):
            assert torch.equal(streamed.pixels[s:s + 16], held.pixels[s:s + 16])
    in_line = decode_streamed(test, rows, "image", "label", loaded.to_pixels, background=False)  # a job on a CPU
    assert torch.equal(torch.cat([in_line.pixels[s:s + 16] for s in range(0, 100, 16)]), held.pixels)
    stamp = make_trigger(TriggerSpec(kind="badnet"), loaded.input_size)
    twin = streamed.pixels.stamped(stamp)
    assert torch.equal(twin[0:100], stamp(held.pixels))
    decoder = streamed.pixels.decoder
    before = decoder.decoded_images
    whole = attack_metrics(loaded.model, held.pixels, stamp(held.pixels), held.labels, 0, batch_size=16)
    chunked = attack_metrics(loaded.model, streamed.pixels, twin, streamed.labels, 0, batch_size=16)
    assert chunked == whole and whole.asr > 0.9
    assert decoder.decoded_images - before <= 100 + 16  # each image once (one chunk may have been prefetched before)


@pytest.mark.slow
def test_a_test_set_too_large_to_hold_is_streamed_with_the_same_result(timm_backdoor, timm_result, tmp_path,
                                                                       monkeypatch):
    """The job with its test set streamed measures, prunes and reports exactly what it does with the set held."""
    from conftest import PRUNING
    from hf_gradprune import memory
    _, held = timm_result
    assert held["data"]["test_streamed"] is False
    monkeypatch.setattr(memory, "HELD_TEST_BYTES", 0)
    out = tmp_path / "streamed"
    assert run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], "--output", out, "--quiet", *PRUNING) == 0
    streamed = read_report(out)
    assert streamed["data"]["test_streamed"] is True
    assert (streamed["before"], streamed["after"]) == (held["before"], held["after"])
    assert [(p["layer"], p["index"]) for p in streamed["pruned"]] == [(p["layer"], p["index"]) for p in held["pruned"]]
    assert streamed["preview"] == held["preview"]
