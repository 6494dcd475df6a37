"""One prepared GPU check: ``python main.py gpu-check [--cpu] [--out DIR]``.

In one run (at most ~8 minutes on one GPU) it:

1. generates 81 subjects (``synth``) and builds the training data once;
2. trains every neural member of the registry (a pipeline whose ``packages``
   name torch or TensorFlow; no member is named here) for a few epochs, with
   AMP on and off where the member's section has an ``amp`` switch;
3. runs one DistributedDataParallel job through ``torchrun --nproc_per_node=1``
   (NCCL on the GPU: the process group, the DDP wrapper and synchronised batch
   norm all run) for each neural member with ``supports_ddp``;
4. serves 200 test sequences one by one through the ``Predictor``;

and prints and writes ``gpu_check.json``: epoch times, peak GPU memory
(``torch.cuda.max_memory_allocated``; TensorFlow's own peak where it has a
GPU), OOF scores, predict latency p50/p95. Without a GPU it stops with an
error unless ``--cpu`` is given: then everything runs on the CPU at a tiny size
(4 subjects, 1 epoch, 20 sequences), which is how the tests run the check end
to end. Member settings come from the environment as usual (``TORCH_*``,
``KERAS_*``), so a test can make the networks tiny.

A time budget (``BUDGET_S``) skips the remaining training runs, logged and
recorded, rather than overrun the GPU lease. Measures only: never imported by
the pipeline, not carried by the exported notebook.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import io_utils
import members

log = logging.getLogger(__name__)

RESULT_FILE = "gpu_check.json"
ROOT = Path(__file__).resolve().parents[1]  # the repository root (this file is in tools/)
BUDGET_S = 6 * 60  # training runs start only while less than this has passed (the whole check: ~8 minutes)
NEURAL_PACKAGES = ("torch", "tensorflow")


def _frameworks(pipeline: Any) -> list[str]:
    """The neural frameworks among a pipeline's declared packages (``tensorflow-cpu`` counts as tensorflow)."""
    return [pkg for pkg in NEURAL_PACKAGES if any(p == pkg or p.startswith(pkg + "-") for p in pipeline.packages)]


def neural_members() -> list[str]:
    """Registered members whose pipeline declares torch or TensorFlow among its packages (nothing hard-coded)."""
    out = []
    for name in members.names():
        try:
            pipeline = members.get(name)
        except ImportError as e:
            log.warning("gpu check: member %s cannot be imported: %s", name, e)
            continue
        if _frameworks(pipeline):
            out.append(name)
    return out


def _gpu_missing(pipeline: Any) -> str | None:
    """Why ``pipeline``'s framework would train on the CPU although a GPU is here (e.g. tensorflow-cpu), else None."""
    for pkg in _frameworks(pipeline):
        if pkg == "torch":
            torch = _torch()
            if torch is None or not torch.cuda.is_available():
                return "torch sees no CUDA GPU"
        else:
            try:
                import tensorflow as tf
            except ImportError as e:
                return f"TensorFlow not importable: {e}"
            if not tf.config.list_physical_devices("GPU"):
                return "TensorFlow sees no GPU (a CPU-only build?): on the CPU it would overrun the check's time"
    return None


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def device_info() -> dict[str, Any]:
    torch = _torch()
    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": getattr(torch, "__version__", None)}
    if torch is not None and torch.cuda.is_available():
        info.update(
            cuda=torch.version.cuda,
            gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        )
    else:
        info["gpus"] = []
    return info


def _reset_peak() -> None:
    torch = _torch()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> dict[str, float]:
    """Peak GPU memory (MiB) since the last reset: torch's allocator, and TensorFlow's where it holds a GPU."""
    out: dict[str, float] = {}
    torch = _torch()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
        out["torch_max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        try:
            if tf.config.list_logical_devices("GPU"):
                out["tensorflow_peak_mib"] = round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, 1)
                tf.config.experimental.reset_memory_stats("GPU:0")
        except (ValueError, RuntimeError) as e:  # no memory info on this device/build
            log.info("gpu check: no TensorFlow memory info (%s)", e)
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _training_data(data_dir: Path, out: Path, cfg: Any) -> Any:
    import data
    from features import build_frame_table
    from member_base import training_data

    train = data.load_train(data_dir)
    table = build_frame_table(train.rows, train.demographics, cfg.features)
    return training_data(train.rows, train.demographics, train.labels, cfg, out / "folds.csv", table=table)


def _check_config(out: Path, epochs: int, n_folds: int) -> Any:
    """The environment's settings (tiny networks in tests), debug mode with ``epochs`` epochs per member."""
    import threads
    from config import load_config

    cfg = load_config(out_dir=str(out), debug=True)
    cfg.run.n_folds = n_folds
    for name in cfg.member_names():
        section = cfg.member(name)
        if hasattr(section, "debug_epochs"):
            section.debug_epochs = epochs
    return threads.configure_threads(cfg, "train")


def _train_runs(
    cfg: Any, td: Any, out: Path, names: list[str], epochs: int, t_start: float, cpu: bool
) -> dict[str, Any]:
    import copy

    results: dict[str, Any] = {}
    for name in names:
        pipeline = members.get(name)
        ok, why = pipeline.is_available()
        if ok and not cpu:
            missing = _gpu_missing(pipeline)
            ok, why = missing is None, missing or why
        if not ok:
            results[name] = {"skipped": why}
            log.warning("gpu check: %s not trained: %s", name, why)
            continue
        section = cfg.member(name)
        settings = [True, False] if hasattr(section, "amp") else [None]
        results[name] = {}
        for amp in settings:
            key = "amp_na" if amp is None else ("amp_on" if amp else "amp_off")
            if time.perf_counter() - t_start > BUDGET_S:
                results[name][key] = {"skipped": f"time budget of {BUDGET_S} s spent"}
                log.warning("gpu check: %s %s skipped: time budget spent", name, key)
                continue
            run_cfg = copy.deepcopy(cfg)
            if amp is not None:
                run_cfg.member(name).amp = amp
            run_out = out / "runs" / f"{name}_{key}"
            run_cfg.run.out_dir = str(run_out)
            _reset_peak()
            t0 = time.perf_counter()
            summary = pipeline.train(td, run_cfg, run_out, force=True)
            seconds = time.perf_counter() - t0
            meta = io_utils.read_json(run_out / "bundles" / name / "metadata.json")
            fold_s = [float(r.get("seconds", float("nan"))) for r in meta.get("fold_records", {}).values()]
            results[name][key] = {
                "seconds": round(seconds, 2),
                "fold_seconds": [round(s, 2) for s in fold_s],
                # a fold's time over its epochs: the per-epoch validation pass included
                "epoch_seconds_mean": round(sum(fold_s) / max(1, len(fold_s) * epochs), 3),
                "epochs": epochs,
                "folds": len(fold_s),
                "oof_score": (summary.get("overall") or {}),
                **_peak_memory(),
            }
            log.info("gpu check: %s %s: %s", name, key, results[name][key])
    return results


def _ddp_runs(
    out: Path, data_dir: Path, trained: dict[str, Any], epochs: int, n_folds: int, t_start: float
) -> dict[str, Any]:
    """``torchrun --nproc_per_node=1 main.py train --members NAME`` for each DDP-capable neural member."""
    results: dict[str, Any] = {}
    for name in trained:
        pipeline = members.get(name)
        if not pipeline.supports_ddp or "skipped" in trained.get(name, {}):
            continue
        if time.perf_counter() - t_start > BUDGET_S:
            results[name] = {"skipped": f"time budget of {BUDGET_S} s spent"}
            continue
        run_out = out / "runs" / f"{name}_ddp"
        up = name.upper()
        env = {
            **os.environ,
            "CMI_DEBUG": "1",
            "CMI_N_FOLDS": str(n_folds),
            f"{up}_DEBUG_EPOCHS": str(epochs),
            f"USE_{up}": "0",  # trained because named; not blended (the check is the training job)
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            str(ROOT / "main.py"),
            "train",
            "--data-dir",
            str(data_dir),
            "--out",
            str(run_out),
            "--members",
            name,
            "--force",
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - t0
        log_text = (proc.stdout or "") + (proc.stderr or "")
        io_utils.write_text(out / f"ddp_{name}.log", log_text)
        entry: dict[str, Any] = {"returncode": proc.returncode, "seconds": round(seconds, 2), "command": cmd[2:]}
        if proc.returncode == 0:
            summary = io_utils.read_json(run_out / "oof" / f"{name}_summary.json")
            entry["oof_score"] = summary.get("overall")
            entry["process_group"] = next(
                (ln.split("distributed: ", 1)[-1] for ln in log_text.splitlines() if "backend" in ln and "rank" in ln),
                None,
            )
        else:
            entry["error_tail"] = log_text[-3000:]
        results[name] = entry
        log.info("gpu check: DDP %s: %s", name, {k: v for k, v in entry.items() if k != "error_tail"})
    return results


def _serve(cfg: Any, out: Path, data_dir: Path, trained: dict[str, Any], n_calls: int) -> dict[str, Any]:
    """The trained members' bundles (AMP on where there was a choice) behind one Predictor; ``n_calls`` sequences."""
    import polars as pl

    import ensemble
    from inference_server import _read_csv

    bundle_root = out / "serve" / "bundles"
    if bundle_root.exists():
        shutil.rmtree(bundle_root)
    served, names = [], []
    for name, runs in trained.items():
        for key in ("amp_on", "amp_na", "amp_off"):
            src = out / "runs" / f"{name}_{key}" / "bundles" / name
            if isinstance(runs, dict) and key in runs and "skipped" not in runs[key] and src.exists():
                shutil.copytree(src, bundle_root / name)
                served.append(f"{name} ({key})")
                names.append(name)
                break
    if not served:
        return {"skipped": "no member trained"}
    serve_cfg = _serving_config(cfg, out, names)
    t0 = time.perf_counter()
    predictor = ensemble.Predictor(serve_cfg, members.importable(names), bundle_root=bundle_root)
    startup = time.perf_counter() - t0
    test = _read_csv(data_dir / "test.csv")
    demo = _read_csv(data_dir / "test_demographics.csv")
    groups = [g for _, g in test.group_by("sequence_id", maintain_order=True)]
    latencies = []
    for i in range(n_calls):  # the test set cycled when it holds fewer sequences
        rows = groups[i % len(groups)]
        demo_row = demo.filter(pl.col("subject") == rows["subject"][0])
        c0 = time.perf_counter()
        predictor.predict(rows, demo_row)
        latencies.append(time.perf_counter() - c0)
    warm = latencies[1:] or latencies  # the first call pays one-time costs (graph tracing, cuDNN plans)
    return {
        "members": served,
        "startup_s": round(startup, 3),
        "calls": len(latencies),
        "distinct_sequences": min(n_calls, len(groups)),
        "first_call_ms": round(latencies[0] * 1e3, 2),
        "p50_ms": round(statistics.median(warm) * 1e3, 2),
        "p95_ms": round(_percentile(warm, 95) * 1e3, 2),
        "mean_ms": round(statistics.fmean(warm) * 1e3, 2),
    }


def _serving_config(cfg: Any, out: Path, names: list[str]) -> Any:
    import copy

    import threads

    serve_cfg = copy.deepcopy(cfg)
    serve_cfg.run.n_threads = 0
    serve_cfg.run.strict = False
    serve_cfg.run.out_dir = str(out / "serve")
    for name in serve_cfg.member_names():
        serve_cfg.member(name).use = name in names
        serve_cfg.member(name).bundle_path = ""
    return threads.configure_threads(serve_cfg, "serve")


def run(
    out: Path,
    cpu: bool = False,
    subjects: int | None = None,
    epochs: int | None = None,
    n_calls: int | None = None,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """The whole check; returns (and writes to ``out/gpu_check.json``) the measurements."""
    from tools import synth

    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch/TensorFlow initialise CUDA
    torch = _torch()
    has_gpu = bool(torch is not None and torch.cuda.is_available())
    if not cpu and not has_gpu:
        raise SystemExit("gpu-check: no CUDA GPU visible here; `python main.py gpu-check --cpu` runs it tiny on CPU")
    subjects = subjects or (4 if cpu else 81)
    epochs = epochs or (1 if cpu else 3)
    n_calls = n_calls or (20 if cpu else 200)
    n_folds = 2  # each member trains two folds per setting: enough to time epochs, cheap enough for one lease
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "mode": "cpu" if cpu else "gpu",
        "device": device_info(),
        "settings": {"subjects": subjects, "epochs": epochs, "folds": n_folds, "predict_calls": n_calls},
    }
    data_dir = out / "data"
    t0 = time.perf_counter()
    synth.write_dataset(data_dir, n_subjects=subjects, seed=0)
    result["synth_s"] = round(time.perf_counter() - t0, 2)
    cfg = _check_config(out, epochs, n_folds)
    t0 = time.perf_counter()
    td = _training_data(data_dir, out, cfg)
    result["training_data"] = {"sequences": td.n_sequences, "seconds": round(time.perf_counter() - t0, 2)}
    names = neural_members()
    result["neural_members"] = names
    if only:
        members.check(only)
        names = [m for m in names if m in only]
    result["train"] = _train_runs(cfg, td, out, names, epochs, t_start, cpu)
    result["ddp"] = _ddp_runs(out, data_dir, result["train"], epochs, n_folds, t_start)
    result["serve"] = _serve(cfg, out, data_dir, result["train"], n_calls)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    io_utils.write_text(out / RESULT_FILE, json.dumps(result, indent=2, default=str))
    return result


__all__ = ["RESULT_FILE", "neural_members", "run"]
