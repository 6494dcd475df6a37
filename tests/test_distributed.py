"""One training job over several processes (torchrun + DistributedDataParallel), and the prepared GPU check.

What 2-rank DDP changes, and what is asserted about it:

* batch composition: ``DistributedSampler`` gives rank r positions r, r+2, ... of one seeded permutation per
  epoch, and each rank takes ``batch / 2`` of them a step, so the two ranks' batches at step s are together
  positions [s*batch, (s+1)*batch) of that permutation: the batch one process takes at step s, which uses the
  same sampler with one replica (``test_two_ranks_together_take_the_single_process_batches``);
* batch norm: each rank's half batch would give other statistics than the whole batch, so the statistics are
  reduced over the ranks (``AllReduceBatchNorm`` on CPU, torch's SyncBatchNorm on GPU): forward, gradients
  and running statistics equal one process's batch norm over the whole batch (``test_all_reduce_batchnorm...``);
* gradients: DDP averages the ranks' gradients of their mean losses = the gradient of the whole batch's mean
  loss (equal per-rank batch sizes: the fold sizes below are even, so the sampler repeats no sample);
* randomness: augmentation draws are per sample and epoch (not per batch), so they do not depend on the rank;
  dropout masks are drawn per rank, so the end-to-end test sets ``TORCH_DROPOUT=0``.

So ``torchrun --nproc_per_node=2 main.py train --members torch`` must give the OOF of ``python main.py train
--members torch`` up to float summation order: asserted to ``atol=1e-4`` on probabilities. (Measured when this
was written: 1e-5; with each rank's own batch statistics instead of synchronised ones, 2e-3.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

import distributed
import members
from tests.test_members import TINY

ROOT = Path(__file__).resolve().parents[1]
CLEAN_PREFIXES = ("CMI_", "LGBM_", "DL_", "KERAS_", "TORCH_", "USE_", "ENSEMBLE_", *distributed.ENV_VARS)


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_PREFIXES)}
    return {**env, "STRICT": "1", "PYTHONUNBUFFERED": "1", **extra}


def _run(cmd: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """``cmd`` in the repository root, output captured as text."""
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- quick: one process, no torchrun


def test_without_torchrun_every_helper_is_the_single_process_identity():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert not distributed.is_distributed() and distributed.init_from_env() is False
    obj = {"a": np.arange(3)}
    assert distributed.broadcast_object(obj) is obj
    assert distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    assert distributed.local_batch(64) == 64
    net = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3), torch.nn.BatchNorm1d(4))
    assert distributed.wrap_model(net, torch.device("cpu")) is net and distributed.unwrap(net) is net
    distributed.barrier()  # no-op


def test_two_ranks_together_take_the_single_process_batches():
    n, batch, world, seed = 38, 8, 2, 11
    one = list(DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=seed))
    ranks = [list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=seed)) for r in (0, 1)]
    per_rank = batch // world
    for s in range(-(-n // batch)):
        together = sorted(i for r in ranks for i in r[s * per_rank : (s + 1) * per_rank])
        assert together == sorted(one[s * batch : (s + 1) * batch]), s


def test_batchnorm_conversion_keeps_the_state_dict_keys():
    net = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3), torch.nn.BatchNorm1d(4), torch.nn.GELU())
    net[1].running_mean.fill_(0.25)
    keys = list(net.state_dict())
    converted = distributed.convert_all_reduce_batchnorm(net)
    assert type(converted[1]).__name__ == "AllReduceBatchNorm"
    assert list(converted.state_dict()) == keys and float(converted[1].running_mean[0]) == 0.25
    plain = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3), torch.nn.BatchNorm1d(4), torch.nn.GELU())
    plain.load_state_dict(converted.state_dict())  # a DDP-trained model loads into the plain network
    x = torch.randn(5, 3, 9)
    torch.testing.assert_close(converted.eval()(x), plain.eval()(x))  # one process: plain batch norm


def test_keras_trains_under_mirrored_strategy_only_with_more_than_one_gpu(monkeypatch):
    import contextlib
    import types

    import keras_pipeline as kp

    made = []

    class FakeStrategy:
        num_replicas_in_sync = 2

        def __init__(self) -> None:
            made.append(self)

        def scope(self):
            return contextlib.nullcontext("mirrored")

    def fake_tf(n_gpus: int):
        config = types.SimpleNamespace(list_logical_devices=lambda kind: [f"/GPU:{i}" for i in range(n_gpus)])
        return types.SimpleNamespace(config=config, distribute=types.SimpleNamespace(MirroredStrategy=FakeStrategy))

    monkeypatch.setattr(kp, "_STRATEGY", None)
    for n in (0, 1):  # the CPU path and one GPU: nothing changes
        with kp._distribution_scope(fake_tf(n)) as scope:
            assert scope is None
    assert made == []
    with kp._distribution_scope(fake_tf(2)) as scope:
        assert scope == "mirrored"
    kp._distribution_scope(fake_tf(2))
    assert len(made) == 1  # one strategy per process


# --------------------------------------------------------------------------- two gloo processes


def _bn_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        x = torch.randn(10, 4, 7) * 3 + 1
        w = torch.randn(10, 4, 7)
        bn = distributed.convert_all_reduce_batchnorm(torch.nn.BatchNorm1d(4)).train()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        part = slice(0, 6) if rank == 0 else slice(6, 10)  # uneven halves: the counts are reduced too
        xr = x[part].clone().requires_grad_(True)
        for _ in range(2):  # two steps: the running statistics follow the global batch
            y = bn(xr)
            (y * w[part]).sum().backward()
        grads = [bn.weight.grad.clone(), bn.bias.grad.clone()]
        for g in grads:
            torch.distributed.all_reduce(g)
        torch.save(
            {"y": y.detach(), "x_grad": xr.grad, "param_grads": grads, "state": bn.state_dict()},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~20 s on 2 shared cores
def test_all_reduce_batchnorm_over_two_ranks_equals_batchnorm_over_the_whole_batch(tmp_path):
    torch.multiprocessing.spawn(_bn_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    x = (torch.randn(10, 4, 7) * 3 + 1).requires_grad_(True)
    w = torch.randn(10, 4, 7)
    bn = torch.nn.BatchNorm1d(4).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    for _ in range(2):
        y = bn(x)
        (y * w).sum().backward()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r0["x_grad"], r1["x_grad"]]), x.grad, atol=1e-5, rtol=1e-5)
    for got, want in zip(r0["param_grads"], [bn.weight.grad, bn.bias.grad]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    for r in (r0, r1):
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(r["state"][key], bn.state_dict()[key], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- slow: torchrun end to end

DDP_ENV = {
    **TINY["torch"],
    "TORCH_DROPOUT": "0",  # dropout masks are drawn per rank: the one thing that is not the same
    "CMI_N_FOLDS": "2",
    "CMI_SEED": "3",
    "CMI_N_THREADS": "1",
    "USE_TORCH": "0",  # trained because --members names it, not blended: the stage under test is training
    "LGBM_TRAIN": "0",
    "KERAS_TRAIN": "0",
}


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    r = _run([sys.executable, "main.py", "synth", "--out", str(out), "--subjects", "4", "--seed", "5"], _env({}), 300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_single_process_oof(synth_data, tmp_path):
    train = ["main.py", "train", "--data-dir", str(synth_data), "--members", "torch", "--debug"]
    single = _run([sys.executable, *train, "--out", str(tmp_path / "single")], _env(DDP_ENV), 600)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    rdzv = [f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-backend=c10d", "--rdzv-id=cmi-test"]
    ddp = _run([*torchrun, *rdzv, *train, "--out", str(tmp_path / "ddp")], _env(DDP_ENV), 600)
    assert ddp.returncode == 0, ddp.stderr[-5000:]

    folds = np.loadtxt(tmp_path / "ddp" / "folds.csv", delimiter=",", skiprows=1, dtype=str)[:, -1].astype(int)
    assert all(int((folds != k).sum()) % 2 == 0 for k in (0, 1))  # even training folds: no sample repeated
    for f in ("oof_torch_proba.npy", "oof_torch_imu_proba.npy"):
        a, b = np.load(tmp_path / "single" / "oof" / f), np.load(tmp_path / "ddp" / "oof" / f)
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    log = (tmp_path / "ddp" / "logs" / "run.log").read_text()
    assert "rank 0 of 2" in log and "backend gloo" in log
    assert "rank 1 of 2" not in log  # rank 1 logs warnings to stderr only, and writes no file
    single_files = {p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*") if p.is_file()}
    ddp_files = {p.relative_to(tmp_path / "ddp") for p in (tmp_path / "ddp").rglob("*") if p.is_file()}
    assert ddp_files == single_files  # the same outputs, written once
    meta = json.loads((tmp_path / "ddp" / "bundles" / "torch" / "metadata.json").read_text())
    assert meta["folds"] == [0, 1] and not (tmp_path / "ddp" / "bundles" / ".torch_work").exists()


@pytest.mark.slow
def test_gpu_check_on_the_cpu_end_to_end(tmp_path):
    """``gpu-check --cpu``: every stage of the GPU check, tiny, on this machine (torch only: Keras' TF start-up and
    eager training would cost minutes here; which members it would train comes from the registry)."""
    env = _env({**TINY["torch"], "CMI_N_THREADS": "1"})
    r = _run([sys.executable, "main.py", "gpu-check", "--cpu", "--members", "torch", "--out", str(tmp_path)], env, 900)
    assert r.returncode == 0, r.stderr[-5000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    neural = [
        m for m in members.names() if any(p == "torch" or p.startswith("tensorflow") for p in members.get(m).packages)
    ]
    assert result["neural_members"] == neural and {"torch", "keras"} <= set(neural) and "lgbm" not in neural
    assert result["mode"] == "cpu" and result["settings"]["epochs"] == 1
    for key in ("amp_on", "amp_off"):
        run = result["train"]["torch"][key]
        assert run["epoch_seconds_mean"] > 0 and run["folds"] == 2 and 0 <= run["oof_score"]["mean"] <= 1
    ddp = result["ddp"]["torch"]
    assert ddp["returncode"] == 0 and "rank 0 of 1" in ddp["process_group"] and "gloo" in ddp["process_group"]
    serve = result["serve"]
    assert serve["calls"] == 20 and 0 < serve["p50_ms"] <= serve["p95_ms"]
    assert json.loads(r.stdout[: r.stdout.rindex("}") + 1])["serve"]["calls"] == 20  # printed too
