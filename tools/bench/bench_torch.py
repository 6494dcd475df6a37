"""Torch member benchmark: CPU training throughput, and prediction latency with every fold kept in memory
versus the original notebook's design (every fold reloaded from disk in each call).

Run from the repository root:
``python -m tools.bench.bench_torch --out /tmp/bench_torch [--folds 5] [--calls 200] [--threads 1]``.
``main.py bench`` calls ``run_benchmark``. The data are synthetic raw rows with
the competition's lengths (median ~59, p95 ~127) turned into frame features by
``features.build_frame_table``; models are the default ``TimeSeriesNet``
(randomly initialised: latency does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import features
import torch_pipeline as tp
from config import Config
from tools.bench.common import latency_ms, synthetic_raw, time_calls


def bench_training(table: features.FrameTable, cfg: Config, n_steps: int = 6, warmup: int = 2) -> dict[str, Any]:
    """Sequences per second of full training steps (augment + forward + backward + AdamW) on the CPU."""
    import torch

    idx = np.arange(table.n_sequences)
    pad_len = features.pad_length(table.lengths, cfg.features.pad_percentile, cfg.features.min_pad_len)
    scaler = features.fit_scaler(table)
    y = np.zeros(table.n_sequences, dtype=np.int64)
    arr = tp.build_fold_arrays(table, table, idx, y, pad_len, scaler)
    model = tp.TimeSeriesNet(**tp.model_args_from_config(len(table.feature_names), cfg))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.torch.lr, weight_decay=cfg.torch.weight_decay)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=cfg.torch.label_smoothing)
    bs = cfg.torch.batch_size
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(warmup + n_steps):
        b = torch.randint(0, table.n_sequences, (bs,), generator=gen)
        t0 = time.perf_counter()
        xb = tp.augment_batch(arr.x_full[b], arr.x_imu[b], arr.mask[b], cfg, gen)
        loss = crit(model(xb, arr.mask[b]), arr.y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    per_step = float(np.median(times))
    return {
        "batch_size": bs,
        "pad_len": int(pad_len),
        "n_channels": len(table.feature_names),
        "seconds_per_step_median": per_step,
        "sequences_per_second": bs / per_step,
        "steps_timed": n_steps,
    }


def run_benchmark(
    out_dir: Path,
    n_folds: int = 5,
    n_calls: int = 200,
    n_threads: int = 1,
    n_reload_calls: int | None = None,
    train_steps: int = 6,
) -> dict[str, Any]:
    """Measure, write ``out_dir/bench_torch.json`` and return the numbers."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    cfg.run.n_threads = n_threads
    torch.set_num_threads(n_threads)
    t0 = time.perf_counter()
    table = features.build_frame_table(synthetic_raw(max(256, cfg.torch.batch_size * 2)))
    feature_s = time.perf_counter() - t0

    result: dict[str, Any] = {
        "device": "cpu",
        "torch": torch.__version__,
        "threads": n_threads,
        "n_folds": n_folds,
        "frame_features_s_for_table": feature_s,
        "table_sequences": table.n_sequences,
    }
    result["training"] = bench_training(table, cfg, n_steps=train_steps)

    # A bundle of n_folds default-size networks, written by the scaffold's own bundle writer.
    torch.manual_seed(0)
    pad_len = features.pad_length(table.lengths, cfg.features.pad_percentile, cfg.features.min_pad_len)
    args = tp.model_args_from_config(len(table.feature_names), cfg)
    pipeline = tp.TorchPipeline()
    work = out_dir / "bundles" / ".bench_work"
    work.mkdir(parents=True, exist_ok=True)
    records = {}
    for k in range(n_folds):
        tp.save_checkpoint(work / f"fold{k}.pt", args, tp.TimeSeriesNet(**args).state_dict())
        scaler = features.fit_scaler(table, np.arange(k, table.n_sequences, n_folds))
        records[k] = {
            "pad_len": pad_len,
            "scaler": scaler.to_dict(),
            "epochs": 0,
            "score_full": 0.0,
            "score_imu": 0.0,
            "score_mean": 0.0,
        }
    bundle_dir = out_dir / "bundles" / tp.MEMBER
    ctx = tp.TorchContext(torch.device("cpu"), args)
    pipeline.write_bundle(bundle_dir, work, ctx, "bench", records, cfg, "bench", {})

    t0 = time.perf_counter()
    member = pipeline.load(bundle_dir, cfg)
    result["load_member_s"] = time.perf_counter() - t0

    rng = np.random.default_rng(1)
    picks = rng.integers(0, table.n_sequences, n_calls)
    singles = [table.select([int(i)]) for i in picks]  # one sequence per call, as the gateway serves them
    for s in singles[:5]:
        member.predict_proba(s)  # warm-up
    in_memory = time_calls(member.predict_proba, singles)
    n_reload = n_reload_calls if n_reload_calls is not None else max(10, n_calls // 5)
    reload = time_calls(lambda s: pipeline.predict_proba_reload_per_call(bundle_dir, s, cfg), singles[:n_reload])
    result["predict_in_memory"] = latency_ms(in_memory)
    result["predict_reload_per_call"] = latency_ms(reload)
    result["speedup_p50"] = result["predict_reload_per_call"]["p50_ms"] / result["predict_in_memory"]["p50_ms"]
    result["median_sequence_length"] = float(np.median(table.lengths[picks]))

    # Batch path (the local gateway could hand over many sequences at once).
    t0 = time.perf_counter()
    member.predict_proba(table)
    result["predict_batch_ms_per_sequence"] = (time.perf_counter() - t0) * 1000 / table.n_sequences
    (out_dir / "bench_torch.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_torch"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--reload-calls", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=6)
    a = ap.parse_args()
    r = run_benchmark(a.out, a.folds, a.calls, a.threads, a.reload_calls, a.train_steps)
    tr, mem, rel = r["training"], r["predict_in_memory"], r["predict_reload_per_call"]
    print(f"torch {r['torch']} on CPU, {r['threads']} thread(s), {r['n_folds']} folds")
    print(
        f"training: {tr['sequences_per_second']:.1f} sequences/s (batch {tr['batch_size']}, pad_len {tr['pad_len']}, "
        f"{tr['n_channels']} channels, {tr['seconds_per_step_median']:.3f} s/step)"
    )
    print(f"predict, one sequence (median length {r['median_sequence_length']:.0f}):")
    print(f"  folds in memory    p50 {mem['p50_ms']:8.2f} ms  p95 {mem['p95_ms']:8.2f} ms  (n={mem['n']})")
    print(f"  reload every call  p50 {rel['p50_ms']:8.2f} ms  p95 {rel['p95_ms']:8.2f} ms  (n={rel['n']})")
    print(f"  speed-up (p50): {r['speedup_p50']:.1f}x; load_member once: {r['load_member_s']:.2f} s")
    print(f"predict, whole table in one call: {r['predict_batch_ms_per_sequence']:.2f} ms per sequence")


if __name__ == "__main__":
    main()
