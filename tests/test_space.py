"""The Gradio app (spaces_app/) in a real browser: Debian's Chromium driven by Playwright, the app on a local port,
the Hub faked at huggingface_hub's HTTP boundary (tests/fake_hub.py) for "Sign in" and "Push to Hub".

The app runs the CLI's job, so the numbers on the page must be the CLI's numbers for the same inputs.
"""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from conftest import read_report, run_cli
from fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "spaces_app"))

from hf_gradprune.errors import UserError  # noqa: E402
from job import SpaceSettings, build_job, push_outcome, unpack_upload  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
MACHINE_TOKEN = "hf_SECRET_machine_token"  # this machine's login: Gradio's mocked "Sign in" needs one locally
OAUTH_TOKEN = "mock-oauth-token-for-local-dev"  # what Gradio's mocked sign-in hands the app as the user's token
JOB_FLAGS = ["--max-epochs", "10"]  # the only form value the browser test changes from the defaults
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def zip_folder(folder: Path, dest: Path) -> Path:
    """A zip of the folder itself (one top-level directory), as users make them."""
    return Path(shutil.make_archive(str(dest), "zip", root_dir=folder.parent, base_dir=folder.name))


# ---------------------------------------------------------------------------------------------- headless checks

def test_zip_upload_unpacks_the_folder_and_refuses_escapes(timm_backdoor, tmp_path):
    archive = zip_folder(Path(timm_backdoor["data"]), tmp_path / "digits")
    folder = unpack_upload([archive], tmp_path / "a", "Dataset", max_mb=100)
    assert folder.name == "data" and sorted(p.name for p in folder.rglob("*.parquet"))

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.txt", "x")
    with pytest.raises(UserError, match=r"Model upload evil.zip: entry '\.\./outside.txt' points outside the folder"):
        unpack_upload([evil], tmp_path / "b", "Model", max_mb=100)
    assert not (tmp_path / "outside.txt").exists()

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("config.json", b"0" * (3 * 2**20))  # 3 MB unpacked from a few KB
    with pytest.raises(UserError, match="unpacks to more than this Space's 2 MB"):
        unpack_upload([bomb], tmp_path / "c", "Model", max_mb=2)


def test_public_space_limits(tmp_path):
    space = SpaceSettings(in_space=True, login=True, local_paths=False, max_spc=20, max_eval=500, workdir=tmp_path)
    form = {"model_id": "org/resnet", "data_id": "org/data"}
    with pytest.raises(UserError, match=r"MODEL /etc: give a Hub id \(org/name\); this Space does not read paths"):
        build_job(space, {**form, "model_id": "/etc"}, tmp_path)
    with pytest.raises(UserError, match="--spc 50: this Space allows at most 20"):
        build_job(space, {**form, "spc": 50}, tmp_path)
    with pytest.raises(UserError, match="--eval-limit 800: this Space allows at most 500"):
        build_job(space, {**form, "eval_limit": 800}, tmp_path)
    with pytest.raises(UserError, match=r"--data: give a Hub dataset id \(org/name\) or upload"):
        build_job(space, {"model_id": "org/resnet"}, tmp_path)
    cfg, shown = build_job(space, {**form, "spc": 2, "trigger": "badnet", "blend_alpha": 0.3}, tmp_path)
    assert (cfg.model, cfg.data, cfg.spc, cfg.eval_limit) == ("org/resnet", "org/data", 2, 500)
    assert cfg.trigger.alpha == 0.2  # not a blended trigger: its alpha box does not act
    assert shown == ["org/resnet", "--data", "org/data", "--spc", "2", "--eval-limit", "500"]  # defaults left out
    assert cfg.command == "hf-gradprune " + " ".join(shown) and Path(cfg.output).parent == tmp_path


def test_the_space_and_the_cli_reach_the_same_job(tmp_path):
    """The form and the command line it shows give the same JobConfig through the one path (config.build_config)."""
    from hf_gradprune.cli import job_config
    space = SpaceSettings(in_space=True, login=True, local_paths=False, workdir=tmp_path)
    form = {"model_id": "org/resnet", "data_id": "org/data", "spc": 10.0, "seed": 3, "trigger": "blended",
            "trigger_image": "org-trigger.png", "blend_alpha": 0.3, "target": "cat", "method": "gradprune",
            "recipe": "paper", "alpha": 0.2, "max_rounds": 0, "tune_patience": 10, "max_epochs": 40.0}
    cfg, shown = build_job(space, form, tmp_path)
    cli_cfg, _ = job_config([*shown, "--output", cfg.output])
    assert cli_cfg.command == cfg.command + f" --output ./{Path(cfg.output).name}"  # the CLI's command as typed
    cli_cfg.command = cfg.command
    assert cli_cfg == cfg
    assert shown == ["org/resnet", "--data", "org/data", "--seed", "3",  # SPC 10 is the default: left out
                     "--trigger", "blended", "--trigger-image", "org-trigger.png", "--blend-alpha", "0.3",
                     "--target", "cat", "--recipe", "paper", "--alpha", "0.2", "--max-epochs", "40"]


def test_job_folders_are_cleaned(timm_backdoor, tmp_path):
    from job import new_job_dir, remove_job, run_job, sweep_old_jobs
    settings = SpaceSettings(workdir=tmp_path / "work", job_ttl_s=3600)
    zipped = zip_folder(Path(timm_backdoor["model"]), tmp_path / "resnet")
    with pytest.raises(UserError, match=r"--spc 500: .*"):  # the CLI's check; the upload goes with the failed job
        run_job(settings, {"model_files": [zipped], "data_id": str(timm_backdoor["data"]), "spc": 500}, print)
    assert list(settings.workdir.iterdir()) == []
    old, fresh = new_job_dir(settings), new_job_dir(settings)
    os.utime(old, (0, 0))
    sweep_old_jobs(settings)
    assert not old.exists() and fresh.exists()
    remove_job({"job_dir": str(fresh), "output_dir": str(fresh / "out")})  # what gr.State's delete_callback gets
    assert not fresh.exists()
    remove_job({"job_dir": str(tmp_path)})  # never anything that is not a job folder
    assert tmp_path.exists()


def test_transformers_upload_comes_back_as_transformers(hf_backdoor, tmp_path):
    """A zipped transformers folder: the target menu lists its id2label, the zip offered back reloads in
    transformers."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from app import describe_model
    from job import run_job
    settings = SpaceSettings(workdir=tmp_path / "work")
    zipped = zip_folder(Path(hf_backdoor["model"]), tmp_path / "hf-resnet")
    text, choices = describe_model(settings, None, [zipped])
    assert text.startswith("**./model**: transformers, 10 classes") and ("0: zero", "0") in choices
    outcome = run_job(settings, {"model_files": [zipped], "data_id": str(hf_backdoor["data"]), "max_rounds": 2,
                                 "max_epochs": 2}, lambda event: None)
    # a folder typed as a path is shown by its name, as the CLI shows it
    assert outcome.command == "hf-gradprune ./model --data ./data --max-rounds 2 --max-epochs 2"
    with zipfile.ZipFile(outcome.zip_path) as z:
        z.extractall(tmp_path / "back")
    back = tmp_path / "back" / "model-gradprune"
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in back.iterdir()}
    net = AutoModelForImageClassification.from_pretrained(back)
    AutoImageProcessor.from_pretrained(back)
    assert net.config.id2label[0] == "zero" and not (settings.workdir / outcome.job_dir.name / "inputs").exists()


def test_push_errors_name_the_fix_and_never_the_token(tmp_path):
    with pytest.raises(UserError, match="repo name 'a b': give a name"):
        push_outcome(tmp_path, "a b", True, MACHINE_TOKEN)
    (tmp_path / "README.md").write_text("card")
    with FakeHub(fail_commit=403).installed():
        with pytest.raises(UserError) as err:
            push_outcome(tmp_path, "alice/x", False, MACHINE_TOKEN)
    assert "upload to alice/x failed" in str(err.value) and "press Push again" in str(err.value)
    assert MACHINE_TOKEN not in str(err.value)


def test_space_bundle_runs_the_vendored_package_and_deploys(tmp_path):
    import deploy
    folder = deploy.bundle(tmp_path / "space")
    assert {"app.py", "job.py", "README.md", "requirements.txt"} <= {p.name for p in folder.iterdir()}
    front = (folder / "README.md").read_text().split("---")[1]
    for line in ("sdk: gradio", "app_file: app.py", "hf_oauth: true", "- write-repos"):
        assert line in front
    # the Space imports the package copied beside app.py (the script's folder comes first on sys.path)
    probe = ("import app, hf_gradprune; from hf_gradprune.card import template_path; "
             "print(hf_gradprune.__file__); print(template_path().is_file())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=folder, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(folder)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(folder / "hf_gradprune" / "__init__.py"), "True"]
    # requirements.txt brings every dependency of the package and Gradio with OAuth
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    required = {line.split("#")[0].strip() for line in (folder / "requirements.txt").read_text().splitlines()}
    assert set(deps) <= required and "gradio[oauth]>=6,<7" in required

    hub = FakeHub(user="alice")
    with hub.installed():
        assert deploy.main(["alice/gradprune", "--token", MACHINE_TOKEN]) == 0
    assert [(c["name"], c["type"], c.get("sdk")) for c in hub.created] == [("gradprune", "space", "gradio")]
    (commit,) = hub.commits
    assert commit.repo_id == "alice/gradprune"
    assert set(commit.files) == {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------- in the browser

playwright = pytest.importorskip("playwright.sync_api")
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's Chromium is not installed (apt-get install chromium; .ci/run does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hub():
    fake = FakeHub(user="alice")
    with fake.installed():
        yield fake


@pytest.fixture(scope="module")
def space(hub, tmp_path_factory):
    """The app as `python spaces_app/app.py --login` serves it, on a free local port."""
    from app import build_app
    os.environ["HF_TOKEN"] = MACHINE_TOKEN
    settings = SpaceSettings(login=True, max_spc=1000, workdir=tmp_path_factory.mktemp("space-work"))
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    try:
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        yield f"http://127.0.0.1:{port}", settings
    finally:
        demo.close()
        os.environ.pop("HF_TOKEN", None)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


def open_app(browser, url: str, sign_in: bool):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#run")
    if sign_in:
        page.get_by_role("button", name="Sign in with Hugging Face").click()
        page.get_by_role("button", name="Logout (alice)").wait_for(timeout=30_000)
    return page


def fill(page, elem_id: str, value) -> None:
    """Type a value and leave the field (Gradio takes it on blur), then check the page kept it."""
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")
    page.wait_for_function(f"document.querySelector('#{elem_id} input, #{elem_id} textarea').value === {str(value)!r}")


def wait_text(page, elem_id: str, *texts: str, timeout: int = 300_000) -> str:
    cond = " || ".join(f"t.includes({t!r})" for t in texts)
    page.wait_for_function(f"(() => {{ const e = document.querySelector('#{elem_id}'); "
                           f"if (!e) return false; const t = e.innerText; return {cond}; }})()", timeout=timeout)
    return page.locator(f"#{elem_id}").inner_text()


@pytest.fixture(scope="module")
def finished(space, browser, timm_backdoor, tmp_path_factory):
    """Sign in, upload the model's files and a zip of the dataset, run the defence, wait for the result."""
    url, _ = space
    page = open_app(browser, url, sign_in=True)
    model = Path(timm_backdoor["model"])
    page.locator("#model_files input[type=file]").set_input_files([str(p) for p in sorted(model.iterdir())])
    data_zip = zip_folder(Path(timm_backdoor["data"]), tmp_path_factory.mktemp("upload") / "digits")
    page.locator("#data_files input[type=file]").set_input_files(str(data_zip))
    page.locator("#load_model").click()
    info = wait_text(page, "model_info", "classes", timeout=60_000)
    page.locator("#target input").click()
    page.get_by_role("option", name="0: zero").click()  # the menu was filled from the model's labels
    page.get_by_text("Advanced").click()
    page.locator("#max_epochs input").wait_for()
    fill(page, "max_epochs", 10)
    page.locator("#run").click()
    status = wait_text(page, "status", "Done", "Error")
    assert "Done" in status, status
    return page, info, status


def table_rows(page, elem_id: str) -> list[list[str]]:
    rows = page.locator(f"#{elem_id}").get_by_role("row").all()
    return [[c.strip() for c in r.inner_text().split("\n") if c.strip()] for r in rows]


@needs_chromium
def test_browser_job_gives_the_cli_numbers(finished, timm_backdoor, tmp_path):
    page, info, status = finished
    assert "timm, 10 classes, input 32x32" in info
    rows = table_rows(page, "metrics")
    assert rows[0] == ["metric", "before", "after"]
    shown = {r[0].split(" ")[0]: (r[1], r[2]) for r in rows[1:]}

    out = tmp_path / "cli"
    assert run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], "--target", "0", *JOB_FLAGS,
                   "--output", out, "--quiet") == 0
    report = read_report(out)
    cli = {k.upper(): (f"{100 * report['before'][k]:.2f} %", f"{100 * report['after'][k]:.2f} %")
           for k in ("acc", "asr", "ra")}
    assert shown == cli
    assert report["after"]["asr"] < 0.5 * report["before"]["asr"]  # the backdoor really went
    assert "hf-gradprune ./uploaded-model --data ./data --target 0 --max-epochs 10" in status

    # the pruning plot, the before/after test images and the model card (with its own plot) are on the page
    assert page.locator("#curve img").evaluate("img => img.complete && img.naturalWidth > 0")
    captions = page.locator("#preview").inner_text()
    assert captions.count("triggered · true") == 4 and "· 0 zero (target) ->" in captions
    assert page.locator("#live img").first.evaluate("img => img.complete && img.naturalWidth > 0")  # live rounds
    card = page.locator("#card")
    assert "Results" in card.inner_text() and "ASR (attack success rate, lower is better)" in card.inner_text()
    assert card.locator("img").first.evaluate("img => img.complete && img.naturalWidth > 0")
    assert "attack_success_rate" in page.content()
    # the zip the page offers is the output folder: its weights are the CLI's, byte for byte, and timm reloads them
    link = page.locator("#download a[download]")
    assert link.get_attribute("download") == "uploaded-model-gradprune.zip"
    with zipfile.ZipFile(io.BytesIO(page.request.get(link.get_attribute("href")).body())) as z:
        z.extractall(tmp_path / "zip")
    got = tmp_path / "zip" / "uploaded-model-gradprune"
    assert {p.name for p in got.iterdir()} == {p.name for p in out.iterdir()}
    assert (got / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    import timm
    assert timm.create_model(f"local-dir:{got}", pretrained=True).num_classes == 10

    shot = tmp_path / "space.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("HF_GRADPRUNE_SCREENSHOT"):  # how docs/space.png is made
        page.set_viewport_size({"width": 1400, "height": 1300})
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=os.environ["HF_GRADPRUNE_SCREENSHOT"])


@needs_chromium
def test_push_uses_the_signed_in_users_token_and_never_shows_it(finished, hub):
    page, _, _ = finished
    before = len(hub.requests)
    fill(page, "repo_name", "digits-clean")
    page.locator("#push").click()
    result = wait_text(page, "push_result", "Pushed", timeout=60_000)
    assert "https://huggingface.co/alice/digits-clean/commit/" in result

    assert [(c["name"], c["type"], c.get("visibility")) for c in hub.created] == [("digits-clean", "model", "private")]
    (commit,) = hub.commits
    assert commit.repo_id == "alice/digits-clean"
    assert set(commit.files) == {"config.json", "model.safetensors", "README.md", "gradprune_report.json",
                                 "gradprune_rounds.png"}
    report = json.loads(commit.files["gradprune_report.json"])
    assert report["source"]["model"] == "./uploaded-model" and "/tmp" not in commit.files["README.md"].decode()
    pushed = hub.requests[before:]
    assert pushed and {r.headers.get("authorization") for r in pushed} == {f"Bearer {OAUTH_TOKEN}"}
    html = page.content()
    assert MACHINE_TOKEN not in html and OAUTH_TOKEN not in html
    for blob in commit.files.values():
        assert MACHINE_TOKEN.encode() not in blob and OAUTH_TOKEN.encode() not in blob


@needs_chromium
def test_bad_input_shows_the_cli_message(space, browser, timm_backdoor, capfd):
    url, _ = space
    page = open_app(browser, url, sign_in=False)
    fill(page, "model_id", timm_backdoor["model"])
    fill(page, "data_id", timm_backdoor["data"])
    fill(page, "spc", 200)
    page.locator("#run").click()
    status = wait_text(page, "status", "Error", "Done", timeout=120_000)
    page.locator(".toast-body").first.wait_for(timeout=10_000)
    toast = page.locator(".toast-body").first.inner_text()

    capfd.readouterr()
    assert run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], "--spc", "200", "--quiet") == 2
    cli = capfd.readouterr().err.strip().removeprefix("hf-gradprune: error: ")
    assert cli.startswith("--spc 200:")
    assert cli in status and cli in toast
    page.close()


@pytest.mark.slow
@needs_chromium
def test_demo_button_fills_the_form(space, browser):
    url, _ = space
    page = open_app(browser, url, sign_in=False)
    page.locator("#demo").click()
    info = wait_text(page, "model_info", "Backdoor: BadNets", timeout=180_000)
    assert info.startswith("./digits-resnet18-backdoored: timm, 10 classes")
    assert page.locator("#model_files").get_by_text("digits-resnet18-backdoored").count() == 1
    assert page.locator("#data_files").get_by_text("digits").count() == 1
    page.locator("#target input").click()
    assert page.get_by_role("option", name="9: nine").count() == 1
    page.close()


@pytest.mark.slow
def test_planted_demo_backdoor_is_found_and_removed(space):
    """The Space's "plant a backdoor" button: two zips as a user would upload them, a backdoor the job removes.
    (Built in the app's own work folder, so the browser test of the button finds it ready.)"""
    from job import demo_inputs, run_job
    settings = space[1]
    model_zip, data_zip = demo_inputs(settings)
    assert demo_inputs(settings) == (model_zip, data_zip)  # built once
    outcome = run_job(settings, {"model_files": [model_zip], "data_files": [data_zip]}, lambda event: None)
    assert outcome.command == "hf-gradprune ./digits-resnet18-backdoored --data ./data"
    before, after = outcome.report["before"], outcome.report["after"]
    assert outcome.report["target"]["index"] == 0 and before["asr"] > 0.9 and after["asr"] < 0.1
    assert after["acc"] > before["acc"] - 0.05
