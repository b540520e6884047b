"""`--push` and `hf-gradprune push DIR` against a fake Hub, with no network.

The fake (tests/fake_hub.py) sits at huggingface_hub's HTTP boundary (``set_client_factory`` + an
``httpx2.MockTransport``), so HfApi.whoami / create_repo / upload_folder run unmodified and every request they
make is recorded and checked here.
"""

import shlex
import shutil
import time
import types
from pathlib import Path

import pytest

from conftest import read_report, run_cli
from fake_hub import FakeHub
from hf_gradprune.hub import LOCAL_FILE

TOKEN = "hf_SECRET_test_token"
FAST = ("--quiet", "--max-epochs", "3", "--max-rounds", "3")
OUTPUT_FILES = {"config.json", "model.safetensors", "README.md", "gradprune_report.json", "gradprune_rounds.png"}


@pytest.fixture
def hub():
    fake = FakeHub(user="alice")
    with fake.installed():
        yield fake
    assert not fake.unexpected, [(r.method, r.path) for r in fake.unexpected]


@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub retries a failed commit 5 times with 1-8 s sleeps: record the sleeps instead."""
    from huggingface_hub.utils import _http
    sleeps = []
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = sleeps.append
    monkeypatch.setattr(_http, "time", fake_time)
    return sleeps


def job(backdoor, out, *extra):
    return run_cli(backdoor["model"], "--data", backdoor["data"], "--output", out, *FAST, "--push", *extra)


def assert_no_token(out: Path, *texts: str) -> None:
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert TOKEN.encode() not in p.read_bytes(), p
    for text in texts:
        assert TOKEN not in text


def assert_uploaded(commit, out: Path) -> None:
    """One commit holding exactly the output folder, byte for byte, as plain git blobs (no Xet / LFS), less the
    local-only file with this machine's paths, which stays in the folder."""
    local = {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file()}
    assert set(local) == OUTPUT_FILES | {LOCAL_FILE}
    del local[LOCAL_FILE]
    assert set(commit.files) == OUTPUT_FILES
    assert commit.files == local
    assert commit.lfs_files == [] and commit.deleted == []


def retry_args(err: str, out: Path) -> list[str]:
    lines = [line for line in err.splitlines() if "retry with:" in line]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("hf-gradprune: error: upload to ")
    assert f"intact in {out}" in line
    argv = shlex.split(line.split("retry with: ", 1)[1])
    assert argv[:3] == ["hf-gradprune", "push", str(out)]
    return argv[1:]


def test_push_uploads_the_output_folder_and_never_the_token(timm_backdoor, tmp_path, hub, capfd):
    out = tmp_path / "clean"
    code = job(timm_backdoor, out, "--repo-id", "someuser/digits-clean", "--token", TOKEN)
    captured = capfd.readouterr()
    assert code == 0, captured.err

    assert [(c["organization"], c["name"], c["type"]) for c in hub.created] == [("someuser", "digits-clean", "model")]
    assert "visibility" not in hub.created[0] and "private" not in hub.created[0]  # the org's default stays
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit.repo_id, commit.revision, commit.params) == ("someuser/digits-clean", "main", {})
    assert commit.summary == "Upload model sanitised by hf-gradprune"
    assert_uploaded(commit, out)
    assert commit.files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert hub.pull_requests == [] and all("create_pr" not in r.params for r in hub.preuploads)
    assert hub.validated_yaml and hub.validated_yaml[0]["content"] == (out / "README.md").read_text()
    assert not any(r.path.endswith("whoami-v2") for r in hub.requests)  # --repo-id given: no lookup needed

    assert hub.requests and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert "pushed: https://huggingface.co/someuser/digits-clean/commit/" in captured.out
    assert_no_token(out, captured.out, captured.err)
    report = read_report(out)
    assert "--push" in report["command"] and "--token" not in report["command"]


def test_private_and_create_pr_are_forwarded(timm_backdoor, tmp_path, hub, capfd):
    out = tmp_path / "clean"
    code = job(timm_backdoor, out, "--repo-id", "someuser/digits-clean", f"--token={TOKEN}", "--private",
               "--create-pr")
    captured = capfd.readouterr()
    assert code == 0, captured.err

    assert [c["visibility"] for c in hub.created] == ["private"]
    # the PR is opened first, then the upload commits to its ref (never to main)
    assert len(hub.pull_requests) == 1 and hub.pull_requests[0]["pullRequest"] is True
    assert [c.revision for c in hub.commits] == ["refs/pr/1"]
    assert_uploaded(hub.commits[0], out)
    assert "pushed: https://huggingface.co/someuser/digits-clean/discussions/1" in captured.out
    assert_no_token(out, captured.out, captured.err)


def test_default_repo_id_is_user_slash_model_gradprune(timm_backdoor, tmp_path, hub, capfd):
    out = tmp_path / "clean"
    code = job(timm_backdoor, out, "--token", TOKEN)
    captured = capfd.readouterr()
    assert code == 0, captured.err

    repo_id = f"alice/{Path(timm_backdoor['model']).name}-gradprune"
    assert hub.requests[0].path == "/api/whoami-v2"  # resolved before the long run
    assert [f"{c['organization']}/{c['name']}" for c in hub.created] == [repo_id]
    assert [c.repo_id for c in hub.commits] == [repo_id]
    assert_uploaded(hub.commits[0], out)
    assert f"pushed: https://huggingface.co/{repo_id}/commit/" in captured.out
    assert_no_token(out, captured.out, captured.err)


def test_push_without_login_fails_before_the_run(timm_backdoor, tmp_path, hub, capfd):
    out = tmp_path / "clean"
    code = job(timm_backdoor, out)  # no --token, no HF_TOKEN, empty HF_HOME: whoami cannot work
    err = capfd.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hf-gradprune: error: --push:") and "--repo-id" in lines[0]
    assert not out.exists()  # nothing was run
    assert hub.created == [] and hub.commits == []


def test_failed_upload_keeps_the_folder_and_the_printed_retry_works(timm_backdoor, tmp_path, capfd, no_backoff):
    out = tmp_path / "clean"
    broken = FakeHub(fail_commit=500)
    with broken.installed():
        code = job(timm_backdoor, out, "--repo-id", "someuser/digits-clean", "--token", TOKEN)
    captured = capfd.readouterr()
    assert code == 3, captured.err
    assert broken.commit_attempts > 1 and no_backoff  # huggingface_hub retried, without really sleeping
    assert broken.commits == [] and not broken.unexpected

    assert {p.name for p in out.iterdir()} == OUTPUT_FILES | {LOCAL_FILE}
    report = read_report(out)
    assert report["after"]["asr"] <= report["before"]["asr"]
    argv = retry_args(captured.err, out)
    assert argv == ["push", str(out), "--repo-id", "someuser/digits-clean"]
    assert "500" in next(line for line in captured.err.splitlines() if "retry with:" in line)
    assert_no_token(out, captured.out, captured.err)

    working = FakeHub()
    with working.installed():
        code = run_cli(*argv, "--token", TOKEN)
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert len(working.commits) == 1 and working.commits[0].repo_id == "someuser/digits-clean"
    assert_uploaded(working.commits[0], out)
    assert "pushed: https://huggingface.co/someuser/digits-clean/commit/" in captured.out
    assert TOKEN not in captured.out + captured.err
    assert not working.unexpected


def test_push_command_connection_error_exits_3_with_retry(timm_result, tmp_path, capfd, no_backoff):
    out = tmp_path / "copy"
    shutil.copytree(timm_result[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    down = FakeHub(fail_commit="connect")
    with down.installed():
        code = run_cli("push", out, "--repo-id", "someuser/digits-clean", "--private", "--create-pr",
                       "--token", TOKEN)
    err = capfd.readouterr().err
    assert code == 3, err
    assert down.commit_attempts > 1 and not down.unexpected
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the PR was opened before the upload failed: the retry goes into it instead of opening another
    assert len(down.pull_requests) == 1
    assert retry_args(err, out) == ["push", str(out), "--repo-id", "someuser/digits-clean", "--private",
                                    "--revision", "refs/pr/1"]
    assert "ConnectError" in err and TOKEN not in err

    working = FakeHub()
    with working.installed():
        code = run_cli(*retry_args(err, out), "--token", TOKEN)
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert working.pull_requests == []  # no second PR
    assert [c.revision for c in working.commits] == ["refs/pr/1"]
    assert_uploaded(working.commits[0], out)
    assert "pushed: https://huggingface.co/someuser/digits-clean/discussions/1" in captured.out


def test_push_command_default_repo_id_from_report(timm_result, hub, capfd):
    out, report = timm_result
    code = run_cli("push", out, "--token", TOKEN)
    captured = capfd.readouterr()
    assert code == 0, captured.err
    repo_id = f"alice/{Path(report['source']['model'].rstrip('/')).name}-gradprune"
    assert [c.repo_id for c in hub.commits] == [repo_id]
    assert_uploaded(hub.commits[0], out)


def test_push_command_needs_an_output_folder(tmp_path, hub, capfd):
    folder = tmp_path / "not-an-output"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    code = run_cli("push", folder, "--repo-id", "someuser/x", "--token", TOKEN)
    err = capfd.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("hf-gradprune: error: push ") and "gradprune_report.json" in lines[0]
    assert hub.requests == []  # nothing was sent


def test_push_command_corrupt_report_is_a_user_error(tmp_path, hub, capfd):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "gradprune_report.json").write_text("{not json")
    code = run_cli("push", folder, "--token", TOKEN)
    err = capfd.readouterr().err
    assert code == 2 and err.startswith("hf-gradprune: error: ") and len(err.strip().splitlines()) == 1
    assert hub.requests == []
