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


def test_training_resumed_from_its_checkpoint_gives_the_weights_of_one_sitting(tmp_path):
    """A model too slow for one sitting (the paper tier's) is built over several: resumed from its checkpoint, with
    label smoothing and the one-cycle schedule, it must end with exactly the weights of a single run."""
    import torch

    from hf_gradprune.demo import DIGIT_NAMES, digits, timm_classifier, train_classifier

    x, y = digits()["train"]
    x, y = x[:96], y[:96]
    kw = dict(lr=0.05, batch_size=32, seed=3, augment=True, flip=False, label_smoothing=0.1)

    def fresh():
        return timm_classifier("resnet18", DIGIT_NAMES, seed=3, channels=[8, 8, 8, 8], stem_width=8)

    one = train_classifier(fresh(), x, y, 3, **kw)
    ckpt = tmp_path / "state.pt"
    stopped = []

    class Stop(Exception):
        pass

    def stop_after_first(epoch):
        stopped.append(epoch)
        raise Stop

    with pytest.raises(Stop):
        train_classifier(fresh(), x, y, 3, checkpoint=ckpt, on_epoch=stop_after_first, **kw)
    assert stopped == [1] and ckpt.is_file()
    resumed = train_classifier(fresh(), x, y, 3, checkpoint=ckpt, on_epoch=stopped.append, **kw)
    assert stopped == [1, 2, 3]  # the second sitting starts at epoch 2
    for (name, a), b in zip(one.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
