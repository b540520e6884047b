"""What `--push` publishes names nothing of the machine the defence ran on.

The test's backdoored model, its data, a triggered copy of the data and a patch trigger (image + mask files) are
copied under a folder with a distinctive name; real jobs run on them and push through the fake Hub
(tests/fake_hub.py). No byte that reaches the Hub may hold that folder's path, the home directory or the temp root;
the card still names the model and the data (by folder name, or by the Hub ids given with --source-id / --data-id),
and links only to the addresses card.allowed_links lists.
"""

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tomllib
from huggingface_hub import ModelCard
from PIL import Image

from conftest import run_cli
from fake_hub import FakeHub
from hf_gradprune.card import PAPER_URL, allowed_links, homepage, link_allowed
from hf_gradprune.cli import published_argv, redacted_command
from hf_gradprune.hub import LOCAL_FILE
from hf_gradprune.names import sha256_of

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_SECRET_publish_token"
PRIVATE = "Zq7-alices-private-projects"  # the distinctive folder every input and output lives under
FAST = ("--quiet", "--max-epochs", "1", "--eval-limit", "40")
REPORT = "gradprune_report.json"


def _stamp(folder: Path, dest: Path) -> Path:
    """A triggered copy of a Hub-layout dataset folder: same splits, rows and true labels, the 3x3 white square."""
    from datasets import load_dataset

    from hf_gradprune.demo import write_hub_dataset
    ds = load_dataset(str(folder))
    splits = {}
    for name, split in ds.items():
        x = np.stack([np.asarray(im.convert("RGB")) for im in split["image"]])
        x[:, -3:, -3:, :] = 255
        splits[name] = (x, np.asarray(split["label"]))
    return write_hub_dataset(dest, splits, ds["train"].features["label"].names)


@pytest.fixture(scope="module")
def inputs(timm_backdoor, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("publish") / PRIVATE
    shutil.copytree(timm_backdoor["model"], root / "models" / "resnet-bd")
    shutil.copytree(timm_backdoor["data"], root / "datasets" / "digits-clean")
    _stamp(root / "datasets" / "digits-clean", root / "datasets" / "digits-triggered")
    (root / "triggers").mkdir()
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(root / "triggers" / "T.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[-3:, -3:] = 255  # the 3x3 white square the model was poisoned with
    Image.fromarray(mask).save(root / "triggers" / "M.png")
    return root


def _private_strings(inputs: Path) -> list[str]:
    """Everything that would say where the files were: the folder (as given and resolved), its distinctive name,
    the home directory and the temp root."""
    found = [str(inputs), str(inputs.resolve()), PRIVATE, os.path.expanduser("~"), tempfile.gettempdir(),
             os.path.realpath(tempfile.gettempdir())]
    return sorted({s for s in found if len(s) > 1})


def _push(inputs: Path, name: str, *args) -> tuple[FakeHub, Path]:
    """Run the job on the private folder's inputs into <private>/outputs/<name> and push it to a fresh fake Hub."""
    hub = FakeHub(user="alice")
    out = inputs / "outputs" / name
    with hub.installed():
        code = run_cli(inputs / "models" / "resnet-bd", "--data", inputs / "datasets" / "digits-clean", "--output", out,
                       *FAST, *args, "--push", "--token", TOKEN)
    assert code == 0
    assert not hub.unexpected and len(hub.commits) == 1
    return hub, out


@pytest.fixture(scope="module")
def plain(inputs):
    """Local folders, no Hub ids: a patch trigger from image + mask files (one given as --flag=value)."""
    return _push(inputs, "plain", "--trigger", "patch", "--trigger-image", inputs / "triggers" / "T.png",
                 f"--trigger-mask={inputs / 'triggers' / 'M.png'}", "--repo-id", "alice/resnet-bd-clean")


@pytest.fixture(scope="module")
def with_ids(inputs):
    """The same folders, said to live at Hub ids; the defender's own triggered copies; the default repo id."""
    return _push(inputs, "with-ids", "--source-id", "backdoor-lab/resnet-bd", "--data-id=backdoor-lab/digits-clean",
                 "--backdoor-data", inputs / "datasets" / "digits-triggered")


def _uploaded_bytes(hub: FakeHub) -> dict[str, bytes]:
    """Every file of the commit, decoded, plus every raw request huggingface_hub sent (paths, bodies, headers)."""
    sent = {f"file {name}": blob for name, blob in hub.commits[0].files.items()}
    for i, r in enumerate(hub.requests):
        sent[f"request {i} {r.method} {r.path}"] = r.path.encode() + r.body + json.dumps(r.headers).encode()
    return sent


@pytest.mark.parametrize("run", ["plain", "with_ids"])
def test_no_uploaded_byte_names_a_local_path(request, inputs, run):
    hub, out = request.getfixturevalue(run)
    commit = hub.commits[0]
    assert LOCAL_FILE not in commit.files and REPORT in commit.files and "README.md" in commit.files
    for what, blob in _uploaded_bytes(hub).items():
        for private in _private_strings(inputs):
            assert private.encode() not in blob, (what, private)
    # the full local configuration stays in the folder (which also shows the search above can find a path)
    local = (out / LOCAL_FILE).read_text()
    assert str(inputs) in local and "push never uploads" in local


def test_card_and_report_name_local_folders_and_trigger_files(plain):
    hub, _ = plain
    files = hub.commits[0].files
    report, card_text = json.loads(files[REPORT]), files["README.md"].decode()
    card = ModelCard(card_text)
    assert report["source"]["model"] == "./resnet-bd" and report["data"]["dataset"] == "./digits-clean"
    assert "**./resnet-bd** (a local folder)" in card_text and "`./digits-clean`" in card_text
    assert card.data.base_model is None and card.data.datasets is None  # a folder name is no Hub id
    trig = report["config"]["trigger"]
    assert trig["image"]["name"] == "T.png" and trig["mask"]["name"] == "M.png"
    assert f"T.png (sha256 {trig['image']['sha256']})" in card_text and trig["mask"]["sha256"] in card_text
    assert report["config"]["output"] == "./plain"
    assert report["command"].startswith("hf-gradprune ./resnet-bd --data ./digits-clean --output ./plain ")
    assert "--trigger-image T.png --trigger-mask=M.png" in report["command"] and "--token" not in report["command"]
    assert report["command"] in card_text


def test_trigger_files_are_named_by_their_sha256(plain, inputs):
    trig = json.loads(plain[0].commits[0].files[REPORT])["config"]["trigger"]
    assert trig["image"]["sha256"] == sha256_of(inputs / "triggers" / "T.png")
    assert trig["mask"]["sha256"] == sha256_of(inputs / "triggers" / "M.png")


def test_source_id_and_data_id_name_the_folders_in_card_and_metadata(with_ids):
    hub, _ = with_ids
    files = hub.commits[0].files
    report, card_text = json.loads(files[REPORT]), files["README.md"].decode()
    card = ModelCard(card_text)
    assert card.data.base_model == "backdoor-lab/resnet-bd"
    assert card.data.datasets == ["backdoor-lab/digits-clean"]
    assert (report["source"]["model"], report["source"]["hub_id"]) == ("backdoor-lab/resnet-bd",) * 2
    assert (report["data"]["dataset"], report["data"]["hub_id"]) == ("backdoor-lab/digits-clean",) * 2
    assert report["trigger"] == "defender's triggered copies from ./digits-triggered"
    assert report["config"]["backdoor_data"] == "./digits-triggered"
    # the command a reader can run: the ids in place of the folders, the id flags folded into them
    assert report["command"].startswith("hf-gradprune backdoor-lab/resnet-bd --data backdoor-lab/digits-clean ")
    assert "--backdoor-data ./digits-triggered" in report["command"]
    assert "--source-id" not in report["command"] and "--data-id" not in report["command"]
    # the default repo is named after the model's Hub name, as `hf-gradprune push DIR` would name it from the report
    assert hub.commits[0].repo_id == "alice/resnet-bd-gradprune"
    assert "https://huggingface.co/backdoor-lab/resnet-bd" in card_text
    assert "https://huggingface.co/datasets/backdoor-lab/digits-clean" in card_text


@pytest.mark.parametrize("run", ["plain", "with_ids"])
def test_every_card_link_is_in_the_allow_list(request, run):
    files = request.getfixturevalue(run)[0].commits[0].files
    card_text, report = files["README.md"].decode(), json.loads(files[REPORT])
    links = re.findall(r"https?://[^\s)\]>\"'`]+", card_text)
    allowed = allowed_links(report)
    assert PAPER_URL in links
    assert [link for link in links if not link_allowed(link, allowed)] == [], allowed


def test_allow_list_is_the_paper_the_homepage_and_the_named_hub_repos():
    report = {"source": {"hub_id": "lab/m"}, "data": {"hub_id": "lab/d"}, "push": {"repo_id": "alice/m-gradprune"}}
    allowed = allowed_links(report)
    assert allowed == [PAPER_URL, *([homepage()] if homepage() else []), "https://huggingface.co/lab/m",
                       "https://huggingface.co/datasets/lab/d", "https://huggingface.co/alice/m-gradprune"]
    assert allowed_links({"source": {"hub_id": None}, "data": {}}) == [PAPER_URL, *([homepage()] if homepage() else [])]
    for invented in ("https://github.com/hf-gradprune/hf-gradprune", "https://huggingface.co/lab/m-evil",
                     "https://huggingface.co/datasets/lab/m", "https://arxiv.org/abs/2405.039180"):
        assert not link_allowed(invented, allowed), invented
    # the tool is linked only to the homepage pyproject.toml declares (none yet)
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("urls", {})
    assert homepage() == urls.get("Homepage")


def test_published_argv_names_every_path_and_drops_the_token(tmp_path):
    private = tmp_path / PRIVATE
    for folder in ("m/resnet", "d/digits", "d/triggered"):
        (private / folder).mkdir(parents=True)
    argv = [str(private / "m/resnet"), "--data", str(private / "d/digits"), "--trigger", "patch",
            "--trigger-image", str(private / "T.png"), f"--trigger-mask={private / 'M.png'}", "--token", TOKEN,
            f"--backdoor-data={private / 'd/triggered'}", "--output", str(private / "out"), f"--token={TOKEN}",
            "--target", "zero"]
    assert published_argv(argv) == ["./resnet", "--data", "./digits", "--trigger", "patch", "--trigger-image", "T.png",
                                    "--trigger-mask=M.png", "--backdoor-data=./triggered", "--output", "./out",
                                    "--target", "zero"]
    assert published_argv([*argv, "--source-id", "lab/resnet", "--data-id=lab/digits"])[:3] == \
        ["lab/resnet", "--data", "lab/digits"]
    assert published_argv(["org/resnet", "--data", "org/digits"]) == ["org/resnet", "--data", "org/digits"]
    # a scan's command goes through the same filter, under its own name
    scan = [str(private / "m/resnet"), "--data", str(private / "d/digits"), "--scan-classes", "20",
            "--output", str(private / "out")]
    assert redacted_command(scan, "scan") == \
        "hf-gradprune scan ./resnet --data ./digits --scan-classes 20 --output ./out"


def test_push_command_and_the_space_leave_the_local_file_behind(plain, tmp_path):
    """`hf-gradprune push DIR` and the Space's Push upload the folder through the same call, which skips it."""
    sys.path.insert(0, str(ROOT / "spaces_app"))
    from job import push_outcome
    out = plain[1]
    for push in (lambda: run_cli("push", out, "--repo-id", "alice/again", "--token", TOKEN),
                 lambda: push_outcome(out, "alice/space", False, TOKEN)):
        hub = FakeHub(user="alice")
        with hub.installed():
            push()
        assert len(hub.commits) == 1 and not hub.unexpected
        assert set(hub.commits[0].files) == {p.name for p in out.iterdir()} - {LOCAL_FILE}


def test_push_command_refuses_a_folder_from_before_public_names(plain, tmp_path, capsys):
    """An output folder of an older hf-gradprune can hold paths in its card and report: it is not uploaded."""
    old = tmp_path / "old"
    shutil.copytree(plain[1], old)
    report = json.loads((old / REPORT).read_text())
    del report["source"]["hub_id"]
    (old / REPORT).write_text(json.dumps(report))
    hub = FakeHub(user="alice")
    with hub.installed():
        code = run_cli("push", old, "--repo-id", "alice/old", "--token", TOKEN)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "re-run the defence" in err, err
    assert hub.requests == []
