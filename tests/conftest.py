"""Tests run offline: tiny backdoored models are built here, saved in exact Hub layouts, and loaded through
the same code path a Hub id takes."""

import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="hf-gradprune-test-home-")
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                  GRADIO_ANALYTICS_ENABLED="False", HF_HOME=_HOME, HF_DATASETS_CACHE=os.path.join(_HOME, "datasets"))
os.environ.pop("HF_TOKEN", None)

import json  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from hf_gradprune.cli import main  # noqa: E402
from hf_gradprune.demo import build_backdoored_digits  # noqa: E402


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]) -> Any:
    """What `build(folder)` returns (JSON-able; paths allowed), built the first time any test of the run asks for
    `name` and read back from its record after that: a trained model, a scan or a defence that several tests (of
    several modules, or one per parameter) assert on is made once."""
    folder = tmp_path_factory.getbasetemp() / "built" / name
    record = folder.with_suffix(".json")
    if not record.exists():
        folder.mkdir(parents=True)
        record.write_text(json.dumps(build(folder), default=lambda p: {"path": str(p)}))
    return json.loads(record.read_text(), object_hook=lambda d: Path(d["path"]) if set(d) == {"path"} else d)


@pytest.fixture(scope="session")
def timm_backdoor(tmp_path_factory):
    """A narrow timm ResNet-18 with a real BadNets backdoor (target 0) + a digits dataset, in Hub layout."""
    return built_once(tmp_path_factory, "timm", lambda folder: build_backdoored_digits(folder, library="timm",
                                                                                      epochs=10))


@pytest.fixture(scope="session")
def hf_backdoor(tmp_path_factory):
    """A small transformers ResNetForImageClassification with the same backdoor."""
    return built_once(tmp_path_factory, "hf", lambda folder: build_backdoored_digits(folder, library="transformers",
                                                                                    epochs=15))


# the default (robust) recipe does not prune; the tests of the pruning engine switch its pruning rules on
PRUNING = ("--max-rounds", "500")


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def read_report(out: Path) -> dict:
    return json.loads((Path(out) / "gradprune_report.json").read_text())


@pytest.fixture(scope="session")
def timm_result(timm_backdoor, tmp_path_factory):
    def defend(folder: Path) -> Path:
        out = folder / "sanitised"
        code = run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], "--output", out, "--quiet", *PRUNING)
        assert code == 0
        return out

    out = built_once(tmp_path_factory, "timm-out", defend)
    return out, read_report(out)


def publish_to_hf_cache(folder, repo_id: str, sha: str) -> None:
    """Put a folder into the local Hub cache exactly where `snapshot_download` keeps a downloaded repo, so a Hub id
    resolves offline through the real download code path (refs/main -> snapshots/<sha>)."""
    import shutil
    root = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / sha, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)
