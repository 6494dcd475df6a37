"""`python main.py bench`: speed and memory numbers, measured side by side in one run.

- frame features on competition-size generated data: ours (vectorised) vs a
  per-sequence pandas loop like the original notebook's;
- per-sequence ``predict`` latency per member and for the blend, all folds in
  memory vs reloading bundles per call (the original design), start-up time and
  peak memory;
- training throughput per member (from the run's summaries when present);
- the hidden-test workload projected against the competition's 9 h budget.

Numbers go to ``<out>/bench.json`` and are printed; nothing here asserts a time.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

log = logging.getLogger(__name__)
HIDDEN_TEST_SEQUENCES = 3257
BUDGET_S = 9 * 3600


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pandas_frame_features(raw: pl.DataFrame) -> np.ndarray:
    """The original notebook's shape of work: a Python loop over sequences, pandas and scipy per sequence.

    Computes the 18 base channels of SPEC.md; used only as the benchmark's baseline.
    """
    from scipy.spatial.transform import Rotation

    from schema import THM_COLS, TOF_COLS

    pdf = raw.to_pandas()
    out = []
    for _, g in pdf.groupby("sequence_id", sort=True):
        g = g.sort_values("sequence_counter")
        acc = g[["acc_x", "acc_y", "acc_z"]].ffill().bfill().fillna(0).to_numpy()
        q = g[["rot_x", "rot_y", "rot_z", "rot_w"]].ffill().bfill().to_numpy()
        q = np.where(np.isnan(q).any(1, keepdims=True), [0, 0, 0, 1], q)
        rot = Rotation.from_quat(q)
        lin = rot.apply(acc) - [0, 0, 9.81]
        omega = np.zeros_like(acc)
        for t in range(len(g) - 1):  # per step, as a straightforward implementation would
            omega[t] = (rot[t].inv() * rot[t + 1]).as_rotvec() / 0.1
        tof = g[list(TOF_COLS)].to_numpy()
        tof = np.where(tof < 0, np.nan, tof)
        thm = g[list(THM_COLS)].to_numpy()
        rows = []
        for arr in (tof, thm):
            with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
                __import__("warnings").simplefilter("ignore")
                rows += [
                    np.nanmean(arr, 1),
                    np.nanstd(arr, 1),
                    np.nanmin(arr, 1),
                    np.nanmax(arr, 1),
                    np.mean(~np.isnan(arr), 1),
                ]
        feats = np.column_stack([lin, omega, np.linalg.norm(lin, axis=1), np.linalg.norm(omega, axis=1), *rows])
        out.append(np.nan_to_num(feats))
    return np.concatenate(out)


def bench_features(data_dir: Path | None, n_subjects: int) -> dict[str, Any]:
    import data
    from features import build_frame_table, sequence_aggregates
    from tools import synth

    t0 = time.perf_counter()
    if data_dir is not None and (data_dir / "train.csv").exists():
        train = data.load_train(data_dir)
        rows, demo = train.rows, train.demographics
        source = str(data_dir)
    else:
        ds = synth.generate(n_subjects=n_subjects, seed=0)
        rows, demo = ds.train, ds.train_demographics
        source = f"generated, {n_subjects} subjects"
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = build_frame_table(rows, demo)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sequence_aggregates(table)
    agg_s = time.perf_counter() - t0
    # The baseline on a slice (it is slow); the rate is extrapolated and labelled as such.
    n_base = min(table.n_sequences, 400)
    subset = rows.filter(pl.col("sequence_id").is_in(list(table.sequence_ids[:n_base])))
    t0 = time.perf_counter()
    pandas_frame_features(subset)
    base_s = time.perf_counter() - t0
    base_rows_per_s = subset.height / base_s
    result = {
        "source": source,
        "rows": rows.height,
        "sequences": table.n_sequences,
        "channels": table.values.shape[1],
        "data_seconds": gen_s,
        "ours_seconds": ours_s,
        "ours_rows_per_s": rows.height / ours_s,
        "aggregates_seconds": agg_s,
        "pandas_baseline_rows": subset.height,
        "pandas_baseline_seconds": base_s,
        "pandas_baseline_projected_seconds": rows.height / base_rows_per_s,
        "speedup": (rows.height / base_rows_per_s) / ours_s,
    }
    print(
        f"frame features: {rows.height:,} rows ({source}) in {ours_s:.2f} s "
        f"({result['ours_rows_per_s']:,.0f} rows/s, {table.values.shape[1]} channels); "
        f"pandas per-sequence baseline {base_rows_per_s:,.0f} rows/s "
        f"-> {result['pandas_baseline_projected_seconds']:.0f} s projected; speed-up x{result['speedup']:.0f}"
    )
    return result


# The serving stages of ``ensemble.Predictor`` (its docstring), in call order, each timed per call.
STAGES: tuple[tuple[str, str], ...] = (
    ("admit", "_admit"),
    ("correct wear", "wear.correct"),
    ("featurize", "_featurize"),
    ("wear evidence", "wear.observe"),
    ("call members", "_call_members"),
    ("blend", "_blend"),
    ("decide", "_decide"),
    ("record", "_record"),
)


class _StageClock:
    """Wraps the stage methods of one Predictor instance (instance attributes, the class is untouched) and
    the members' ``predict_proba``; ``per_call`` holds, per finished call, the seconds spent in each."""

    def __init__(self, predictor: Any) -> None:
        self.current: dict[str, float] = {}
        self.per_call: list[dict[str, float]] = []
        for label, path in STAGES:
            owner_path, _, attr = path.rpartition(".")
            owner = getattr(predictor, owner_path) if owner_path else predictor
            setattr(owner, attr, self._timed(label, getattr(owner, attr)))
        for name, member in predictor.members.items():
            member.predict_proba = self._timed(f"member {name}", member.predict_proba)

    def _timed(self, label: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:  # members may answer from threads: a float add per key is atomic enough under the GIL
                self.current[label] = self.current.get(label, 0.0) + time.perf_counter() - t0

        return wrapper

    def end_call(self) -> None:
        self.per_call.append(self.current)
        self.current = {}

    def table(self) -> dict[str, dict[str, float]]:
        labels = [label for label, _ in STAGES] + sorted(
            {k for c in self.per_call for k in c if k.startswith("member")}
        )
        out = {}
        for label in labels:
            ms = np.array([c.get(label, 0.0) for c in self.per_call]) * 1000
            out[label] = {
                "mean_ms": float(ms.mean()),
                "p50_ms": float(np.median(ms)),
                "p95_ms": float(np.percentile(ms, 95)),
            }
        return out


def _serve_calls(predictor: Any, groups: list, demo: pl.DataFrame) -> tuple[np.ndarray, _StageClock]:
    clock = _StageClock(predictor)
    lat = []
    for g in groups:
        t0 = time.perf_counter()
        predictor.predict(g, demo.filter(pl.col("subject") == g["subject"][0]))
        lat.append(time.perf_counter() - t0)
        clock.end_call()
    return np.array(lat) * 1000, clock


def bench_predictor(out: Path, bundle_root: Path, data_dir: Path, n_calls: int) -> dict[str, Any]:
    """Latency of ``predict`` through every serving stage (subject assignment and wear detection included), per
    stage and per member, twice: with the fitted blend (members of weight 0 are not called) and with every
    loaded member called (equal weights, the worst case); then each member in memory vs reload per call."""
    import ensemble
    import members
    from blend import Blend
    from config import load_config
    from features import build_frame_table
    from tools.bench.common import time_calls

    cfg = load_config(out_dir=str(bundle_root.parent), data_dir=str(data_dir))
    test = pl.read_csv(data_dir / "test.csv")
    demo = pl.read_csv(data_dir / "test_demographics.csv")
    groups = [g for _, g in test.group_by("sequence_id", maintain_order=True)][:n_calls]
    rss0 = _peak_rss_mb()
    res: dict[str, Any] = {"calls": len(groups), "rss_before_load_mb": rss0, "blends": {}, "per_member": {}}
    predictor = None
    for blend_name in ("fitted", "every member"):
        t0 = time.perf_counter()
        predictor = ensemble.Predictor(cfg, bundle_root=bundle_root)  # fresh per-subject state for each pass
        startup = time.perf_counter() - t0
        if blend_name == "every member":
            predictor.blend = Blend.defaults({m: 1.0 for m in predictor.members}, "bench: equal").served_by(
                list(predictor.members)
            )
        called = sorted(
            m for m in predictor.members if any(predictor.weights[v].get(m, 0) > 0 for v in ("full", "imu_only"))
        )
        lat_ms, clock = _serve_calls(predictor, groups, demo)
        entry = {
            "members_called": called,
            "startup_seconds": startup,
            "p50_ms": float(np.percentile(lat_ms, 50)),
            "p95_ms": float(np.percentile(lat_ms, 95)),
            "max_ms": float(lat_ms.max()),
            "stages": clock.table(),
        }
        res["blends"][blend_name] = entry
        print(
            f"predict ({blend_name} blend, members called {called}): p50 {entry['p50_ms']:.1f} ms, "
            f"p95 {entry['p95_ms']:.1f} ms, max {entry['max_ms']:.1f} ms over {len(groups)} calls "
            f"(start-up {startup:.1f} s)"
        )
        for label, t in entry["stages"].items():
            print(f"    {label:<16} mean {t['mean_ms']:6.1f} ms  p95 {t['p95_ms']:6.1f} ms")
    worst = res["blends"]["every member"]
    res.update(
        {
            "members": list(predictor.members),
            "startup_seconds": res["blends"]["fitted"]["startup_seconds"],
            "blend_p50_ms": res["blends"]["fitted"]["p50_ms"],
            "blend_p95_ms": res["blends"]["fitted"]["p95_ms"],
            "every_member_p95_ms": worst["p95_ms"],
            "peak_rss_mb": _peak_rss_mb(),
            "projected_hidden_test_seconds": worst["p95_ms"] / 1000 * HIDDEN_TEST_SEQUENCES,
            "hidden_test_budget_seconds": BUDGET_S,
        }
    )
    print(
        f"hidden test projected {res['projected_hidden_test_seconds']:.0f} s of {BUDGET_S} s at the every-member "
        f"p95; peak RSS {res['peak_rss_mb']:.0f} MB"
    )
    tables = [build_frame_table(g, demo.filter(pl.col("subject") == g["subject"][0]), cfg.features) for g in groups]
    n_reload = min(len(tables), 10)
    for name, member in predictor.members.items():
        pipeline = members.get(name)
        mem = time_calls(member.predict_proba, tables)
        rel = time_calls(
            lambda t, p=pipeline, n=name: p.predict_proba_reload_per_call(bundle_root / n, t, cfg), tables[:n_reload]
        )
        m = {"in_memory_p50_ms": float(np.median(mem) * 1000), "in_memory_p95_ms": float(np.percentile(mem, 95) * 1000)}
        if rel:
            m["reload_per_call_p50_ms"] = float(np.median(rel) * 1000)
            m["speedup"] = m["reload_per_call_p50_ms"] / m["in_memory_p50_ms"]
        res["per_member"][name] = m
        extra = f"; reload-per-call p50 {m['reload_per_call_p50_ms']:.1f} ms (x{m['speedup']:.0f})" if rel else ""
        print(f"  {name}: in memory p50 {m['in_memory_p50_ms']:.1f} ms, p95 {m['in_memory_p95_ms']:.1f} ms{extra}")
    return res


def training_throughput(out: Path) -> dict[str, Any]:
    res = {}
    for path in sorted((out / "oof").glob("*_summary.json")):
        s = json.loads(path.read_text())
        if "train_seconds" in s:
            res[s["member"]] = {"train_seconds": s["train_seconds"], "sequences_per_s": s.get("train_sequences_per_s")}
    timings = out / "timings.json"
    if timings.exists():
        res["run_timings"] = json.loads(timings.read_text())
    return res


def main(
    out: Path, quick: bool = False, run_dir: Path | None = None, n_calls: int = 300, contention: bool = False
) -> dict[str, Any]:
    """Run every benchmark that has what it needs; write ``<out>/bench.json``."""
    from io_utils import write_json

    out.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir or out.parent
    results: dict[str, Any] = {"machine": {"cpus": __import__("os").cpu_count()}, "note": "generated data"}
    results["features"] = bench_features(None, n_subjects=12 if quick else 81)
    bundle_root = run_dir / "bundles"
    data_dir = run_dir / "data"
    if bundle_root.exists() and (data_dir / "test.csv").exists():
        results["predict"] = bench_predictor(out, bundle_root, data_dir, 30 if quick else n_calls)
        results["training"] = training_throughput(run_dir)
    else:
        print(f"no trained bundles under {run_dir} (run `make run` first): latency benchmarks skipped")
    # Default-size networks (random weights: latency does not depend on them), in memory vs reload per call.
    for name in ("torch", "keras"):
        try:
            module = __import__(f"tools.bench.bench_{name}", fromlist=["run_benchmark"])
        except ImportError as e:
            print(f"{name} benchmark unavailable: {e}")
            continue
        results[f"{name}_default_model"] = module.run_benchmark(out / name, n_folds=5, n_calls=30 if quick else n_calls)
    if contention:
        from tools.bench.bench_contention import run_benchmark as contention_benchmark

        results["contention"] = contention_benchmark(out / "contention", quick=quick)
    write_json(out / "bench.json", results)
    print(f"results: {out / 'bench.json'}")
    return results
