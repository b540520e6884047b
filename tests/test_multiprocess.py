"""`accelerate launch` with 2 CPU processes (a real gloo group) gives the single process's sanitised model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import built_once, read_report
from hf_gradprune.parallel import Procs, synced_batch_norm

# Small batches, so that the scoring, evaluation and fine-tuning work really is shared out between the 2 processes.
# Every process runs on ONE thread (what the launcher gives each of 2 processes on 2 cores; set explicitly, so that
# the comparison holds on machines with more cores), the single-process reference too: oneDNN splits a convolution's
# reduction differently on 2 threads, and batch norm over this ResNet's 1x1 layer4 maps in batches of 8-16 multiplies
# such last-bit differences. SGD then amplifies whatever differs with every step, so fine-tuning runs 2 epochs, and
# batch norm is one computation on 1 and 2 processes (`synced_batch_norm`): with torch's own on one process the
# weights after 2 epochs differed by up to 0.20 of the tolerance below here and by more than it on another CPU;
# with one computation, by 0.0027 of it. `test_synced_batch_norm_step_equals_one_process` checks one step to 1e-6.
# `--max-rounds 500` switches the robust recipe's pruning on (its default does not prune), so the pruning decisions are
# shared out too; its distillation fine-tuning runs as in the default.
ARGS = ["--batch-size", "32", "--tune-batch-size", "16", "--max-epochs", "2", "--max-rounds", "500", "--quiet"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")  # the venv's launcher
LAUNCH = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--main_process_port", "0"]


def launch(args, tmp_path, *, cpu_env=True, launcher=LAUNCH, timeout=900, program=("-m", "hf_gradprune")):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home")}  # no user accelerate config is read
    env.pop("ACCELERATE_USE_CPU", None)
    env.update(ONE_THREAD)
    if cpu_env:
        env["ACCELERATE_USE_CPU"] = "true"
    return subprocess.run([*launcher, *program, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_one_thread(args, tmp_path) -> None:
    """One plain process on one thread, as each launched process runs (the reference the 2 processes must equal)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), **ONE_THREAD}
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run([sys.executable, "-m", "hf_gradprune", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def one_and_two(timm_backdoor, tmp_path_factory):
    """The same job on one process and on two (accelerate launch) -> (single, double, the launch's stdout)."""
    def run_both(tmp: Path) -> tuple[Path, Path, str]:
        single, double = tmp / "single", tmp / "double"
        common = [timm_backdoor["model"], "--data", timm_backdoor["data"], *ARGS]
        run_one_thread([*common, "--output", single], tmp)
        proc = launch([*common, "--output", double], tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return single, double, proc.stdout

    return tuple(built_once(tmp_path_factory, "procs", run_both))


@pytest.mark.slow
def test_two_processes_prune_the_same_filters_and_measure_the_same(one_and_two):
    single, double, _ = one_and_two
    one, two = read_report(single), read_report(double)
    assert one["processes"]["count"] == 1 and two["processes"]["count"] == 2
    assert one["before"]["asr"] > 0.9 and one["after"]["asr"] < 0.2  # a real backdoor, really removed
    assert [(p["layer"], p["index"]) for p in two["pruned"]] == [(p["layer"], p["index"]) for p in one["pruned"]]
    assert len(one["pruned"]) > 0
    for a, b in zip(one["prune"]["rounds"], two["prune"]["rounds"], strict=True):  # every round tried, also undone
        assert (a["layer"], a["index"], a["val_acc"], a["val_asr"]) == \
            (b["layer"], b["index"], b["val_acc"], b["val_asr"])
        assert a["val_unlearning_loss"] == b["val_unlearning_loss"]  # per-chunk sums in chunk order: bit for bit
        assert (a["fewshot_acc"], a["fewshot_unlearning_loss"], a["undone"]) == \
            (b["fewshot_acc"], b["fewshot_unlearning_loss"], b["undone"])  # the robust recipe's checks, also exact
        assert b["score"] == pytest.approx(a["score"], rel=1e-5)  # gradients all-reduced: fp32 summation order
    assert two["prune"]["stop_reason"] == one["prune"]["stop_reason"]
    assert one["method"]["recipe"] == "robust" and one["prune"]["check_on"] == "fewshot"
    assert one["config"]["tune"]["distill"] > 0
    assert two["before"] == one["before"] and two["after"] == one["after"]
    assert (two["finetune"]["epochs"], two["finetune"]["best_epoch"]) == \
        (one["finetune"]["epochs"], one["finetune"]["best_epoch"])
    assert two["finetune"]["val_accs"] == one["finetune"]["val_accs"]


@pytest.mark.slow
def test_two_processes_save_the_same_weights_once(one_and_two):
    single, double, stdout = one_and_two
    w1, w2 = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        if w1[k].is_floating_point():
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4, msg=k)  # measured here: 0.0027 of it
        else:
            assert torch.equal(w1[k], w2[k]), k
    pruned = read_report(double)["pruned"]
    for p in pruned:  # pruned filters stayed pruned on the replicas through data-parallel fine-tuning
        assert w2[f"{p['layer']}.weight"][p["index"]].abs().sum() == 0
    # only the main process wrote (a second writer would have failed on the existing folder) and reported
    assert stdout.count("output:") == 1
    assert [name for name in os.listdir(double.parent) if "double" in name] == ["double"]  # no temporary left


@pytest.mark.slow
def test_bf16_fine_tuning_keeps_the_fp32_filter_choices(one_and_two, timm_backdoor, tmp_path):
    single, _, _ = one_and_two
    out = tmp_path / "bf16"
    run_one_thread([timm_backdoor["model"], "--data", timm_backdoor["data"], *ARGS, "--mixed-precision", "bf16",
                    "--output", out], tmp_path)
    one, bf16 = read_report(single), read_report(out)
    assert bf16["processes"]["mixed_precision"] == "bf16" and one["processes"]["mixed_precision"] == "no"
    assert bf16["prune"]["rounds"] == one["prune"]["rounds"] and bf16["before"] == one["before"]  # scoring stays fp32
    weights = load_file(out / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())
    assert bf16["after"]["asr"] < 0.2


@pytest.mark.slow
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
    """Launched as `accelerate launch $(which hf-gradprune) ...`: the failing process names itself in its one-line
    error."""
    script = os.path.join(os.path.dirname(sys.executable), "hf-gradprune")
    proc = launch([tmp_path / "no-such-model", "--data", tmp_path / "no-data", "--quiet"], tmp_path, timeout=300,
                  program=(script,))
    assert proc.returncode != 0
    # the main process loads first and fails; the other, waiting for it, is ended by the launcher (no hang)
    assert "hf-gradprune: error (process 0 of 2): MODEL" in proc.stderr


def _bn_net(offset: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        net[0].bias.add_(offset)  # the first norm's input: a mean `offset` above a spread of about 3
    return net


def _bn_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(15, 3, 12, 12, generator=gen) * 3 + 5, torch.randint(0, 4, (15,), generator=gen)


def _bn_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
    net.train()
    (F.cross_entropy(net(x), y) * scale).backward()
    return {**{f"grad.{n}": p.grad for n, p in net.named_parameters()}, **dict(net.named_buffers())}


def _bn_worker(rank: int, world: int, init: str, out: str, offset: float) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    procs, (x, y), net = Procs(rank, world), _bn_batch(), _bn_net(offset)
    part = procs.shard(len(y))  # as finetune shards a global batch: 8 + 7 rows, the loss scaled to the global mean
    with synced_batch_norm(net, procs):
        state = _bn_step(net, x[part], y[part], len(y[part]) * world / len(y))
    for name, value in state.items():
        if name.startswith("grad."):
            dist.all_reduce(value)  # what DDP does with the gradients: their mean over the processes
            value /= world
    if rank == 0:
        torch.save({k: v.clone() for k, v in state.items()}, out)
    dist.barrier()
    os._exit(0)  # gloo's teardown can abort ("terminate called without an active exception") after a finished job


# 100: a norm input whose mean is ~30 times its spread; measured here at most 0.22 of the tolerance, where the 1-pass
# statistics E[x^2] - E[x]^2 missed it on 7 of 14 tensors
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_synced_batch_norm_step_equals_one_process(tmp_path, offset):
    """One data-parallel step on 2 gloo processes (batch norm over the global batch, uneven shards) gives one
    process's gradients and running statistics: the mechanism, free of SGD's amplification over many steps.
    Also where E[x^2] - E[x]^2 would cancel in fp32 (measured: 1-pass statistics miss the tolerance there)."""
    import torch.multiprocessing as mp
    out = tmp_path / "two.pt"
    mp.spawn(_bn_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out), offset), nprocs=2)
    torch.set_num_threads(1)
    try:
        one = _bn_step(_bn_net(offset), *_bn_batch())
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    two = torch.load(out)
    assert one.keys() == two.keys() and one["1.num_batches_tracked"] == two["1.num_batches_tracked"] == 1
    for name in one:
        if one[name].is_floating_point():  # the values are O(0.01-1): 1e-6 is fp32 summation order
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


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
