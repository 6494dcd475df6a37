"""Contention benchmark: each member's single-sequence predict latency and training time, alone and beside a
competing project process that this benchmark starts itself (a training run beside serving, a serving loop
beside training), plus predict latency with 1 and 2 intra-op threads.

Run from the repository root: ``python -m tools.bench.bench_contention --out DIR [--quick] [--members
lgbm,torch,keras]``, or ``python main.py bench --contention [--quick]``. Every measurement is its own process,
started the way the project starts (``threads.configure_threads`` before any member library loads), so thread pools
and the OpenMP wait policy are the ones a real run gets. The training unit is one ``MemberPipeline.train`` call on
random rows (2 folds, 1 epoch / the debug LightGBM rounds): the same work alone and contended, so the ratio is
fair.
Target: every ratio <= 2.5 on 2 cores. Other processes on the machine make every number noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository root (this file is in tools/bench/)
TARGET_RATIO = 2.5
READY = "READY"


# --------------------------------------------------------------------------- workers (one process each)


def _config(out: Path, role: str) -> Any:
    import threads
    from config import load_config

    env = {k: v for k, v in os.environ.items() if k == "CMI_N_THREADS"}  # nothing else of the caller's shell
    env.update(DL_DEBUG_EPOCHS="1", KERAS_DEBUG_EPOCHS="1", CMI_N_FOLDS="2")
    cfg = load_config(env, out_dir=str(out), debug=True)
    return threads.configure_threads(cfg, role)  # before the member's library is imported


def _tables(n_sequences: int, seed: int) -> tuple[Any, Any]:
    from features import build_frame_table, drop_tof_thm
    from tools.bench.common import synthetic_raw

    raw = synthetic_raw(n_sequences, seed=seed, imu_only_share=0.5)
    return build_frame_table(raw), build_frame_table(drop_tof_thm(raw))


def worker_train(member: str, out: Path, n_sequences: int, loop: bool) -> dict[str, Any]:
    """Time one training (2 folds, 1 epoch); with ``loop`` repeat until killed (a competitor)."""
    import numpy as np

    import members
    from member_base import TrainingData

    cfg = _config(out, "train")
    pipeline = members.get(member)
    table, imu = _tables(n_sequences, seed=1)
    data = TrainingData(table, imu, np.arange(table.n_sequences) % 18, np.arange(table.n_sequences) % 2, "bench")
    print(READY, flush=True)
    times, i = [], 0
    while True:
        run_dir = out / f"run{i}"  # a fresh folder: the keras member would resume a finished run otherwise
        cfg.run.out_dir = str(run_dir)
        t0 = time.perf_counter()
        pipeline.train(data, cfg, run_dir)
        times.append(time.perf_counter() - t0)
        i += 1
        if not loop:
            return {"train_s": times[0], "threads": cfg.run.n_threads, "bundle": str(run_dir / "bundles" / member)}


def worker_serve(member: str, bundle_dir: Path, out: Path, n_calls: int, loop: bool) -> dict[str, Any]:
    """Time ``n_calls`` single-sequence ``predict_proba`` calls (after warm-up); ``loop`` serves until killed."""
    import numpy as np

    import members
    from tools.bench.common import latency_ms, time_calls

    cfg = _config(out, "serve")
    loaded = members.get(member).load(bundle_dir, cfg)
    table, _ = _tables(max(n_calls, 8), seed=2)
    singles = [table.select([i]) for i in range(table.n_sequences)]
    for one in singles[:4]:  # both routes, compiled functions traced
        loaded.predict_proba(one)
    print(READY, flush=True)
    while loop:
        time_calls(loaded.predict_proba, singles)
    times = time_calls(loaded.predict_proba, singles[:n_calls])
    return {**latency_ms(times), "threads": cfg.run.n_threads, "median_length": float(np.median(table.lengths))}


# --------------------------------------------------------------------------- orchestration


def _cmd(*args: str) -> list[str]:
    # run from ROOT (on PYTHONPATH): the flat modules and the tools package resolve
    return [sys.executable, "-m", "tools.bench.bench_contention", "worker", *args]


def _env(threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CMI_N_THREADS"}
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if threads is not None:
        env["CMI_N_THREADS"] = str(threads)
    return env


def _run(args: list[str], threads: int | None = None, timeout: float = 900) -> dict[str, Any]:
    proc = subprocess.run(
        _cmd(*args), env=_env(threads), capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Competitor:
    """A project process (training or serving loop) running beside a measurement; stopped afterwards."""

    def __init__(self, args: list[str], log_path: Path, ready_timeout: float = 600) -> None:
        # stdout to a file, not a pipe: a pipe nobody reads fills up and would stall the competitor
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "w")  # noqa: SIM115  (closed in __exit__)
        self.proc = subprocess.Popen(
            _cmd(*args, "--loop"), env=_env(None), stdout=self.log, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        deadline = time.monotonic() + ready_timeout
        while READY not in log_path.read_text(errors="replace"):  # imported, loaded, warmed up
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"competitor {' '.join(args)} not ready: {log_path.read_text()[-800:]}")
            time.sleep(0.2)
        time.sleep(2.0)  # into its steady loop

    def __enter__(self) -> Competitor:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()  # only this process, which we started
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def bench_member(member: str, out: Path, n_sequences: int, n_calls: int) -> dict[str, Any]:
    import threads

    d = out / member
    train_alone = _run(["train", member, str(d / "alone"), str(n_sequences)])
    bundle = train_alone["bundle"]
    res: dict[str, Any] = {"train_alone_s": train_alone["train_s"], "train_threads": train_alone["threads"]}
    for k in (1, 2):  # the serving thread count: measured, not assumed
        res[f"serve_{k}_thread"] = _run(["serve", member, bundle, str(d / f"serve{k}"), str(n_calls)], threads=k)
    alone = res[f"serve_{threads.SERVING_THREADS}_thread"]  # what auto serving uses
    with Competitor(["train", member, str(d / "competitor_train"), str(n_sequences)], d / "competitor_train.log"):
        contended = _run(["serve", member, bundle, str(d / "serve_contended"), str(n_calls)])
    with Competitor(["serve", member, bundle, str(d / "competitor_serve"), str(n_calls)], d / "competitor_serve.log"):
        train_contended = _run(["train", member, str(d / "contended"), str(n_sequences)])
    res["serve_beside_training"] = contended
    res["train_beside_serving_s"] = train_contended["train_s"]
    res["ratios"] = {
        "predict_p50_beside_training": contended["p50_ms"] / alone["p50_ms"],
        "predict_p95_beside_training": contended["p95_ms"] / alone["p95_ms"],
        "train_beside_serving": train_contended["train_s"] / train_alone["train_s"],
    }
    res["within_target"] = all(r <= TARGET_RATIO for r in res["ratios"].values())
    return res


def run_benchmark(out: Path, quick: bool = False, members: list[str] | None = None) -> dict[str, Any]:
    """Every member's contention numbers; writes ``out/bench_contention.json`` and prints a table."""
    import importlib.util

    import threads
    from io_utils import write_json

    out.mkdir(parents=True, exist_ok=True)
    n_sequences, n_calls = (96, 50) if quick else (256, 200)
    result: dict[str, Any] = {
        "cores": threads.available_cores(),
        "quick": quick,
        "target_ratio": TARGET_RATIO,
        "train_sequences": n_sequences,
        "calls": n_calls,
        "note": "other processes on the machine make these numbers noisy",
        "members": {},
    }
    import members as registry

    for member in members or registry.names():
        need = {"lgbm": "lightgbm", "torch": "torch", "keras": "tensorflow"}[member]
        if importlib.util.find_spec(need) is None:
            result["members"][member] = {"skipped": f"{need} not installed"}
            continue
        t0 = time.perf_counter()
        try:
            result["members"][member] = bench_member(member, out, n_sequences, n_calls)
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            result["members"][member] = {"error": str(e)[-800:]}
        result["members"][member]["bench_wall_s"] = time.perf_counter() - t0
        write_json(out / "bench_contention.json", result)  # partial results survive a later failure
        _print_member(member, result["members"][member])
    write_json(out / "bench_contention.json", result)
    print(f"results: {out / 'bench_contention.json'} ({result['note']})")
    return result


def _print_member(member: str, r: dict[str, Any]) -> None:
    if "ratios" not in r:
        print(f"{member}: {r.get('skipped') or r.get('error')}")
        return
    s1, s2, c = r["serve_1_thread"], r["serve_2_thread"], r["serve_beside_training"]
    rat = r["ratios"]
    print(
        f"{member}: predict p50 1 thread {s1['p50_ms']:.1f} ms, 2 threads {s2['p50_ms']:.1f} ms; "
        f"beside training {c['p50_ms']:.1f} ms (x{rat['predict_p50_beside_training']:.2f} p50, "
        f"x{rat['predict_p95_beside_training']:.2f} p95); train {r['train_alone_s']:.1f} s alone, "
        f"{r['train_beside_serving_s']:.1f} s beside serving (x{rat['train_beside_serving']:.2f}); "
        f"{'within' if r['within_target'] else 'OVER'} target x{TARGET_RATIO}"
    )


def main(argv: list[str] | None = None) -> None:
    import members as members_registry

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command")
    w = sub.add_parser("worker")
    w.add_argument("role", choices=["train", "serve"])
    w.add_argument("member", choices=members_registry.names())
    w.add_argument("args", nargs="+")
    w.add_argument("--loop", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/contention"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--members", default=",".join(members_registry.names()))
    a = ap.parse_args(argv)
    if a.command == "worker":
        if a.role == "train":
            out, n = a.args
            r = worker_train(a.member, Path(out), int(n), a.loop)
        else:
            bundle, out, n = a.args
            r = worker_serve(a.member, Path(bundle), Path(out), int(n), a.loop)
        print(json.dumps(r), flush=True)
        return
    run_benchmark(a.out, a.quick, [m.strip() for m in a.members.split(",") if m.strip()])


if __name__ == "__main__":
    main()
