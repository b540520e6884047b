"""Every bad input: one line naming the input and the fix, exit code 2, nothing written."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import read_report, run_cli
from hf_gradprune.demo import write_hub_dataset


def assert_one_line_error(capsys, out, *fragments, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("hf-gradprune: error: ")
    for f in fragments:
        assert f in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.fixture
def run_bad(timm_backdoor, tmp_path, capsys):
    def run(*args, model=None, data=None, expect=()):
        out = tmp_path / "out"
        capsys.readouterr()  # what building the bad input printed (a library's progress bar) is not the CLI's
        code = run_cli(model or timm_backdoor["model"], "--data", data or timm_backdoor["data"], "--output", out,
                       "--quiet", *args)
        assert_one_line_error(capsys, out, *expect, code=code)
    return run


def test_unknown_hub_model(run_bad):
    run_bad(model="nobody-xyz/no-such-model", expect=("MODEL nobody-xyz/no-such-model",))


def test_folder_without_config(run_bad, tmp_path):
    (tmp_path / "empty").mkdir()
    run_bad(model=tmp_path / "empty", expect=("no config.json",))


def test_model_without_an_image_processor(run_bad, tmp_path):
    from transformers import ImageGPTConfig, ImageGPTForImageClassification
    cfg = ImageGPTConfig(vocab_size=9, n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=10)
    ImageGPTForImageClassification(cfg).save_pretrained(tmp_path / "igpt")
    run_bad(model=tmp_path / "igpt", expect=("no usable preprocessor_config.json", "save the image processor"))


def test_dataset_without_image_or_label_columns(run_bad, tmp_path):
    from datasets import Dataset
    (tmp_path / "d" / "data").mkdir(parents=True)
    Dataset.from_dict({"pixels": [[0, 1]] * 4, "y": [0, 1, 0, 1]}).to_parquet(
        str(tmp_path / "d/data/train-00000-of-00001.parquet"))
    run_bad(data=tmp_path / "d", expect=("no Image column", "--image-column"))


def test_spc_larger_than_a_class(run_bad):
    run_bad("--spc", "500", expect=("--spc 500", "lower --spc"))


def test_unreadable_trigger_image(run_bad, tmp_path):
    (tmp_path / "t.png").write_text("nope")
    run_bad("--trigger", "blended", "--trigger-image", tmp_path / "t.png", expect=("--trigger-image", "cannot read"))


def test_trigger_of_wrong_shape(run_bad, tmp_path):
    np.save(tmp_path / "p.npy", np.ones((2, 3, 4, 5)))
    run_bad("--trigger", "additive", "--trigger-image", tmp_path / "p.npy", expect=("shape",))


def test_trigger_that_changes_nothing(run_bad, tmp_path):
    np.save(tmp_path / "p.npy", np.full((32, 32, 3), 0.1))
    run_bad("--trigger", "additive", "--trigger-image", tmp_path / "p.npy", expect=("changes no pixel",))


def test_target_out_of_range(run_bad):
    run_bad("--target", "12", expect=("--target 12", "0..9"))


def test_unknown_target_name(run_bad):
    run_bad("--target", "eleven", expect=("--target eleven",))


def test_classes_do_not_match_model(run_bad, tmp_path):
    x = np.zeros((20, 32, 32, 3), np.uint8)
    y = np.repeat(np.arange(10), 2)
    write_hub_dataset(tmp_path / "other", {"train": (x, y)}, [f"c{i}x" for i in range(10)])
    run_bad(data=tmp_path / "other", expect=("class names are not MODEL", "only in the data: 'c0x', 'c1x', 'c2x'",
                                             "only in the model: 'zero', 'one', 'two'"))


def test_output_not_empty(timm_backdoor, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], "--output", out, "--quiet")
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_pickle_checkpoint_refused_unless_opted_in(timm_backdoor, tmp_path, capsys):
    model = tmp_path / "pickled"
    shutil.copytree(timm_backdoor["model"], model)
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    out = tmp_path / "out"
    code = run_cli(model, "--data", timm_backdoor["data"], "--output", out, "--quiet")
    assert_one_line_error(capsys, out, "pytorch_model.bin", "--allow-pickle", code=code)
    code = run_cli(model, "--data", timm_backdoor["data"], "--output", out, "--quiet", "--allow-pickle",
                   "--max-rounds", "1", "--max-epochs", "1", "--eval-limit", "20")
    assert code == 0 and read_report(out)["before"]["asr"] > 0.5
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()


def test_remote_code_refused_unless_opted_in(hf_backdoor, tmp_path, capsys):
    model = tmp_path / "remote"
    shutil.copytree(hf_backdoor["model"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForImageClassification": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code = run_cli(model, "--data", hf_backdoor["data"], "--output", out, "--quiet")
    assert_one_line_error(capsys, out, "--trust-remote-code", code=code)


def test_bad_numbers(run_bad):
    run_bad("--alpha", "1.5", expect=("--alpha 1.5",))
    run_bad("--max-rounds", "0", expect=("--max-rounds 0",))
    run_bad("--distill", "-1", expect=("--distill -1",))
    run_bad("--clean-views", "-1", expect=("--clean-views -1", "0 (none) or more"))
    run_bad("--twin-repeats", "0", expect=("--twin-repeats 0", "at least 1"))
    run_bad("--batch-size", "0", expect=("--batch-size 0", "at least 1, or auto"))
    run_bad("--batch-size", "many", expect=("--batch-size many", "whole number"))
    run_bad("--max-memory", "lots", expect=("--max-memory lots", "4GiB"))


def test_missing_split(run_bad):
    run_bad("--split", "validation", expect=("--split validation", "splits:"))


def test_source_and_data_ids_must_be_hub_ids(run_bad, tmp_path):
    run_bad("--source-id", "resnet", expect=("--source-id resnet", "org/name", "leave --source-id out"))
    run_bad("--data-id", str(tmp_path / "digits"), expect=(f"--data-id {tmp_path / 'digits'}", "org/name"))
    # a Hub MODEL is named by its own id: another one would put a wrong base_model in the card
    run_bad("--source-id", "lab/other", model="nobody-xyz/no-such-model",
            expect=("--source-id lab/other", "MODEL nobody-xyz/no-such-model is a Hub id already"))
