"""What the member benchmarks share: random raw rows of realistic lengths, and call timing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from schema import THM_COLS, TOF_COLS


def synthetic_raw(n_sequences: int, seed: int = 0, imu_only_share: float = 0.0) -> Any:
    """Random raw rows with the competition's lengths (median ~59, p95 ~127) and sensor conventions.

    A share of the sequences can be IMU-only (thm/tof null), as in the hidden test.
    Latency does not depend on the values, so this is cheaper than ``synth.generate``.
    """
    import polars as pl

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(59), 0.45, n_sequences).astype(int), 29, 300)
    n = int(lengths.sum())
    seq = np.repeat(np.arange(n_sequences), lengths)
    imu_only = (rng.random(n_sequences) < imu_only_share)[seq]
    quat = rng.normal(0, 0.05, (n, 4)) + np.array([1.0, 0, 0, 0])
    quat /= np.linalg.norm(quat, axis=1, keepdims=True)
    acc = np.array([0.0, 0.0, 9.81]) + rng.normal(0, 1.0, (n, 3))
    data: dict[str, Any] = {
        "sequence_id": np.char.add("SEQ_", np.char.zfill(seq.astype(str), 6)),
        "sequence_counter": np.concatenate([np.arange(k) for k in lengths]),
        "subject": np.char.add("SUBJ_", (seq % 10).astype(str)),
        "acc_x": acc[:, 0],
        "acc_y": acc[:, 1],
        "acc_z": acc[:, 2],
        "rot_w": quat[:, 0],
        "rot_x": quat[:, 1],
        "rot_y": quat[:, 2],
        "rot_z": quat[:, 3],
    }
    for c in THM_COLS:
        data[c] = np.where(imu_only, np.nan, 28 + rng.normal(0, 1, n)).astype(np.float32)
    tof = rng.integers(-1, 255, (n, len(TOF_COLS))).astype(np.float32)
    tof[imu_only] = np.nan
    for j, c in enumerate(TOF_COLS):
        data[c] = tof[:, j]
    return pl.DataFrame(data).with_columns(pl.col([*THM_COLS, *TOF_COLS]).fill_nan(None))


def time_calls(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[float]:
    """Wall seconds of ``fn(item)`` for each item."""
    times = []
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t0)
    return times


def latency_ms(times_s: list[float]) -> dict[str, float]:
    """p50 / p95 / mean in milliseconds and the count; NaN when nothing was timed."""
    if not times_s:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "mean_ms": float("nan"), "n": 0}
    arr = np.asarray(times_s) * 1000.0
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p95_ms": float(np.percentile(arr, 95)),
        "mean_ms": float(arr.mean()),
        "n": int(len(arr)),
    }
