"""`accelerate launch` with 2 CPU processes (a real gloo group) gives the single process's sanitised model."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_report, run_cli
from hf_gradprune.parallel import Procs

# Small batches, so that the scoring, evaluation and fine-tuning work really is shared out between the 2 processes.
# Fine-tuning is capped at 5 epochs: each data-parallel step equals one process's up to fp32 summation order, and SGD
# amplifies such differences with every step (as it does those between 1 and 2 threads on ONE process, which were
# larger still when measured: see benchmarks/multiproc.py). 5 epochs keep them within fp32 reduction tolerance.
# `--max-rounds 500` switches the robust recipe's pruning on (its default does not prune), so the pruning decisions are
# shared out too; its distillation fine-tuning runs as in the default.
ARGS = ["--batch-size", "32", "--tune-batch-size", "16", "--max-epochs", "5", "--max-rounds", "500", "--quiet"]
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")  # the venv's launcher
LAUNCH = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--main_process_port", "0"]


def launch(args, tmp_path, *, cpu_env=True, launcher=LAUNCH, timeout=900, program=("-m", "hf_gradprune")):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home")}  # no user accelerate config is read
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu_env:
        env["ACCELERATE_USE_CPU"] = "true"
    return subprocess.run([*launcher, *program, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def one_and_two(timm_backdoor, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("procs")
    single, double = tmp / "single", tmp / "double"
    common = [timm_backdoor["model"], "--data", timm_backdoor["data"], *ARGS]
    assert run_cli(*common, "--output", single) == 0
    proc = launch([*common, "--output", double], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return single, double, proc


def test_two_processes_prune_the_same_filters_and_measure_the_same(one_and_two):
    single, double, _ = one_and_two
    one, two = read_report(single), read_report(double)
    assert one["processes"]["count"] == 1 and two["processes"]["count"] == 2
    assert one["before"]["asr"] > 0.9 and one["after"]["asr"] < 0.2  # a real backdoor, really removed
    assert [(p["layer"], p["filter"]) for p in two["pruned"]] == [(p["layer"], p["filter"]) for p in one["pruned"]]
    assert len(one["pruned"]) > 0
    for a, b in zip(one["prune"]["rounds"], two["prune"]["rounds"], strict=True):  # every round tried, also undone
        assert (a["layer"], a["filter"], a["val_acc"], a["val_asr"]) == (b["layer"], b["filter"], b["val_acc"], b["val_asr"])
        assert a["val_unlearning_loss"] == b["val_unlearning_loss"]  # per-chunk sums in chunk order: bit for bit
        assert (a["fewshot_acc"], a["fewshot_unlearning_loss"], a["undone"]) == \
            (b["fewshot_acc"], b["fewshot_unlearning_loss"], b["undone"])  # the robust recipe's checks, also exact
        assert b["score"] == pytest.approx(a["score"], rel=1e-5)  # gradients all-reduced: fp32 summation order
    assert two["prune"]["stop_reason"] == one["prune"]["stop_reason"]
    assert one["method"]["recipe"] == "robust" and one["prune"]["check_on"] == "fewshot"
    assert one["config"]["tune"]["distill"] > 0
    assert two["before"] == one["before"] and two["after"] == one["after"]
    assert (two["finetune"]["epochs"], two["finetune"]["best_epoch"]) == (one["finetune"]["epochs"], one["finetune"]["best_epoch"])
    assert two["finetune"]["val_accs"] == one["finetune"]["val_accs"]


def test_two_processes_save_the_same_weights_once(one_and_two):
    single, double, proc = one_and_two
    w1, w2 = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        if w1[k].is_floating_point():
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4, msg=k)  # measured: <= 2.3e-5
        else:
            assert torch.equal(w1[k], w2[k]), k
    pruned = read_report(double)["pruned"]
    for p in pruned:  # pruned filters stayed pruned on the replicas through data-parallel fine-tuning
        assert w2[f"{p['layer']}.weight"][p["filter"]].abs().sum() == 0
    # only the main process wrote (a second writer would have failed on the existing folder) and reported
    assert proc.stdout.count("output:") == 1
    assert [name for name in os.listdir(double.parent) if "double" in name] == ["double"]  # no temporary left


def test_bf16_fine_tuning_keeps_the_fp32_filter_choices(one_and_two, timm_backdoor, tmp_path):
    single, _, _ = one_and_two
    out = tmp_path / "bf16"
    assert run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], *ARGS, "--mixed-precision", "bf16",
                   "--output", out) == 0
    one, bf16 = read_report(single), read_report(out)
    assert bf16["processes"]["mixed_precision"] == "bf16" and one["processes"]["mixed_precision"] == "no"
    assert bf16["prune"]["rounds"] == one["prune"]["rounds"] and bf16["before"] == one["before"]  # scoring stays fp32
    weights = load_file(out / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())
    assert bf16["after"]["asr"] < 0.2


def test_cpu_flag_that_starts_one_process_fails_loudly(timm_backdoor, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process: refuse, rather than run unsynchronised."""
    proc = launch([timm_backdoor["model"], "--data", timm_backdoor["data"], "--output", tmp_path / "out", "--quiet"],
                  tmp_path, cpu_env=False, launcher=[ACCELERATE, "launch", "--cpu", "--num_processes", "2",
                                                     "--num_machines", "1", "--mixed_precision", "no",
                                                     "--dynamo_backend", "no"], timeout=300)
    assert proc.returncode != 0
    assert "accelerate started 1 process(es) where 2 were asked for" in proc.stderr
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_user_error_under_launch_ends_every_process(tmp_path):
    """Launched as `accelerate launch $(which hf-gradprune) ...`: the failing process names itself in its one-line error."""
    script = os.path.join(os.path.dirname(sys.executable), "hf-gradprune")
    proc = launch([tmp_path / "no-such-model", "--data", tmp_path / "no-data", "--quiet"], tmp_path, timeout=300,
                  program=(script,))
    assert proc.returncode != 0
    # the main process loads first and fails; the other, waiting for it, is ended by the launcher (no hang)
    assert "hf-gradprune: error (process 0 of 2): MODEL" in proc.stderr


@pytest.mark.parametrize("n,size,world", [(0, 4, 2), (7, 2, 2), (10, 3, 3), (5, 8, 4)])
def test_chunks_and_shards_cover_every_row_once(n, size, world):
    ranks = [Procs(rank=r, world=world) for r in range(world)]
    rows = sorted(i for p in ranks for _, s, e in p.chunks(n, size) for i in range(s, e))
    assert rows == list(range(n))
    parts = [p.shard(n) for p in ranks]
    assert sorted(i for s in parts for i in range(n)[s]) == list(range(n))
    assert max(len(range(n)[s]) for s in parts) - min(len(range(n)[s]) for s in parts) <= 1


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
