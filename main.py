"""Entry point: the CLI, and the Kaggle notebook when run with no subcommand.

    python main.py run    --out outputs            # generate data, train, blend, serve, score, report
    python main.py synth  --out DIR [--subjects N] [--seed S]
    python main.py train  --data-dir DIR --out DIR [--debug] [--members lgbm,torch,keras]
    python main.py serve  --data-dir DIR --out DIR [--bundle-dir DIR]
    python main.py report --out DIR
    python main.py bench  --out DIR
    python main.py ablate --data-dir DIR --out DIR --variant NAME:KEY=VALUE,... [--seeds 42,43,44] [--members lgbm]
    python main.py export-notebook --out FILE
    python main.py realism --data-dir DIR [--run OUT]   # the data (and a run) beside the real data's figures
    python main.py results [--snapshot OUT] [--check]   # docs' figures and settings tables re-rendered
    python main.py gpu-check [--cpu] [--out DIR]  # one prepared GPU check: epoch times, memory, latency
    torchrun --nproc_per_node=N main.py train --members torch ...   # one job over N processes (DDP)

Settings come from config.py (environment overrides such as LGBM_TRAIN=0,
TORCH_EPOCHS=10, KERAS_EPOCHS=20); the members come from the registry in
members.py. Nothing imports this module. Tooling (the generator, report, ablation, benchmarks, gpu check,
realism, results, notebook export) lives in tools/ and is imported only inside the commands that use it
(`run` too: it generates data first and writes the report last), so training and serving (stage_train,
stage_serve, kaggle_main) never load it and the exported notebook does not carry it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import distributed
import members

if TYPE_CHECKING:
    from config import Config
    from ensemble import Predictor

log = logging.getLogger("cmi")
KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_COMPETITION_DIR = KAGGLE_INPUT / "cmi-detect-behavior-with-sensor-data"


def setup_logging(out_dir: Path | None, verbose: bool = False) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if out_dir is not None:
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out_dir / "logs" / "run.log"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )


class StageTimer:
    """Per-stage wall times, logged as they end and saved to timings.json."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.times: dict[str, float] = {}
        if path is not None and path.exists():
            self.times = json.loads(path.read_text())

    def record(self, name: str, seconds: float) -> None:
        self.times[name] = round(seconds, 3)
        if self.path is not None:
            from io_utils import write_json

            write_json(self.path, self.times)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("== %s ...", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, time.perf_counter() - t0)
            log.info("== %s done in %.1f s", name, self.times[name])


# --------------------------------------------------------------------------- stages


def stage_synth(
    out: Path,
    subjects: int,
    seed: int,
    test_subjects: int | None,
    rotated_test_subjects: int = 0,
    rotated_train_subjects: int | None = None,
    rot_missing_fraction: float | None = None,
) -> Path:
    from tools import synth

    paths = synth.write_dataset(
        out,
        n_subjects=subjects,
        seed=seed,
        n_test_subjects=test_subjects,
        n_rotated_test_subjects=rotated_test_subjects,
        n_rotated_train_subjects=rotated_train_subjects,
        rot_missing_fraction=synth.ROT_MISSING_P if rot_missing_fraction is None else rot_missing_fraction,
    )
    log.info("generated data in %s: %s", out, ", ".join(p.name for p in paths.values()))
    return out


@contextlib.contextmanager
def claim_output(out: Path) -> Iterator[None]:
    """This process is the one writer of ``out`` (``io_utils.output_lock`` on ``<out>/.lock``) while inside;
    what killed runs left behind (``.*.tmp`` / ``.*.old`` under bundles/, ensemble/, oof/) is removed first.

    Another process holding it: ``io_utils.OutputLockError`` naming that process. The ``.<member>_work``
    folders are resumable state (keyed by fingerprint) and stay.
    """
    import io_utils

    with io_utils.output_lock(out):
        removed = io_utils.remove_stale_temporaries([out / "bundles", out / "ensemble", out / "oof"])
        if removed:
            log.info(
                "removed %d stale temporary file(s)/folder(s) left by an interrupted run in %s: %s",
                len(removed),
                out,
                ", ".join(str(p.relative_to(out)) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""),
            )
        yield


def stage_train(
    cfg: Config, names: list[str], timer: StageTimer, force: bool = False, output_claimed: bool = False
) -> dict[str, Any]:
    """Train ``names`` on the shared folds (skipping complete bundles unless ``force``), then fit the blend.

    ``cfg.run.executor`` says how the fold jobs run (executors.py). Under torchrun rank 0 does everything
    here; the other ranks receive its training data and train with it (``_train_other_rank``). Rank 0 holds
    the output folder for the whole stage (``claim_output``) unless the caller already does (``output_claimed``).
    ``force`` also remakes ``folds.csv``.
    """
    if output_claimed or distributed.env_rank() != 0:
        return _stage_train(cfg, names, timer, force)
    with claim_output(Path(cfg.run.out_dir)):
        return _stage_train(cfg, names, timer, force)


def _stage_train(cfg: Config, names: list[str], timer: StageTimer, force: bool = False) -> dict[str, Any]:
    """``stage_train``'s work, in the claimed output folder."""
    import data
    import ensemble
    import executors
    import threads
    import wear
    from features import build_frame_table
    from member_base import training_data

    cfg = threads.configure_threads(cfg, "train")  # once, before any member library starts its pools
    cfg = cfg.resolved()  # after the threads: BRANCHNET_PRESET=auto asks torch for CUDA; config.json shows the result
    executors.check(cfg)  # e.g. --executor ray without Ray installed: fail before loading anything
    if distributed.init_from_env(cfg.run.ddp_timeout_min) and not distributed.is_main():
        return _train_other_rank(cfg, names, force)
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")
    with timer.stage("load train data"):
        train = data.load_train(cfg.run.data_dir)
    with timer.stage("frame features"):
        table = build_frame_table(train.rows, train.demographics, cfg.features)
        # Subjects wearing the device upside down are found and rotated back before training.
        steps: dict[str, Any] = {"wear detector": {}}  # optional steps: what each did or why it was skipped
        rows, corrected = _optional_step(
            "wear detector",
            cfg,
            steps,
            lambda: wear.prepare_training_rows(
                train.rows, train.demographics, table, cfg, out / "ensemble", record=steps["wear detector"]
            ),
            fallback=(train.rows, False),
        )
        td = training_data(
            rows,
            train.demographics,
            train.labels,
            cfg,
            out / "folds.csv",
            table=None if corrected else table,
            remake_folds=force,  # train --force remakes folds.csv too
        )
    distributed.broadcast_object(td)  # torchrun: every rank trains on rank 0's data and folds (else a no-op)
    summaries: dict[str, Any] = {}
    for name in names:
        try:
            pipeline = members.get(name)
        except ImportError as e:
            log.warning("member %s cannot be imported, not trained: %s", name, e)
            continue
        ok, why = pipeline.is_available()
        if not ok:
            log.warning("member %s unavailable, not trained: %s", name, why)
            continue
        with timer.stage(f"train {name}"):
            summaries[name] = pipeline.train(td, cfg, out, force=force)
    # The blend that is scored is the blend that is served: USE_<MEMBER>=0 keeps a member out of both.
    present = [m for m in members.names() if (out / "oof" / f"{m}_summary.json").exists()]
    unused = [m for m in present if not cfg.member(m).use]
    if unused:
        log.info("not blended (USE_*=0): %s", ", ".join(unused))
    blended = [m for m in present if cfg.member(m).use]
    if blended:
        with timer.stage("fit blend weights"):
            weights = ensemble.fit_ensemble(out / "oof", blended, cfg, blend_oof_dir=out / "ensemble" / "oof")
            weights["bundles"] = {m: _bundle_identity(out / "bundles" / m) for m in blended}
            ensemble.save_weights(out / "ensemble" / "weights.json", weights)
        # Optional from here on: the bundles and weights.json are written, so nothing below may fail the training.
        with timer.stage("subject post-processing"):
            import subject_pp

            pp = _optional_step(
                "subject post-processing",
                cfg,
                steps,
                lambda: subject_pp.fit_and_evaluate(out, td.table, train.labels, td.y, td.fold_ids, cfg),
            )
            if pp is not None:
                steps["subject post-processing"] = {"status": "fitted", "protocol": pp["protocol"]["kind"]}
                steps |= {part: {"status": "skipped", "reason": why} for part, why in pp.get("skipped", {}).items()}
    else:
        why = "no member blended (none trained, or USE_*=0)"
        steps["subject post-processing"] = {"status": "skipped", "reason": why}
        log.warning("subject post-processing skipped: no member blended")
        # an earlier run's blend and post-processing files must not be sealed below as if fitted by this one
        import subject_pp

        for name in ("weights.json", subject_pp.PROTOCOL_FILE, subject_pp.ORIENTATION_MODEL_FILE):
            stale = out / "ensemble" / name
            if stale.is_file():
                stale.unlink()
                log.warning("removed %s: it was fitted by an earlier run, with other members", stale)
    _write_optional_steps(out, steps)
    import ensemble_seal  # last: the ensemble files as one sealed set, bound to the bundles they were fitted with

    ensemble_seal.write_manifest(out / "ensemble", {m: out / "bundles" / m for m in blended})
    return summaries


def _optional_step(name: str, cfg: Config, steps: dict[str, Any], fn: Callable[[], Any], fallback: Any = None) -> Any:
    """``fn()``, or ``fallback`` when it raises: an optional training step must not fail a training.

    The step checks up front what the data can support and skips the rest itself (logged, and recorded in
    ``steps``). This catches everything else: the exception is logged with its traceback, recorded as
    ``failed`` under ``name`` in ``steps`` (``optional_steps.json``) and the step is skipped. Under
    ``STRICT=1`` (the test suite) it is re-raised, so bugs surface.
    """
    try:
        return fn()
    except Exception as e:
        if cfg.run.strict:
            raise
        log.exception("optional step %r failed and was skipped (training goes on; STRICT=1 raises): %s", name, e)
        steps[name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        return fallback


def _write_optional_steps(out: Path, steps: dict[str, Any]) -> None:
    """``<out>/optional_steps.json``: per optional step, what it did or why it was skipped (read by the report)."""
    from io_utils import write_json

    write_json(out / "optional_steps.json", steps)


def _train_other_rank(cfg: Config, names: list[str], force: bool) -> dict[str, Any]:
    """A torchrun rank other than 0: trains the members with rank 0 on rank 0's data; writes nothing."""
    td = distributed.broadcast_object(None)
    summaries: dict[str, Any] = {}
    for name in names:  # the same members, in the same order, as rank 0's loop in stage_train
        try:
            pipeline = members.get(name)
        except ImportError:
            continue
        if pipeline.is_available()[0]:
            summaries[name] = pipeline.train(td, cfg, Path(cfg.run.out_dir), force=force)
    return summaries


def _bundle_identity(bundle_dir: Path) -> dict[str, Any]:
    """What a weights.json was fitted against: the bundle's path, creation time and folds."""
    path = bundle_dir / "metadata.json"
    if not path.exists():
        return {"path": str(bundle_dir), "missing": True}
    meta = json.loads(path.read_text())
    return {"path": str(bundle_dir), "created": meta.get("created"), "folds_hash": meta.get("folds_hash")}


def build_predictor(cfg: Config, bundle_dir: Path | None = None) -> Predictor:
    """Every registered member's bundle under ``bundle_dir``, blended with ``<bundle_dir>/../ensemble/weights.json``."""
    import ensemble

    return ensemble.Predictor(cfg, bundle_root=bundle_dir or cfg.run.resolved_bundle_dir())


def stage_serve(
    cfg: Config, timer: StageTimer, bundle_dir: Path | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    import inference_server
    import threads

    out = Path(cfg.run.out_dir)
    inference_server.retire_stale_outputs(out)  # before anything can fail: no earlier run's file passes for this one's
    cfg = threads.configure_threads(cfg, "serve")
    with timer.stage("load predictor"):
        t0 = time.perf_counter()
        predictor = build_predictor(cfg, bundle_dir)
        startup = time.perf_counter() - t0
    with timer.stage("serve test set"):
        result = inference_server.serve(
            predictor.predict,
            cfg.run.data_dir,
            out,
            seed=cfg.run.seed,
            startup_s=startup,
            degraded=predictor.degraded_sequences,
        )
    info: dict[str, Any] = {"predictor": predictor.summary(), "startup_s": startup, **(extra or {})}
    if result is not None:
        info["latency"] = result.latency_summary()
        info["submission"] = str(result.submission_path)
        info["degraded_sequences"] = result.degraded
        info.update(score_submission(result.submission_path, Path(cfg.run.data_dir) / "test_solution.csv"))
        import wear

        info["wear_truth"] = wear.score_against_truth(
            predictor.wear.rotated_subjects(), cfg.run.data_dir, result.submission_path
        )
    from io_utils import write_json

    write_json(out / "serve.json", info)
    return info


def score_submission(submission: Path, solution: Path) -> dict[str, Any]:
    """Hold-out score of a submission when the (generated) test labels exist."""
    if not solution.exists():
        return {}
    import polars as pl

    from metric import per_class_f1, score_components

    sub = pl.read_parquet(submission)
    sol = pl.read_csv(solution)
    joined = sol.join(sub, on="sequence_id", how="left", suffix="_pred")
    if joined["gesture_pred"].null_count():
        raise RuntimeError(f"{submission} lacks {joined['gesture_pred'].null_count()} test sequence(s)")
    comp = score_components(joined["gesture"].to_list(), joined["gesture_pred"].to_list())
    out = {
        "holdout": comp,
        "holdout_per_class_f1": per_class_f1(joined["gesture"].to_list(), joined["gesture_pred"].to_list()),
    }
    test_csv = solution.parent / "test.csv"
    if test_csv.exists():  # split the score by view: the hidden test is half IMU-only
        views = (
            pl.scan_csv(test_csv, schema_overrides={"thm_1": pl.Float64, "tof_1_v0": pl.Float64})
            .select("sequence_id", "thm_1", "tof_1_v0")
            .group_by("sequence_id")
            .agg((pl.col("thm_1").is_null().all() & pl.col("tof_1_v0").is_null().all()).alias("imu_only"))
            .collect()
        )
        joined = joined.join(views, on="sequence_id", how="left")
        for flag, name in ((True, "holdout_imu_only"), (False, "holdout_full")):
            part = joined.filter(pl.col("imu_only") == flag)
            if part.height:
                out[name] = score_components(part["gesture"].to_list(), part["gesture_pred"].to_list())
        subjects = (
            pl.scan_csv(test_csv, schema_overrides={"thm_1": pl.Float64, "tof_1_v0": pl.Float64})
            .select("sequence_id", "subject")
            .unique()
            .collect()
        )
        out["holdout_interval"] = holdout_interval(joined.join(subjects, on="sequence_id", how="left"))
    log.info(
        "hold-out score on %s: %.4f (binary F1 %.4f, macro F1 %.4f)",
        solution.name,
        comp["score"],
        comp["binary_f1"],
        comp["macro_f1"],
    )
    return out


def holdout_interval(joined: Any, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Percentile bootstrap of the hold-out score over test subjects (the unit that varies between test sets)."""
    import numpy as np

    from metric import GESTURES, score_indices

    index = {g: i for i, g in enumerate(GESTURES)}
    groups = joined.partition_by("subject", as_dict=False)
    truth = [np.array([index[x] for x in g["gesture"].to_list()]) for g in groups]
    pred = [np.array([index[x] for x in g["gesture_pred"].to_list()]) for g in groups]
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(n_resamples):
        pick = rng.integers(0, len(groups), len(groups))
        scores.append(score_indices(np.concatenate([truth[i] for i in pick]), np.concatenate([pred[i] for i in pick])))
    lo, hi = np.percentile(scores, [50 * (1 - level), 50 * (1 + level)])
    return {
        "low": float(lo),
        "high": float(hi),
        "level": level,
        "n_subjects": len(groups),
        "n_resamples": n_resamples,
        "method": "percentile bootstrap over test subjects",
    }


# --------------------------------------------------------------------------- commands


def make_config(args: argparse.Namespace) -> Config:
    from config import load_config

    overrides = {
        "data_dir": getattr(args, "data_dir", None),
        "out_dir": getattr(args, "out", None),
        "bundle_dir": getattr(args, "bundle_dir", None),
        "debug": True if getattr(args, "debug", False) else None,
        "seed": getattr(args, "seed", None),
        "executor": getattr(args, "executor", None),
        "n_jobs": getattr(args, "n_jobs", None),
    }
    return load_config(**{k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()})


def parse_members(text: str | None, cfg: Config) -> list[str]:
    """``--members`` as given, else every member whose switches ask for training (``<M>_TRAIN`` and ``USE_<M>``)."""
    if text:
        names = [m.strip() for m in text.split(",") if m.strip()]
        try:
            members.check(names)
        except members.UnknownMemberError as e:
            raise SystemExit(str(e)) from None
        return names
    return default_training_members(cfg)


def default_training_members(cfg: Config) -> list[str]:
    chosen = []
    for m in members.names():
        section = cfg.member(m)
        if section.train and not section.use:
            log.info(
                "member %s: %s_TRAIN=1 but USE_%s=0: not trained (name it in --members to train it anyway)",
                m,
                m.upper(),
                m.upper(),
            )
        elif section.train:
            chosen.append(m)
    return chosen


def cmd_synth(args: argparse.Namespace) -> None:
    setup_logging(None)
    stage_synth(
        Path(args.out),
        args.subjects,
        args.seed,
        args.test_subjects,
        args.rotated_test_subjects,
        args.rotated_train_subjects,
        args.rot_missing_fraction,
    )


def cmd_train(args: argparse.Namespace) -> None:
    cfg = make_config(args)
    out = Path(cfg.run.out_dir)
    main_rank = distributed.env_rank() == 0  # under torchrun only rank 0 writes logs and timings to files
    setup_logging(out if main_rank else None, args.verbose)
    if not main_rank:
        logging.getLogger().setLevel(logging.WARNING)
    timer = StageTimer(out / "timings.json" if main_rank else None)
    try:
        stage_train(cfg, parse_members(args.members, cfg), timer, force=args.force)
    except _user_errors() as e:  # another writer, folds of other data, unusable training files: a message
        raise SystemExit(f"train: {e}") from None
    distributed.shutdown()


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors the CLI reports as one message, not a traceback: another process writes the output folder, a
    folds.csv of other data, training files that cannot be used."""
    import cv
    import data
    import io_utils

    return (io_utils.OutputLockError, cv.FoldsError, data.DataError)


def cmd_serve(args: argparse.Namespace) -> None:
    cfg = make_config(args)
    out = Path(cfg.run.out_dir)
    setup_logging(out, args.verbose)
    stage_serve(cfg, StageTimer(out / "timings.json"), Path(args.bundle_dir) if args.bundle_dir else None)


def cmd_report(args: argparse.Namespace) -> None:
    from tools import report

    setup_logging(None)
    path = report.write_report(Path(args.out))
    print(f"report: {path}")


def cmd_run(args: argparse.Namespace) -> None:
    if distributed.launched_by_torchrun():
        raise SystemExit("under torchrun, use the train command (torchrun --nproc_per_node=N main.py train ...)")
    out = Path(args.out)
    setup_logging(out, args.verbose)
    try:
        with claim_output(out):  # one writer from the generated data to the report
            _run_stages(args, out)
    except _user_errors() as e:
        raise SystemExit(f"run: {e}") from None


def _run_stages(args: argparse.Namespace, out: Path) -> None:
    timer = StageTimer(out / "timings.json")
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"
    if not args.data_dir:
        with timer.stage("generate data"):
            stage_synth(data_dir, args.subjects, args.seed if args.seed is not None else 0, args.test_subjects)
    args.data_dir = str(data_dir)
    cfg = make_config(args)
    t0 = time.perf_counter()
    stage_train(cfg, parse_members(args.members, cfg), timer, force=args.force, output_claimed=True)
    stage_serve(cfg, timer)
    timer.record("train + serve total", time.perf_counter() - t0)
    from tools import report

    path = report.write_report(out)
    log.info("report written: %s", path)
    print(f"\nsubmission: {out / 'submission.parquet'}\nreport:     {path}")


def cmd_ablate(args: argparse.Namespace) -> None:
    from config import ConfigError
    from tools import ablation

    try:  # every variant's settings are checked before anything is loaded or trained
        cfg = make_config(args)
        variants = ablation.collect_variants(args.variants or [], args.variant or [])
        for v in variants:
            ablation.check_variant(v, os.environ)
        default_seeds = [cfg.run.seed + i for i in range(ablation.MIN_SEEDS)]  # CMI_SEED, +1, +2
        seeds = ablation.parse_seeds(args.seeds) if args.seeds else default_seeds
    except (ablation.AblationError, ConfigError) as e:
        raise SystemExit(f"ablate: {e}") from None
    if not cfg.run.data_dir:
        raise SystemExit("ablate: --data-dir (or CMI_DATA_DIR) is required")
    out = Path(args.out)
    setup_logging(out, args.verbose)
    timer = StageTimer(out / "timings.json")
    spec = ablation.AblationSpec(
        out_dir=out,
        data_dir=Path(cfg.run.data_dir),
        variants=variants,
        seeds=seeds,
        members=parse_members(args.members, cfg),
        base_env={
            **os.environ,
            **({"CMI_EXECUTOR": args.executor} if args.executor else {}),
            **({"CMI_N_JOBS": str(args.n_jobs)} if args.n_jobs else {}),
        },
        debug=bool(args.debug),
        force=args.force,
        n_resamples=args.n_resamples,
    )

    def train(run_cfg: Config, names: list[str]) -> None:
        stage_train(run_cfg, names, StageTimer(Path(run_cfg.run.out_dir) / "timings.json"))

    try:  # one ablation per folder; each run's stage_train also holds its own run folder
        with claim_output(out):
            result = ablation.run_ablation(spec, train, stage=timer.stage, explicit_members=bool(args.members))
    except (ablation.AblationError, *_user_errors()) as e:
        raise SystemExit(f"ablate: {e}") from None
    print("\n" + ablation.format_table(result.rows, spec.ci_level))
    print("\n" + "\n".join(f"{k}: {p}" for k, p in result.paths.items()))


def cmd_bench(args: argparse.Namespace) -> None:
    from tools import benchmarks

    setup_logging(None)
    benchmarks.main(Path(args.out), quick=args.quick, contention=args.contention)


def cmd_gpu_check(args: argparse.Namespace) -> None:
    from tools import gpu_check

    setup_logging(Path(args.out), args.verbose)
    only = [m.strip() for m in args.members.split(",") if m.strip()] if args.members else None
    result = gpu_check.run(Path(args.out), cpu=args.cpu, subjects=args.subjects, epochs=args.epochs, only=only)
    print(json.dumps(result, indent=2))
    print(f"\ngpu check: {Path(args.out) / gpu_check.RESULT_FILE}")


def cmd_realism(args: argparse.Namespace) -> None:
    from tools import realism

    setup_logging(None)
    data_dir = Path(args.data_dir) if args.data_dir else (Path(args.run) / "data" if args.run else None)
    if data_dir is None:
        raise SystemExit("realism: --data-dir (or --run of a `main.py run` folder, whose data/ is read) is required")
    try:
        rows, path = realism.run(data_dir, args.run, Path(args.out))
    except FileNotFoundError as e:
        raise SystemExit(f"realism: {e}") from None
    print(path.read_text())
    print(f"realism: {path} and {path.with_suffix('.json')}")


def cmd_results(args: argparse.Namespace) -> None:
    from tools import results

    setup_logging(None)
    try:
        report = results.run(args.snapshot, args.name, check=args.check, conditions=args.conditions)
    except results.ResultsError as e:
        raise SystemExit(f"results: {e}") from None
    stale = {doc: names for doc, names in report.items() if names}
    for doc, names in report.items():
        verb = "stale" if args.check else "re-rendered"
        print(f"{doc}: {len(names)} block(s) {verb}" + (f": {', '.join(names)}" if names else ""))
    if args.check and stale:
        raise SystemExit("results: figures differ from their source files; run `python main.py results`")


def cmd_export_notebook(args: argparse.Namespace) -> None:
    from tools import notebook_export

    setup_logging(None)
    path = notebook_export.export_notebook(Path(args.out))
    print(f"notebook: {path}")


@dataclass
class KagglePlan:
    """What one Kaggle notebook run does: which members it trains (and at which size), then where it serves from."""

    rerun: bool
    train: list[str]
    bundle_dir: Path
    debug: bool = False  # the re-run fallback trains at debug size (it must finish before the gateway gives up)
    fallback: bool = False  # True: the re-run found no bundle and trains CMI_RERUN_TRAIN to keep the submission
    found: str = ""  # how bundle_dir was found (for the log and serve.json)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "bundle_dir": str(self.bundle_dir)}


def loadable_members(cfg: Config, bundle_root: Path) -> list[str]:
    """The members in use (``USE_<M>``) whose bundle under ``bundle_root`` (or ``<M>_BUNDLE_PATH``) reads and checks."""
    import bundle

    found = []
    for m in members.names():
        section = cfg.member(m)
        if not section.use:
            continue
        where = Path(section.bundle_path) if section.bundle_path else bundle_root / m
        try:
            bundle.read_metadata(where, m)  # metadata and every sealed file's digest
        except bundle.BundleError as e:
            log.debug("no loadable %s bundle at %s: %s", m, where, e)
            continue
        found.append(m)
    return found


def attached_bundle_dirs(kaggle_input: Path, max_depth: int = 4) -> list[Path]:
    """``bundles/`` folders holding at least one member bundle in the datasets attached under ``kaggle_input``."""
    if not kaggle_input.is_dir():
        return []
    names = set(members.names())
    out: list[Path] = []
    root_depth = len(kaggle_input.parts)
    for here, dirs, _ in os.walk(kaggle_input):
        path = Path(here)
        if len(path.parts) - root_depth >= max_depth:
            dirs[:] = []
        if path.name == "bundles" and any((path / m / "metadata.json").is_file() for m in names):
            out.append(path)
            dirs[:] = []
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(out)


def plan_kaggle_run(cfg: Config, rerun: bool) -> KagglePlan:
    """Decide what a Kaggle notebook run does, before anything is trained; SystemExit when it cannot succeed.

    Bundles are served from the first of: ``CMI_BUNDLE_DIR``; ``<out>/bundles`` when it holds a loadable
    bundle; the one ``bundles/`` folder of a dataset attached under ``CMI_KAGGLE_INPUT`` (several: an error
    naming them). The commit run trains what the switches ask, as always. The hidden-test re-run starts with
    an empty working folder and the gateway waits at most 15 minutes for the server, so it never trains the
    full ensemble: it serves attached bundles, or, with none, trains ``CMI_RERUN_TRAIN`` at debug size (a
    weak but valid submission, logged as such), or stops at once with a message saying what to attach.
    """
    out = Path(cfg.run.out_dir)
    own = out / "bundles"
    kaggle_input = Path(cfg.run.kaggle_input)

    def locate() -> tuple[Path | None, str, bool]:
        """(where bundles are looked for, how it was found, whether one loads there); each folder checked once."""
        if cfg.run.bundle_dir:
            where = Path(cfg.run.bundle_dir)
            return where, "CMI_BUNDLE_DIR", bool(loadable_members(cfg, where))
        if loadable_members(cfg, own):
            return own, "this run's working folder", True
        attached = [d for d in attached_bundle_dirs(kaggle_input) if loadable_members(cfg, d)]
        if len(attached) > 1:
            raise SystemExit(
                f"several attached datasets hold bundles: {', '.join(map(str, attached))}; "
                "set CMI_BUNDLE_DIR to the one to serve"
            )
        if attached:
            return attached[0], f"the dataset attached at {attached[0]}", True
        return None, "", False

    attach_hint = (
        "save a training run's output (its bundles/ and ensemble/ folders) as a Kaggle dataset, attach it to this "
        "notebook and set CMI_BUNDLE_DIR=/kaggle/input/<dataset>/bundles (with the *_TRAIN switches at 0)"
    )
    wanted = default_training_members(cfg)
    if not rerun:
        if wanted:  # trains into <out>/bundles and serves them unless CMI_BUNDLE_DIR names others
            serve_from = Path(cfg.run.bundle_dir) if cfg.run.bundle_dir else own
            return KagglePlan(False, wanted, serve_from, found="CMI_BUNDLE_DIR" if cfg.run.bundle_dir else "trained")
        where, how, loadable = locate()
        if not loadable:
            raise SystemExit(
                f"nothing to serve: no member is switched on for training and no bundle was found; {attach_hint}"
            )
        return KagglePlan(False, [], where, found=how)
    where, how, loadable = locate()
    if loadable:
        return KagglePlan(True, [], where, found=how)
    fallback = [m.strip() for m in cfg.run.rerun_train.split(",") if m.strip()]
    try:
        members.check(fallback)
    except members.UnknownMemberError as e:
        raise SystemExit(f"CMI_RERUN_TRAIN: {e}") from None
    fallback = [m for m in fallback if m in wanted]
    if not fallback:
        looked = where or f"{own} and the datasets under {kaggle_input}"
        raise SystemExit(
            f"competition re-run: no loadable bundle in {looked}, and CMI_RERUN_TRAIN names no member whose "
            f"switches are on, so nothing can be served; {attach_hint}"
        )
    return KagglePlan(True, fallback, own, debug=True, fallback=True, found="re-run fallback training")


def kaggle_main() -> None:
    """Run as the competition notebook: the commit run and the hidden-test re-run (``plan_kaggle_run``).

    Paths come from CMI_DATA_DIR / CMI_OUT_DIR / CMI_BUNDLE_DIR when set, else the Kaggle defaults.
    """
    from config import load_config

    cfg = load_config()
    if not cfg.run.data_dir:
        cfg.run.data_dir = str(KAGGLE_COMPETITION_DIR)
    if "CMI_OUT_DIR" not in os.environ and Path("/kaggle/working").exists():
        cfg.run.out_dir = "/kaggle/working"
    out = Path(cfg.run.out_dir)
    setup_logging(out)
    timer = StageTimer(out / "timings.json")
    rerun = bool(os.getenv("KAGGLE_IS_COMPETITION_RERUN"))
    plan = plan_kaggle_run(cfg, rerun)
    if plan.fallback:
        log.error(
            "competition re-run: no loadable bundle (CMI_BUNDLE_DIR unset or empty, nothing attached under %s, and "
            "the re-run's working folder starts empty); training %s at debug size so the submission is not lost. "
            "Its score is far below a full training: attach the trained bundles as a dataset (README, On Kaggle)",
            cfg.run.kaggle_input,
            ", ".join(plan.train),
        )
        cfg.run.debug = True
        for m in members.names():  # serve what was just trained, nothing the plan left out
            cfg.member(m).use = m in plan.train
    elif rerun:
        log.info("competition re-run: no training, serving the bundles of %s (%s)", plan.found, plan.bundle_dir)
    if plan.train:
        t0 = time.perf_counter()
        stage_train(cfg, plan.train, timer)
        if plan.fallback:
            spent = time.perf_counter() - t0
            log.warning("re-run fallback training took %.0f s (the gateway waits at most 15 min for the server)", spent)
        elif not cfg.run.bundle_dir:
            log.warning(
                "the bundles trained here are in %s: the hidden-test re-run starts with an empty working folder and "
                "will not see them. Without attached bundles the re-run trains %s at debug size (weak); for this "
                "run's ensemble, %s",
                out / "bundles",
                cfg.run.rerun_train or "nothing (and stops)",
                "save this version's output as a dataset, attach it and set "
                "CMI_BUNDLE_DIR=/kaggle/input/<dataset>/bundles",
            )
    stage_serve(cfg, timer, plan.bundle_dir, extra={"kaggle": plan.to_dict()})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main.py", description="CMI gesture recognition: train, blend, serve.")
    sub = p.add_subparsers(dest="command")

    def common(sp: argparse.ArgumentParser, data: bool = True) -> None:
        sp.add_argument("--out", default="outputs", help="output folder (default: outputs)")
        if data:
            sp.add_argument("--data-dir", help="folder in the competition layout (train.csv, test.csv, ...)")
        sp.add_argument("-v", "--verbose", action="store_true")

    def executor_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--executor",
            choices=("local", "ray"),
            default=None,
            help="how the (member, fold) jobs run: local (default; CMI_N_JOBS processes) or ray (CMI_RAY_ADDRESS)",
        )
        sp.add_argument("--n-jobs", type=int, default=None, help="local executor: folds at once (CMI_N_JOBS)")

    s = sub.add_parser("synth", help="write generated competition-layout data")
    s.add_argument("--out", required=True)
    s.add_argument("--subjects", type=int, default=81)
    s.add_argument("--test-subjects", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--rotated-test-subjects",
        type=int,
        default=0,
        help="test subjects wearing the device rotated 180 degrees about z (default 0)",
    )
    s.add_argument(
        "--rotated-train-subjects",
        type=int,
        default=None,
        help="train subjects wearing it so (default: 2 when --subjects >= 40, else 0)",
    )
    s.add_argument(
        "--rot-missing-fraction",
        type=float,
        default=None,
        help="share of training sequences without rotation columns (default 0.006, as in the real data)",
    )
    s.set_defaults(func=cmd_synth)

    t = sub.add_parser("train", help="train members on the shared folds and fit the blend")
    common(t)
    t.add_argument("--debug", action="store_true", help="tiny epochs/rounds: every stage in minutes")
    t.add_argument("--members", help="comma-separated subset of " + ",".join(members.names()))
    t.add_argument("--force", action="store_true", help="retrain members whose bundle is already complete")
    t.add_argument("--seed", type=int, default=None)
    executor_options(t)
    t.set_defaults(func=cmd_train)

    sv = sub.add_parser("serve", help="serve test.csv through the inference gateway -> submission.parquet")
    common(sv)
    sv.add_argument("--bundle-dir", help="trained bundles (default: <out>/bundles)")
    sv.set_defaults(func=cmd_serve)

    r = sub.add_parser("run", help="end to end: generate data, train, blend, serve, score, report")
    common(r)
    r.add_argument(
        "--subjects", type=int, default=12, help="generated train subjects (default 12: minutes on a 2-core CPU)"
    )
    r.add_argument(
        "--test-subjects",
        type=int,
        default=6,
        help="generated hold-out subjects (default 6, so the hold-out score has an interval worth stating)",
    )
    r.add_argument("--debug", action="store_true")
    r.add_argument("--members", help="comma-separated subset of " + ",".join(members.names()))
    r.add_argument("--force", action="store_true", help="retrain members whose bundle is already complete")
    r.add_argument("--seed", type=int, default=None)
    executor_options(r)
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="write the report of an output folder")
    rep.add_argument("--out", default="outputs")
    rep.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", help="benchmarks: features, latency, throughput")
    b.add_argument("--out", default="outputs/bench")
    b.add_argument("--quick", action="store_true", help="smaller sizes")
    b.add_argument(
        "--contention",
        action="store_true",
        help="also each member alone vs beside a competing train/serve process (tools/bench/bench_contention.py)",
    )
    b.set_defaults(func=cmd_bench)

    a = sub.add_parser(
        "ablate", help="train a base and variants (setting overrides) on the same folds and seeds, compare them"
    )
    a.add_argument("--out", default="outputs/ablation", help="output folder (default: outputs/ablation)")
    a.add_argument("--data-dir", help="folder in the competition layout (train.csv, train_demographics.csv)")
    a.add_argument("--variants", action="append", help='TOML file of [variants.<name>] tables of KEY = "VALUE"')
    a.add_argument(
        "--variant",
        action="append",
        metavar="NAME:KEY=VALUE,...",
        help="one variant (repeatable); a part without '=' continues the previous value (KERAS_IMU_FILTERS=8,8,8)",
    )
    a.add_argument(
        "--seeds",
        help="comma-separated model seeds, the same for every variant (default: CMI_SEED, +1, +2; fewer than 3: "
        "nothing is called a result)",
    )
    a.add_argument("--members", help="comma-separated subset of " + ",".join(members.names()))
    a.add_argument("--debug", action="store_true", help="tiny epochs/rounds in every run")
    a.add_argument("--force", action="store_true", help="redo every run, even finished ones")
    a.add_argument(
        "--n-resamples",
        type=int,
        help="resamples of the two-level (seeds x subjects) bootstrap (default: enough for the corrected interval, "
        ">= 10000)",
    )
    a.add_argument("-v", "--verbose", action="store_true")
    executor_options(a)
    a.set_defaults(func=cmd_ablate)

    g = sub.add_parser(
        "gpu-check", help="one prepared check on a GPU: neural members with AMP on/off, DDP, predict latency"
    )
    g.add_argument("--out", default="outputs/gpu_check")
    g.add_argument("--cpu", action="store_true", help="on the CPU at a tiny size (a test of the check itself)")
    g.add_argument("--subjects", type=int, default=None, help="generated subjects (default 81; --cpu: 4)")
    g.add_argument("--epochs", type=int, default=None, help="epochs per member and AMP setting (default 3; --cpu: 1)")
    g.add_argument("--members", help="only these of the neural members (default: every one in the registry)")
    g.add_argument("-v", "--verbose", action="store_true")
    g.set_defaults(func=cmd_gpu_check)

    rl = sub.add_parser(
        "realism", help="the data set's (and a run's) figures beside the real data's (REAL_DATA_FACTS.md)"
    )
    rl.add_argument("--data-dir", help="folder in the competition layout (default: <run>/data)")
    rl.add_argument("--run", help="a finished run's output folder: its OOF figures too")
    rl.add_argument("--out", default="outputs/realism.md", help="Markdown table (and .json beside it)")
    rl.set_defaults(func=cmd_realism)

    rs = sub.add_parser("results", help="re-render the generated blocks of the docs (figures, settings tables)")
    rs.add_argument("--snapshot", help="first copy this finished run's figure files into docs/results/<name>/")
    rs.add_argument("--name", default="make_run", help="the snapshot's name (default make_run)")
    rs.add_argument("--check", action="store_true", help="only say which blocks are stale (exit 1 if any)")
    rs.add_argument("--conditions", default="", help="with --snapshot: how the run was made (e.g. 'machine shared')")
    rs.set_defaults(func=cmd_results)

    n = sub.add_parser("export-notebook", help="write a single Kaggle .ipynb carrying the modules")
    n.add_argument("--out", default="outputs/cmi_notebook.ipynb")
    n.set_defaults(func=cmd_export_notebook)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv and KAGGLE_INPUT.exists():
        kaggle_main()
        return
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return
    args.func(args)


if __name__ == "__main__":
    main()
