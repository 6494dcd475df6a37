"""Thread pools sized from the cores this process may use, set once at start-up.

``configure_threads(cfg, role)`` is called once by ``main.stage_train`` and
``main.stage_serve``: it resolves ``CMI_N_THREADS`` (0 = auto), sets the
OpenMP wait policy in the environment, and sizes torch's pools (only when torch
is importable). LightGBM gets the number through ``cfg.run.n_threads`` in its
params and TensorFlow through ``keras_pipeline._tf``, both read from here via
``n_threads(cfg)``. This module imports only config.py; nothing happens at
import time.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import sys

from config import Config

log = logging.getLogger(__name__)

# Idle OpenMP workers yield instead of spinning: by default libgomp (torch, LightGBM) keeps a
# worker busy-waiting for a while after each parallel region, and Intel's runtime for 200 ms
# (KMP_BLOCKTIME). On 2 shared cores a spinning pool of one process burns the core another
# process (or the other library in this one) needs. The runtimes read these when they load,
# so they are set before the member libraries are imported.
OPENMP_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}

# Training is batch work, serving is latency: a training process lowers its own CPU priority to this
# niceness so that, on a shared machine, a serving process beside it gets the cores first (the
# scheduler still gives training every idle cycle). Only ever raised, never lowered (that needs root).
TRAIN_NICENESS = 5

# Intra-op threads for single-sequence serving when CMI_N_THREADS is 0 (auto). One sequence is a
# small tensor (~60 steps): a second thread saves little and costs hand-offs. Measured 1 vs 2 with
# tools/bench/bench_contention.py: 1 was faster for torch and keras (docs/ARCHITECTURE.md has the numbers).
SERVING_THREADS = 1


def available_cores() -> int:
    """Cores this process may run on (CPU affinity / cgroup cpuset), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def n_threads(cfg: Config, role: str = "train") -> int:
    """The intra-op thread count for ``role`` ('train' or 'serve'): CMI_N_THREADS when set (> 0), else auto."""
    if role not in ("train", "serve"):
        raise ValueError(f"role must be 'train' or 'serve', got {role!r}")
    if cfg.run.n_threads > 0:
        return int(cfg.run.n_threads)
    cores = available_cores()
    return min(SERVING_THREADS, cores) if role == "serve" else cores


def interop_threads(intra: int) -> int:
    # One inter-op thread on small machines: two pools of two threads on 2 cores oversubscribe.
    return 1 if intra <= 2 else 2


def set_openmp_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set the OpenMP wait policy where the user has not; returns what was set (a variable already set wins)."""
    target = os.environ if env is None else env
    done = {}
    for key, value in OPENMP_ENV.items():
        if key not in target:
            target[key] = value
            done[key] = value
    return done


def configure_threads(cfg: Config, role: str) -> Config:
    """Size the pools for ``role``; return a copy of ``cfg`` whose ``run.n_threads`` is the resolved count.

    The copy carries the number to LightGBM's params and the Keras member, so every library reads
    the same value; the caller's ``cfg`` keeps 0 (auto), so a later serve after training in the
    same process still gets the serving default.
    """
    n = n_threads(cfg, role)
    env_set = set_openmp_env()
    late = [m for m in ("torch", "lightgbm", "tensorflow") if m in sys.modules]
    if env_set and late:  # the runtimes read the variables when they load: too late for these
        log.info("threads: %s set after %s was imported; applies to processes started from here", env_set, late)
    cfg = copy.deepcopy(cfg)
    cfg.run.n_threads = n
    torch_state = _configure_torch(n)
    nice = lower_priority(TRAIN_NICENESS) if role == "train" else _niceness()
    log.info(
        "threads (%s): %d intra-op, %d inter-op of %d usable core(s); torch %s; OpenMP env %s; niceness %s",
        role,
        n,
        interop_threads(n),
        available_cores(),
        torch_state,
        {k: os.environ.get(k) for k in OPENMP_ENV},
        nice,
    )
    return cfg


def _niceness() -> int | None:
    try:
        return os.nice(0)
    except (AttributeError, OSError):  # no os.nice (Windows)
        return None


def lower_priority(target: int) -> int | None:
    """Raise this process's niceness to ``target`` if it is below (idempotent); returns the niceness."""
    current = _niceness()
    if current is None or current >= target:
        return current
    try:
        return os.nice(target - current)
    except OSError as e:
        log.info("threads: niceness left at %d (%s)", current, e)
        return current


def _configure_torch(n: int) -> str:
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return "not installed"
    import torch  # only when present: slim serving images have no torch

    torch.set_num_threads(n)
    try:
        # Only possible before the first parallel op; afterwards torch raises RuntimeError.
        torch.set_num_interop_threads(interop_threads(n))
    except RuntimeError as e:
        return f"intra {n}, inter-op left at {torch.get_num_interop_threads()} ({e})"
    return f"intra {n}, inter {interop_threads(n)}"
