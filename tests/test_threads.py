"""threads.py: pool sizes from the usable cores unless CMI_N_THREADS is set; one start-up call."""

from __future__ import annotations

import os

import pytest

import config
import threads


def test_auto_uses_the_affinity_cores_for_training_and_the_serving_default(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 5}, raising=False)
    cfg = config.load_config({})
    assert cfg.run.n_threads == 0  # auto
    assert threads.available_cores() == 4
    assert threads.n_threads(cfg, "train") == 4
    assert threads.n_threads(cfg, "serve") == min(threads.SERVING_THREADS, 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert threads.n_threads(cfg, "train") == 1 and threads.n_threads(cfg, "serve") == 1


def test_explicit_count_wins_and_negatives_are_rejected():
    cfg = config.load_config({"CMI_N_THREADS": "3"})
    assert threads.n_threads(cfg, "train") == 3 and threads.n_threads(cfg, "serve") == 3
    with pytest.raises(config.ConfigError, match="CMI_N_THREADS=-1: must be >= 0"):
        config.load_config({"CMI_N_THREADS": "-1"})
    with pytest.raises(ValueError, match="role"):
        threads.n_threads(cfg, "predict")


def test_openmp_env_is_set_only_where_unset():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.set_openmp_env(env) == {"KMP_BLOCKTIME": "0"}
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": "0"}  # the user's choice wins


def test_configure_returns_a_resolved_copy_and_sizes_torch(monkeypatch):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for key in threads.OPENMP_ENV:  # restored by monkeypatch afterwards: no leak into later tests
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(threads, "lower_priority", lambda target: target)  # not the test process's priority
    cfg = config.load_config({})
    try:
        served = threads.configure_threads(cfg, "serve")
        assert served.run.n_threads == threads.n_threads(cfg, "serve") and cfg.run.n_threads == 0
        assert torch.get_num_threads() == served.run.n_threads
        assert {k: os.environ[k] for k in threads.OPENMP_ENV} == threads.OPENMP_ENV
        trained = threads.configure_threads(cfg, "train")  # inter-op already fixed by now: no error, logged
        assert trained.run.n_threads == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_training_lowers_its_priority_only_upwards(monkeypatch):
    calls = []
    state = {"nice": 3}

    def fake_nice(inc):
        calls.append(inc)
        state["nice"] += inc
        return state["nice"]

    monkeypatch.setattr(os, "nice", fake_nice)
    assert threads.lower_priority(10) == 10 and calls == [0, 7]
    assert threads.lower_priority(10) == 10 and calls == [0, 7, 0]  # idempotent: no second +10
    state["nice"] = 15
    assert threads.lower_priority(10) == 15  # never lowered (that needs root)
