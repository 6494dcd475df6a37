"""Keras member benchmark: CPU training throughput, and prediction latency with every fold kept in memory
(compiled fold-averaging tf.function) versus loading every .keras file in each call (the original design).

Run from the repository root:
``python -m tools.bench.bench_keras --out /tmp/bench_keras [--folds 5] [--calls 200] [--threads 2]``.
``main.py bench`` calls ``run_benchmark``. Models have the default ``KerasConfig`` sizes
(128/256/256 IMU filters, 64/128 ToF filters, 128 RNN units), randomly initialised:
latency and throughput do not depend on the weights. Data are random raw rows with the
competition's lengths (median ~59, p95 ~127) turned into frame features by
``features.build_frame_table``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import features
import keras_pipeline as kp
from config import Config
from metric import N_CLASSES
from tools.bench.common import latency_ms, synthetic_raw, time_calls


def _train_throughput(cfg: Config, table: Any, n_train: int) -> dict[str, float]:
    """Steady-state sequences/s of one graph-mode epoch (after a first epoch that pays for tracing)."""
    keras, tf = kp._keras(cfg), kp._tf()
    imu_idx, tof_idx = kp._channel_index()
    idx = np.arange(min(n_train, table.n_sequences))
    scaler = features.fit_scaler(table, idx)
    x, m = features.pad_batch(table, idx, cfg.features.pad_len, scaler)
    m = m.astype(np.float32)
    y = np.eye(N_CLASSES, dtype=np.float32)[np.arange(len(idx)) % N_CLASSES]
    args = kp.model_args(cfg, len(imu_idx), len(tof_idx), cfg.features.pad_len)
    out: dict[str, float] = {}
    for name, build, inputs in (
        ("full", kp.build_full_model, (x[..., imu_idx], x[..., tof_idx], m)),
        ("imu", kp.build_imu_model, (x[..., imu_idx], m)),
    ):
        keras.utils.set_random_seed(0)
        model = build(args)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
            run_eagerly=False,
        )
        ds = tf.data.Dataset.from_tensor_slices((inputs, y)).batch(cfg.keras.batch_size).prefetch(tf.data.AUTOTUNE)
        t0 = time.perf_counter()
        model.fit(ds, epochs=1, verbose=0)  # traces the train step
        t1 = time.perf_counter()
        model.fit(ds, epochs=1, verbose=0)
        t2 = time.perf_counter()
        out[f"{name}_first_epoch_s"] = t1 - t0
        out[f"{name}_train_seq_per_s"] = len(idx) / (t2 - t1)
        out[f"{name}_params"] = int(model.count_params())
    return out


def _make_bundle(cfg: Config, table: Any, bundle_dir: Path, n_folds: int) -> None:
    """n_folds randomly initialised full + light models saved as a real bundle (same writer as training)."""
    keras = kp._keras(cfg)
    imu_idx, tof_idx = kp._channel_index()
    args = kp.model_args(cfg, len(imu_idx), len(tof_idx), cfg.features.pad_len)
    work = bundle_dir.parent / ".bench_models"
    work.mkdir(parents=True, exist_ok=True)
    records = {}
    for k in range(n_folds):
        keras.utils.set_random_seed(k)
        kp.build_full_model(args).save(work / f"fold{k}_full.keras")
        kp.build_imu_model(args).save(work / f"fold{k}_imu.keras")
        records[k] = {"scaler": features.fit_scaler(table, np.arange(k, table.n_sequences, n_folds)).to_dict()}
    kp.KerasPipeline().write_bundle(bundle_dir, work, cfg.features.pad_len, "bench", records, cfg, "bench", {})


def run_benchmark(
    out_dir: Path,
    n_folds: int = 5,
    n_calls: int = 200,
    n_threads: int = 2,
    n_train: int = 256,
    n_reload_calls: int | None = None,
) -> dict:
    """Training throughput and per-sequence latency (in memory vs reload per call); writes keras_bench.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    cfg.run.out_dir = str(out_dir)
    cfg.run.n_threads = n_threads
    table = features.build_frame_table(synthetic_raw(max(n_train, n_calls, 64), imu_only_share=0.5))
    cfg.features.pad_len = features.pad_length(table.lengths, cfg.features.pad_percentile, cfg.features.min_pad_len)
    ok, why = kp.is_available(out_dir)
    if not ok:
        return {"member": "keras", "skipped": why}

    result: dict[str, Any] = {
        "member": "keras",
        "device": "cpu",
        "threads": n_threads,
        "n_folds": n_folds,
        "pad_len": cfg.features.pad_len,
        "tensorflow": why,
    }
    result["training"] = _train_throughput(cfg, table, n_train)

    bundle_dir = out_dir / "bundles" / "keras"
    _make_bundle(cfg, table, bundle_dir, n_folds)
    t0 = time.perf_counter()
    member = kp.load_member(bundle_dir, cfg)
    result["load_s"] = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    order = rng.permutation(table.n_sequences)[:n_calls]  # random order, like the gateway
    singles = [table.select([i]) for i in order]
    t0 = time.perf_counter()
    for route in (table.has_tof_thm, ~table.has_tof_thm):  # first calls trace the compiled functions
        if route.any():
            member.predict_proba(table.select(np.flatnonzero(route)[:1]))
    result["first_call_s"] = time.perf_counter() - t0
    times_full, times_imu = [], []
    for i, one in zip(order, singles):
        t = time.perf_counter()
        member.predict_proba(one)
        (times_full if table.has_tof_thm[i] else times_imu).append(time.perf_counter() - t)
    result["in_memory"] = {
        "all": latency_ms(times_full + times_imu),
        "full_sensor": latency_ms(times_full),
        "imu_only": latency_ms(times_imu),
    }
    member.predict_proba(table)  # traces the plain graph used for big batches
    t = time.perf_counter()
    member.predict_proba(table)
    result["in_memory_batch_seq_per_s"] = table.n_sequences / (time.perf_counter() - t)

    n_reload = n_reload_calls if n_reload_calls is not None else max(3, min(20, n_calls // 10))
    times_reload = time_calls(lambda one: kp.predict_proba_reload_per_call(bundle_dir, one, cfg), singles[:n_reload])
    result["reload_per_call"] = latency_ms(times_reload)
    result["speedup_p50"] = result["reload_per_call"]["p50_ms"] / result["in_memory"]["all"]["p50_ms"]
    (out_dir / "keras_bench.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench_keras")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-seqs", type=int, default=256)
    ap.add_argument("--reload-calls", type=int, default=None)
    a = ap.parse_args()
    r = run_benchmark(Path(a.out), a.folds, a.calls, a.threads, a.train_seqs, a.reload_calls)
    if "skipped" in r:
        print(f"keras benchmark skipped: {r['skipped']}")
        return
    tr = r["training"]
    print(f"keras benchmark ({r['tensorflow']}; {r['threads']} threads; pad_len {r['pad_len']}; {r['n_folds']} folds)")
    print(
        f"training  full model : {tr['full_train_seq_per_s']:8.1f} seq/s  ({tr['full_params']:,} params; "
        f"first epoch incl. tracing {tr['full_first_epoch_s']:.1f} s)"
    )
    print(
        f"training  IMU model  : {tr['imu_train_seq_per_s']:8.1f} seq/s  ({tr['imu_params']:,} params; "
        f"first epoch incl. tracing {tr['imu_first_epoch_s']:.1f} s)"
    )
    print(
        f"load bundle once     : {r['load_s']:.2f} s; first calls (XLA compile, both routes) {r['first_call_s']:.2f} s"
    )
    print(f"{'per-sequence latency':22s} {'p50 ms':>9s} {'p95 ms':>9s} {'mean ms':>9s} {'n':>5s}")
    rows = [
        ("in memory (all)", r["in_memory"]["all"]),
        ("in memory (full)", r["in_memory"]["full_sensor"]),
        ("in memory (IMU-only)", r["in_memory"]["imu_only"]),
        ("reload per call", r["reload_per_call"]),
    ]
    for name, s in rows:
        print(f"{name:22s} {s['p50_ms']:9.1f} {s['p95_ms']:9.1f} {s['mean_ms']:9.1f} {s['n']:5d}")
    print(f"speed-up (p50): x{r['speedup_p50']:.0f}; batched in memory: {r['in_memory_batch_seq_per_s']:.0f} seq/s")


if __name__ == "__main__":
    main()
