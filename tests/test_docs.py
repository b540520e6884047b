"""The front page and the docs: README opens with the two commands that set up and prove the project, stays a
front page, and every result block in it and in docs/ is what `benchmarks/docs_blocks.py` writes from the committed
rows."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import pytest  # noqa: E402

import docs_blocks  # noqa: E402


def test_readme_opens_with_the_two_commands_and_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first_block == "pip install -e '.[dev]' && hf-gradprune demo\nHF_HUB_OFFLINE=1 python -m pytest -q\n"
    assert len(text) <= 15_000


def test_every_result_block_is_current(capsys):
    assert docs_blocks.main(["--check"]) == 0, capsys.readouterr().err
    blocks = [m.group(3) for path in docs_blocks.files() for m in docs_blocks.BLOCK.finditer(path.read_text())]
    assert {"headline", "detection", "recipes", "baselines"} <= set(blocks)


def test_a_stale_block_is_named_and_rewritten(tmp_path, monkeypatch):
    page = tmp_path / "README.md"
    page.write_text("intro\n<!-- gen:recipes folder=cpu-avx512 spc=10 -->\nold table\n<!-- /gen -->\nafter\n")
    monkeypatch.setattr(docs_blocks, "ROOT", tmp_path)
    assert docs_blocks.main(["--check"]) == 1 and "old table" in page.read_text()
    assert docs_blocks.main([]) == 0
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("<!-- /gen -->\nafter\n") and "old table" not in text
    assert "| cifar10 | badnet | 10 | 3 |" in text and docs_blocks.main(["--check"]) == 0


def test_links_between_the_pages_resolve():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/results/README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_the_code_passes_the_linter_with_the_committed_configuration():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:]


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `hf-gradprune ...` (or `accelerate launch ... -m hf_gradprune ...`) line in the README's and docs'
    shell blocks, as (page, argv after the program name); elided examples (`...`) are left out."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" # ")[0].split("   #")[0]
                m = re.search(r"(?:^|\s)(?:hf-gradprune|-m hf_gradprune)(\s.*|$)", line)
                if m and "..." not in line:
                    found.append((page.name, shlex.split(m.group(1))))
    return found


def test_every_documented_command_parses_into_a_job():
    """Each command the README and docs show is one the CLI takes as written: its flags exist and its values pass
    build_config's checks (nothing is run)."""
    from hf_gradprune.cli import COMMANDS, build_parser
    from hf_gradprune.config import build_config
    from hf_gradprune.options import given
    commands = documented_commands()
    assert len(commands) >= 10 and {argv[0] for _, argv in commands if argv} >= {"scan", "push", "demo"}
    for page, argv in commands:
        argv = argv if argv and argv[0] in COMMANDS else ["defend", *argv]
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page}: hf-gradprune {shlex.join(argv)} does not parse")
        if args.command in ("defend", "scan"):
            build_config(given(args), args.command)
