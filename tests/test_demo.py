import json
from pathlib import Path

import pytest

from hf_gradprune.cli import main


@pytest.mark.slow
def test_demo_really_removes_the_backdoor(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    out = Path(printed.split("output: ")[1].splitlines()[0])
    report = json.loads((out / "gradprune_report.json").read_text())
    assert report["before"]["asr"] > 0.90
    assert report["after"]["asr"] < 0.10
    assert report["before"]["acc"] - report["after"]["acc"] < 0.05
    assert "ASR" in printed and "ACC" in printed and "RA" in printed
