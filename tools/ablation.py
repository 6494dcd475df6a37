"""Ablations: a base configuration and named variants, trained on the same folds for several seeds, compared.

    python main.py ablate --data-dir DIR --out DIR --variant nomirror:FEAT_MIRROR_LEFT_HANDED=0 --seeds 42,43

A variant is a set of settings (the environment variables of config.py) laid
over the environment, which is the base (named ``base``, always included).
Every (variant, seed) is one full training run in ``<out>/runs/<variant>/seed<S>/``
on a copy of the one ``<out>/folds.csv``, so scores differ only by the
settings and the model seed. A run ends by writing ``done.json`` (atomically,
last) with what it was trained with; a later invocation reuses a run whose
effective config, members and folds are unchanged and redoes any other.

Per variant, model (each member, and the shipped blend when the runs have one)
and metric (OOF full view, IMU-only view, test-like = their mean) it reports
the mean and std over seeds, and the paired difference to the base: the mean
over seeds of (variant - base) for the same seed, with intervals from a
two-level bootstrap (seeds and subjects drawn with replacement; one draw drives
both sides, so the pairing is kept): a 95 % one and a Bonferroni-corrected one
for the number of differences compared. A difference is a result only when its
corrected interval excludes 0 and the runs have at least three seeds.

``main.py`` wires it to the CLI and passes the training stage in (nothing imports main).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import config
import cv
import io_utils
from config import Config, ConfigError
from metric import TARGET_GESTURES, score_indices

log = logging.getLogger(__name__)

BASE = "base"
BLEND = "blend"
METRICS: tuple[str, ...] = ("full", "imu_only", "test_like")
DONE_FILE = "done.json"
STARTED_FILE = "ablation_run.json"  # what a run was started with: an interrupted run resumes only on the same
# Settings a variant may not change: every run shares the data, the folds and the seeds given on the command line.
RESERVED: dict[str, str] = {
    "CMI_DATA_DIR": "every run trains on --data-dir",
    "CMI_OUT_DIR": "each run's folder is <out>/runs/<variant>/seed<S>",
    "CMI_BUNDLE_DIR": "each run reads its own bundles",
    "CMI_SEED": "the model seeds come from --seeds, the same for every variant",
    "CMI_FOLD_SEED": "every run shares <out>/folds.csv",
    "CMI_N_FOLDS": "every run shares <out>/folds.csv",
}
# Config fields that change no result: a run trained under other values of these is still reused.
# Where and how a run trains, not what: the executors give the same OOF (tests/test_executors.py).
_NOT_IN_IDENTITY: dict[str, tuple[str, ...]] = {
    "run": ("out_dir", "bundle_dir", "n_threads", "strict", "executor", "n_jobs", "ray_address", "ddp_timeout_min")
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a folder name on every OS

TrainFn = Callable[[Config, list[str]], Any]  # trains members into cfg.run.out_dir (main.stage_train)
StageFn = Callable[[str], AbstractContextManager[Any]]  # a stage timer (main.StageTimer.stage)


class AblationError(ValueError):
    """A variant, seed list or run that an ablation cannot use."""


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, str] = field(default_factory=dict)  # setting -> raw value, as in the environment


def parse_variant(text: str) -> Variant:
    """``name:KEY=VALUE,KEY=VALUE``. A part without ``=`` continues the previous value (``KERAS_IMU_FILTERS=8,8,8``)."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep:
        raise AblationError(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    _check_name(name, f"--variant {text!r}")
    overrides: dict[str, str] = {}
    last: str | None = None
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        if not eq:
            if last is None:
                if not part.strip():
                    continue
                raise AblationError(f"--variant {text!r}: {part!r} is not KEY=VALUE")
            overrides[last] += "," + part  # a comma inside a value: tuples, ENSEMBLE_WEIGHTS
            continue
        key = key.strip()
        if not key:
            raise AblationError(f"--variant {text!r}: {part!r} has no setting name before '='")
        if key in overrides:
            raise AblationError(f"--variant {text!r}: {key} is set twice")
        overrides[key], last = value.strip(), key
    return Variant(name, overrides)


def read_variants_file(path: str | Path) -> list[Variant]:
    """``[variants.<name>]`` tables of ``KEY = "VALUE"`` (numbers, booleans and lists are written as strings)."""
    import tomllib

    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise AblationError(f"variants file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise AblationError(f"{path}: not valid TOML: {e}") from None
    extra = sorted(set(doc) - {"variants"})
    if extra:
        raise AblationError(f"{path}: unknown top-level key(s) {extra}; variants go in [variants.<name>] tables")
    out = []
    for name, table in (doc.get("variants") or {}).items():
        _check_name(name, str(path))
        if not isinstance(table, dict):
            raise AblationError(f'{path}: variants.{name} must be a table of KEY = "VALUE"')
        out.append(Variant(name, {k: _toml_value(path, name, k, v) for k, v in table.items()}))
    return out


def _toml_value(path: Path, variant: str, key: str, value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "1" if value else "0"
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ",".join(str(v) for v in value)
    raise AblationError(f"{path}: variants.{variant}.{key} = {value!r} is not a string, number or list")


def _check_name(name: str, where: str) -> None:
    if not _NAME.fullmatch(name):
        raise AblationError(f"{where}: variant name {name!r} must be letters, digits, '_', '.' or '-'")
    if name == BASE:
        raise AblationError(f"{where}: {BASE!r} is the environment's configuration; name the variant otherwise")


def collect_variants(files: Iterable[str | Path] = (), texts: Iterable[str] = ()) -> list[Variant]:
    """The base first, then the variants of ``files`` and of ``texts`` (``--variant``), names unique."""
    variants = [Variant(BASE)]
    for path in files:
        variants += read_variants_file(path)
    variants += [parse_variant(t) for t in texts]
    seen: set[str] = set()
    for v in variants:
        if v.name in seen:
            raise AblationError(f"variant {v.name!r} is defined twice")
        seen.add(v.name)
    return variants


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise AblationError(f"--seeds {text!r}: expected comma-separated integers, e.g. 42,43") from None
    if not seeds:
        raise AblationError("--seeds: at least one seed")
    if len(set(seeds)) != len(seeds):
        raise AblationError(f"--seeds {text!r}: a seed is repeated")
    return seeds


def _is_setting(name: str, known: set[str]) -> bool:
    return name in known or name.startswith(tuple(config.LEGACY_PREFIXES))  # DL_*: config checks the field


def variant_env(base_env: Mapping[str, str], variant: Variant) -> dict[str, str]:
    return {**base_env, **variant.overrides}  # the variant wins


def check_variant(variant: Variant, base_env: Mapping[str, str], config_class: type[Config] | None = None) -> Config:
    """The variant's config, or ConfigError naming the variant and the setting (before anything is trained)."""
    try:  # first: the config's own messages (an unknown name under its prefixes, a malformed value)
        cfg = config.load_config(variant_env(base_env, variant), config_class=config_class)
    except ConfigError as e:
        raise ConfigError(f"variant {variant.name}: {e}") from None
    known = set(config.known_variables(cfg))
    for key in variant.overrides:
        if key in RESERVED:
            raise ConfigError(f"variant {variant.name}: {key} cannot vary in an ablation ({RESERVED[key]})")
        if not _is_setting(key, known):  # config.py ignores names outside its prefixes; a variant must not
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"variant {variant.name}: {key} is not a setting{hint}")
    return cfg


def effective_settings(env: Mapping[str, str], cfg: Config) -> dict[str, str]:
    """The settings of ``env`` that shape a run (its paths and seed are the ablation's; threads change no result)."""
    known = set(config.known_variables(cfg))
    skip = {"CMI_DATA_DIR", "CMI_OUT_DIR", "CMI_BUNDLE_DIR", "CMI_SEED", "CMI_N_THREADS"}
    return {k: v for k, v in sorted(env.items()) if _is_setting(k, known) and k not in skip}


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class AblationSpec:
    out_dir: Path
    data_dir: Path
    variants: list[Variant]  # the base first (collect_variants)
    seeds: list[int]
    members: list[str]
    base_env: Mapping[str, str]
    config_class: type[Config] | None = None
    debug: bool = False
    force: bool = False  # redo every run
    n_resamples: int | None = None  # None: default_resamples for the number of comparisons
    ci_level: float = 0.95
    bootstrap_seed: int = 0


@dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    dir: Path
    cfg: Config
    settings: dict[str, str]  # effective settings of the environment and the variant
    overrides: dict[str, str]  # the variant's own


@dataclass
class AblationResult:
    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    paths: dict[str, Path]


def run_dir(out_dir: Path, variant: str, seed: int) -> Path:
    return Path(out_dir) / "runs" / variant / f"seed{seed}"


def plan_runs(spec: AblationSpec) -> list[Run]:
    """Every (seed, variant) config, checked before anything trains; seed-major so each seed completes a set."""
    for v in spec.variants:
        check_variant(v, spec.base_env, spec.config_class)
    runs = []
    for seed in spec.seeds:
        for v in spec.variants:
            env = variant_env(spec.base_env, v)
            d = run_dir(spec.out_dir, v.name, seed)
            cfg = config.load_config(
                env,
                config_class=spec.config_class,
                out_dir=str(d),
                data_dir=str(Path(spec.data_dir).resolve()),
                seed=seed,
                debug=True if spec.debug else None,
            )
            runs.append(Run(v.name, seed, d, cfg, effective_settings(env, cfg), dict(v.overrides)))
    return runs


def shared_folds(spec: AblationSpec) -> tuple[Path, str]:
    """``<out>/folds.csv`` from sequence ids, subjects and gestures only (no features): equal for every variant."""
    import data

    base = config.load_config(spec.base_env, config_class=spec.config_class)
    train = data.load_train(spec.data_dir)
    labels = train.labels  # one row per sequence, sorted by sequence_id like the frame tables
    folds = cv.load_or_make_folds(
        Path(spec.out_dir) / "folds.csv",
        labels["sequence_id"].to_numpy().astype(str),
        labels["subject"].to_numpy().astype(str),
        labels["gesture"].to_numpy(),
        base.run.n_folds,
        base.run.fold_seed,
        remake=spec.force,  # ablate --force remakes them, as train --force does
    )
    return Path(spec.out_dir) / "folds.csv", cv.folds_hash(folds)


def run_identity(run: Run, members: list[str], folds_hash: str) -> dict[str, Any]:
    """What a finished run must match to be reused: its effective config, its members and the folds."""
    cfg = run.cfg.to_dict()
    for section, fields in _NOT_IN_IDENTITY.items():
        for f in fields:
            cfg[section].pop(f, None)
    return json.loads(json.dumps({"config": cfg, "members": sorted(members), "folds_hash": folds_hash}))


def _changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``section.field: old -> new`` for every leaf that differs, for the log line saying why a run is redone."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _changes(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return io_utils.read_json(path)
    except (FileNotFoundError, ValueError):
        return None


def finished_run(run: Run, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The run's ``done.json`` when it was trained with exactly ``identity``, else None (logged why)."""
    done = _read_marker(run.dir / DONE_FILE)
    if done is None:
        return None
    old = {k: done.get(k) for k in identity}
    if old != identity:
        log.info("%s/seed%d: settings changed, redone (%s)", run.variant, run.seed, "; ".join(_changes(old, identity)))
        return None
    return done


def prepare_run_dir(run: Run, identity: dict[str, Any], folds: Path, force: bool) -> None:
    """Start afresh unless the folder holds an interrupted run of the same identity (the scaffold resumes it)."""
    started = _read_marker(run.dir / STARTED_FILE)
    if run.dir.exists() and (force or started != identity):
        shutil.rmtree(run.dir)  # stale members or a blend of other settings must not leak into this run
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / DONE_FILE).unlink(missing_ok=True)
    io_utils.write_json(run.dir / STARTED_FILE, identity)
    with io_utils.atomic_path(run.dir / "folds.csv") as tmp:
        shutil.copyfile(folds, tmp)  # cv.load_or_make_folds reuses it: the run trains on the shared folds


def train_run(run: Run, members: list[str], identity: dict[str, Any], train: TrainFn) -> dict[str, Any]:
    """Train one run, check it used the shared folds and produced every member's OOF, then write ``done.json``."""
    t0 = time.perf_counter()
    train(run.cfg, list(members))
    wall = time.perf_counter() - t0
    got = cv.folds_hash(_read_folds(run.dir / "folds.csv"))
    if got != identity["folds_hash"]:
        raise AblationError(f"{run.dir} trained on folds {got}, not the shared {identity['folds_hash']}")
    missing = [m for m in members if not (run.dir / "oof" / f"{m}_summary.json").exists()]
    if missing:
        raise AblationError(f"{run.dir}: no OOF for {missing} (see the log); leave them out with --members")
    done = {
        **identity,
        "variant": run.variant,
        "seed": run.seed,
        "overrides": run.overrides,
        "settings": run.settings,
        "wall_s": round(wall, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    io_utils.write_json(run.dir / DONE_FILE, done)  # last: its presence means the run is complete
    return done


def _read_folds(path: Path) -> Any:
    import polars as pl

    return pl.read_csv(path, schema_overrides={"sequence_id": pl.String, "subject": pl.String, "fold": pl.Int64})


def check_members(names: list[str], explicit: bool) -> list[str]:
    """Members that can train here; one named on the command line but unavailable is an error, before training."""
    import members

    try:
        members.check(names)
    except members.UnknownMemberError as e:
        raise AblationError(str(e)) from None
    out = []
    for name in names:
        try:
            ok, why = members.get(name).is_available()
        except ImportError as e:
            ok, why = False, str(e)
        if ok:
            out.append(name)
        elif explicit:
            raise AblationError(f"member {name} cannot train here: {why}")
        else:
            log.warning("member %s left out of the ablation: %s", name, why)
    if not out:
        raise AblationError("no member to train")
    return out


@contextlib.contextmanager
def _no_stage(name: str) -> Iterator[None]:
    yield


# The data set whose figures README and docs/RESULTS.md report: `make run`'s (synth seed 0, 12 subjects).
# A default chosen on it would be judged on the numbers it is then reported with.
REPORTING_SET = {"seed": 0, "n_subjects": 12}


def data_provenance(data_dir: Path) -> dict[str, Any]:
    """Which data set an ablation ran on: the generator's seed and size (``synth_info.json``), else "not generated"."""
    info = Path(data_dir) / "synth_info.json"
    if not info.is_file():
        return {"generated": False, "data_dir": str(data_dir)}
    d = io_utils.read_json(info)
    out = {"generated": True, "seed": d.get("seed"), "n_subjects": d.get("n_subjects"), "data_dir": str(data_dir)}
    out["reporting_set"] = all(out.get(k) == v for k, v in REPORTING_SET.items())
    return out


def run_ablation(
    spec: AblationSpec, train: TrainFn, stage: StageFn = _no_stage, explicit_members: bool = True
) -> AblationResult:
    """Train (or reuse) every run, then compare the variants to the base and write the outputs."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if (spec.n_resamples is not None and spec.n_resamples < 1) or not 0 < spec.ci_level < 1:
        raise AblationError(f"n_resamples {spec.n_resamples} must be >= 1 and ci_level {spec.ci_level} in (0, 1)")
    runs = plan_runs(spec)  # every variant's settings checked before any work
    members = check_members(list(spec.members), explicit_members)
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = data_provenance(spec.data_dir)
    if data.get("reporting_set"):
        log.warning(
            "ablate: %s is the reporting data set (synth seed %s, %s subjects: what README/RESULTS report); a default "
            "chosen here would be judged on the data it is reported on — tune on `main.py synth --seed 100` or another "
            "seed of its own",
            spec.data_dir,
            data["seed"],
            data["n_subjects"],
        )
    elif data.get("generated"):
        log.info("ablate: tuning data generated with seed %s, %s subjects", data["seed"], data["n_subjects"])
    with stage("ablate: shared folds"):
        folds, fhash = shared_folds(spec)
    records = []
    with logging_redirect_tqdm(), tqdm(runs, desc="ablation runs", unit="run") as bar:
        for run in bar:
            bar.set_postfix_str(f"{run.variant}/seed{run.seed}")
            identity = run_identity(run, members, fhash)
            done = None if spec.force else finished_run(run, identity)
            reused = done is not None
            if done is None:
                with stage(f"ablate: {run.variant} seed {run.seed}"):
                    prepare_run_dir(run, identity, folds, spec.force)
                    done = train_run(run, members, identity, train)
            else:
                log.info("%s/seed%d: reused (%s)", run.variant, run.seed, run.dir / DONE_FILE)
            records.append({"variant": run.variant, "seed": run.seed, "dir": run.dir, "reused": reused, **done})
    with stage("ablate: statistics"):
        oofs = load_oofs(runs, members, folds)
        rows = compare(oofs, spec, wall={(r["variant"], r["seed"]): r["wall_s"] for r in records})
    paths = write_outputs(out, spec, members, rows, records, data)
    return AblationResult(rows=rows, runs=records, paths=paths)


# --------------------------------------------------------------------------- OOF of the runs


@dataclass(frozen=True)
class ModelPreds:
    """One model of one run: predicted class per sequence for both views, in the shared sequence order."""

    full: np.ndarray
    imu: np.ndarray
    train_s: float | None = None


@dataclass(frozen=True)
class RunsOOF:
    y: np.ndarray  # (n,) class indices
    subjects: np.ndarray  # (n,) subject of each sequence
    preds: dict[tuple[str, int], dict[str, ModelPreds]]  # (variant, seed) -> model -> predictions


def _model_preds(o: cv.MemberOOF) -> ModelPreds:
    # metric.score_proba scores the argmax: taking it once keeps thousands of bootstrap scores cheap
    return ModelPreds(o.proba_full.argmax(axis=1), o.proba_imu.argmax(axis=1), o.summary.get("train_seconds"))


def load_oofs(runs: list[Run], members: list[str], folds: Path) -> RunsOOF:
    """Every run's member OOF, plus the shipped blend's (``ensemble/oof``) when every run has one."""
    blend_in = [(r.dir / "ensemble" / "oof" / f"{BLEND}_summary.json").exists() for r in runs]
    models = [*members, BLEND] if all(blend_in) else list(members)
    if any(blend_in) and not all(blend_in):
        log.warning("only %d of %d runs have a blend OOF: the blend is not compared", sum(blend_in), len(runs))
    preds: dict[tuple[str, int], dict[str, ModelPreds]] = {}
    ref: cv.MemberOOF | None = None
    for run in runs:
        preds[(run.variant, run.seed)] = {}
        for m in models:
            o = cv.read_member_oof(run.dir / ("ensemble/oof" if m == BLEND else "oof"), m)
            if ref is None:
                ref = o
            elif not (np.array_equal(o.sequence_ids, ref.sequence_ids) and np.array_equal(o.y_true, ref.y_true)):
                raise AblationError(f"{run.dir}: {m} OOF holds other sequences than {runs[0].dir}'s")
            preds[(run.variant, run.seed)][m] = _model_preds(o)
    assert ref is not None
    subject_of = dict(_read_folds(folds).select("sequence_id", "subject").iter_rows())
    subjects = np.array([subject_of[s] for s in ref.sequence_ids.tolist()])
    return RunsOOF(y=np.asarray(ref.y_true), subjects=subjects, preds=preds)


# --------------------------------------------------------------------------- statistics

MIN_SEEDS = 3  # fewer: too few to resample seed variance from, so nothing is called a result
MIN_TAIL = 10  # resamples beyond each end of the corrected interval, for its percentile to be stable
_K = len(TARGET_GESTURES) + 1  # the metric's classes: the targets, then every non-target as one
N_COUNTS = 3 * _K + 1  # per group: true positives, true and predicted counts per class, binary true positives
METHOD_TAG = "two-level bootstrap (seeds x subjects), paired, percentile; Bonferroni"  # the CSV's method column


def view_scores(y: np.ndarray, p: ModelPreds, rows: np.ndarray | None = None) -> np.ndarray:
    """(full, imu_only, test_like) of one model, on ``rows`` (all when None; repeats allowed)."""
    if rows is not None:
        y, full, imu = y[rows], p.full[rows], p.imu[rows]
    else:
        full, imu = p.full, p.imu
    f, i = score_indices(y, full), score_indices(y, imu)
    return np.array([f, i, 0.5 * (f + i)])


def group_counts(y: np.ndarray, pred: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups, N_COUNTS): the confusion counts the competition metric is computed from, per group of rows.

    Counts add: the rows of several groups (a subject drawn twice counts twice) score as the sum of their counts.
    """
    y, pred, group = np.asarray(y, np.int64), np.asarray(pred, np.int64), np.asarray(group, np.int64)
    t, p = np.minimum(y, _K - 1), np.minimum(pred, _K - 1)
    hit = t == p
    out = np.empty((n_groups, N_COUNTS))
    out[:, :_K] = np.bincount(group[hit] * _K + t[hit], minlength=n_groups * _K).reshape(n_groups, _K)
    out[:, _K : 2 * _K] = np.bincount(group * _K + t, minlength=n_groups * _K).reshape(n_groups, _K)
    out[:, 2 * _K : 3 * _K] = np.bincount(group * _K + p, minlength=n_groups * _K).reshape(n_groups, _K)
    out[:, 3 * _K] = np.bincount(group, weights=(t < _K - 1) & (p < _K - 1), minlength=n_groups)
    return out


def score_counts(counts: np.ndarray) -> np.ndarray:
    """The competition metric (as metric.score_indices) of summed ``group_counts``, over any leading axes."""
    c = np.asarray(counts, dtype=np.float64)
    tp, n_true, n_pred, btp = c[..., :_K], c[..., _K : 2 * _K], c[..., 2 * _K : 3 * _K], c[..., 3 * _K]
    denom = n_true + n_pred
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)
    macro = f1.sum(axis=-1) / np.maximum((denom > 0).sum(axis=-1), 1)  # classes present in truth or prediction
    bden = n_true[..., : _K - 1].sum(axis=-1) + n_pred[..., : _K - 1].sum(axis=-1)
    binary = np.divide(2 * btp, bden, out=np.zeros_like(bden), where=bden > 0)
    return 0.5 * binary + 0.5 * macro


@dataclass(frozen=True)
class Resamples:
    """One set of draws shared by every comparison (common random numbers): how often each unit is drawn."""

    seeds: np.ndarray  # (R, n_seeds); all ones when seeds are not resampled
    subjects: np.ndarray  # (R, n_subjects)


def draw_resamples(
    n_seeds: int, n_subjects: int, n_resamples: int, seed: int = 0, resample_seeds: bool = True
) -> Resamples:
    """Seeds and subjects drawn with replacement, independently (the two factors are crossed: every seed's run
    predicts every subject). Subjects are drawn first, so ``resample_seeds=False`` keeps the same subject draws."""
    rng = np.random.default_rng(seed)

    def multiplicities(n: int) -> np.ndarray:
        drawn = rng.integers(0, n, (n_resamples, n)) + n * np.arange(n_resamples)[:, None]
        return np.bincount(drawn.ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)

    subjects = multiplicities(n_subjects)
    seeds = multiplicities(n_seeds) if resample_seeds else np.ones((n_resamples, n_seeds))
    return Resamples(seeds=seeds, subjects=subjects)


def corrected_level(level: float, n_comparisons: int) -> float:
    """Bonferroni: each of k intervals at 1 - alpha/k keeps the chance of any false 'result' under alpha."""
    return 1.0 - (1.0 - level) / max(n_comparisons, 1)


def default_resamples(n_comparisons: int, level: float = 0.95) -> int:
    """Enough resamples for MIN_TAIL beyond each end of the corrected interval; at least 10,000."""
    return max(10_000, int(np.ceil(2 * MIN_TAIL / (1.0 - corrected_level(level, n_comparisons)))))


def interval_method(n_resamples: int, level: float, n_comparisons: int, resample_seeds: bool = True) -> str:
    """The method, in words, for the table, the CSV and the JSON."""
    units = "seeds and subjects resampled" if resample_seeds else "subjects resampled (seeds fixed)"
    return (
        f"two-level bootstrap of variant - base, paired: {units}, {n_resamples} resamples, "
        f"percentile {_pct(level)} %; Bonferroni over {n_comparisons} comparison(s): "
        f"corrected interval {_pct(corrected_level(level, n_comparisons))} %; "
        f"result = the corrected interval excludes 0, with >= {MIN_SEEDS} seeds"
    )


def _pct(level: float) -> str:
    return f"{100 * level:.4g}"


@dataclass(frozen=True)
class PairedDiff:
    diff: np.ndarray  # (3,) mean over seeds of variant - base, on all rows; METRICS order
    low: np.ndarray  # the interval at ``level``
    high: np.ndarray
    adj_low: np.ndarray  # the interval at ``adj_level`` (Bonferroni-corrected for the comparisons made)
    adj_high: np.ndarray
    level: float
    adj_level: float
    n_resamples: int


def paired_difference(
    y: np.ndarray,
    subjects: np.ndarray,
    variant: list[ModelPreds],
    base: list[ModelPreds],
    n_resamples: int | None = None,
    seed: int = 0,
    level: float = 0.95,
    n_comparisons: int = 1,
    resample_seeds: bool = True,
    resamples: Resamples | None = None,
) -> PairedDiff:
    """Mean over seeds of (variant - base), same seed paired, with a two-level bootstrap interval.

    Each resample draws seeds and subjects with replacement (a unit drawn twice counts twice); for every
    drawn seed the metric is recomputed on the drawn subjects' pooled rows, for the variant and the base
    alike (the same draws for both: paired), and the differences are averaged over the drawn seeds.
    Scores are sums of per (seed, subject) confusion counts, so a resample costs no re-scoring of rows.
    ``resample_seeds=False`` is the subject-only bootstrap (seed variance left out), for comparison.
    """
    if len(variant) != len(base) or not variant:
        raise AblationError(f"paired seeds needed: variant has {len(variant)}, base {len(base)}")
    if n_comparisons < 1 or not 0 < level < 1:
        raise AblationError(f"n_comparisons {n_comparisons} must be >= 1 and level {level} in (0, 1)")
    _, group = np.unique(subjects, return_inverse=True)
    n_groups = int(group.max()) + 1

    def counts(preds: list[ModelPreds]) -> np.ndarray:  # (seeds, subjects, 2 views * N_COUNTS)
        return np.stack(
            [
                np.concatenate([group_counts(y, p.full, group, n_groups), group_counts(y, p.imu, group, n_groups)], 1)
                for p in preds
            ]
        )

    cv_, cb = counts(variant), counts(base)

    def views(c: np.ndarray) -> np.ndarray:  # (..., 2 * N_COUNTS) -> (..., 2)
        return score_counts(c.reshape(*c.shape[:-1], 2, N_COUNTS))

    def with_test_like(d: np.ndarray) -> np.ndarray:
        return np.concatenate([d, d.mean(axis=-1, keepdims=True)], axis=-1)

    point = with_test_like((views(cv_.sum(axis=1)) - views(cb.sum(axis=1))).mean(axis=0))
    adj_level = corrected_level(level, n_comparisons)
    n_resamples = n_resamples or default_resamples(n_comparisons, level)
    if n_groups < 2:  # one subject: nothing to resample
        nan = np.full(len(METRICS), np.nan)
        return PairedDiff(point, nan, nan.copy(), nan.copy(), nan.copy(), level, adj_level, n_resamples)
    if resamples is None:
        resamples = draw_resamples(len(variant), n_groups, n_resamples, seed, resample_seeds)
    w, m = resamples.subjects, resamples.seeds
    if w.shape[1] != n_groups or m.shape[1] != len(variant):
        raise AblationError(f"resamples of {m.shape[1]} seeds x {w.shape[1]} subjects for {len(variant)} x {n_groups}")
    diff = np.zeros((len(w), 2))
    for s in range(len(variant)):  # (R, subjects) @ (subjects, counts): each seed's scores on every resample
        diff += m[:, s : s + 1] * (views(w @ cv_[s]) - views(w @ cb[s]))
    stat = with_test_like(diff / len(variant))

    def bounds(lv: float) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.quantile(stat, [(1 - lv) / 2, (1 + lv) / 2], axis=0)
        return lo, hi

    (low, high), (adj_low, adj_high) = bounds(level), bounds(adj_level)
    return PairedDiff(point, low, high, adj_low, adj_high, level, adj_level, len(w))


def _num(x: float) -> float | None:
    """A float for the outputs; NaN (one seed, one subject) becomes None: empty in the CSV, null in the JSON."""
    return None if np.isnan(x) else float(x)


def _std(values: np.ndarray) -> np.ndarray:
    return values.std(axis=0, ddof=1) if len(values) > 1 else np.full(values.shape[1:], np.nan)


def cautions(n_seeds: int, n_resamples: int, level: float, n_comparisons: int) -> list[str]:
    """What keeps the table from supporting conclusions, in words (printed, and in the JSON)."""
    out = []
    if n_seeds < MIN_SEEDS:
        out.append(
            f"CAUTION: {n_seeds} seed(s), fewer than {MIN_SEEDS}: seed variance is not estimated, "
            "so no difference is called a result (give --seeds with at least three)"
        )
    tail = (1 - corrected_level(level, n_comparisons)) / 2 * n_resamples
    if n_comparisons and tail < MIN_TAIL:
        out.append(
            f"CAUTION: each end of the corrected interval rests on {tail:.1f} resample(s): "
            f"use --n-resamples {default_resamples(n_comparisons, level)} or more"
        )
    return out


def compare(
    oofs: RunsOOF, spec: AblationSpec, wall: Mapping[tuple[str, int], float] | None = None
) -> list[dict[str, Any]]:
    """One row per variant x model x metric: mean/std over seeds, paired difference to the base, wall time.

    Every difference is one comparison: k = variants x models x metrics sets the Bonferroni correction.
    """
    wall = wall or {}
    rows = []
    models = list(oofs.preds[(BASE, spec.seeds[0])])
    n_comparisons = sum(v.name != BASE for v in spec.variants) * len(models) * len(METRICS)
    n_resamples = spec.n_resamples or default_resamples(n_comparisons, spec.ci_level)
    adj_level = corrected_level(spec.ci_level, n_comparisons)
    n_subjects = len(np.unique(oofs.subjects))
    draws = draw_resamples(len(spec.seeds), n_subjects, n_resamples, spec.bootstrap_seed)  # shared by every row
    enough_seeds = len(spec.seeds) >= MIN_SEEDS
    for model in models:
        base_preds = [oofs.preds[(BASE, s)][model] for s in spec.seeds]
        for v in spec.variants:
            preds = [oofs.preds[(v.name, s)][model] for s in spec.seeds]
            scores = np.array([view_scores(oofs.y, p) for p in preds])
            diff = None
            if v.name != BASE:
                diff = paired_difference(
                    oofs.y,
                    oofs.subjects,
                    preds,
                    base_preds,
                    n_resamples,
                    level=spec.ci_level,
                    n_comparisons=n_comparisons,
                    resamples=draws,
                )
            walls = [wall[(v.name, s)] for s in spec.seeds if (v.name, s) in wall]
            train_s = [p.train_s for p in preds if p.train_s is not None]
            for k, metric in enumerate(METRICS):
                row: dict[str, Any] = {
                    "variant": v.name,
                    "model": model,
                    "metric": metric,
                    "n_seeds": len(spec.seeds),
                    "mean": _num(scores[:, k].mean()),
                    "std": _num(_std(scores)[k]),
                    "diff_mean": None,
                    "ci_low": None,
                    "ci_high": None,
                    "adj_low": None,
                    "adj_high": None,
                    "result": None,
                    "adj_level": adj_level,
                    "n_comparisons": n_comparisons,
                    "n_resamples": n_resamples,
                    "wall_s": float(np.mean(walls)) if walls else None,
                    "train_s": float(np.mean(train_s)) if train_s else None,
                    "method": METHOD_TAG,
                }
                if diff is not None:
                    lo, hi = float(diff.adj_low[k]), float(diff.adj_high[k])
                    row.update(
                        diff_mean=float(diff.diff[k]),
                        ci_low=_num(diff.low[k]),
                        ci_high=_num(diff.high[k]),
                        adj_low=_num(lo),
                        adj_high=_num(hi),
                        # a result: the corrected interval excludes 0 (NaN, one subject, compares False)
                        result=bool(enough_seeds and (lo > 0 or hi < 0)),
                    )
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- outputs


def format_table(rows: list[dict[str, Any]], level: float = 0.95) -> str:
    """The printed table: the method above, one line per variant x model x metric, cautions below."""

    def num(x: float | None, fmt: str = "{:+.4f}") -> str:
        return "" if x is None else fmt.format(x)

    def flag(x: bool | None) -> str:
        return "" if x is None else ("yes" if x else "no")

    adj = rows[0]["adj_level"] if rows else level
    head = ("variant", "model", "metric", "seeds", "mean", "std", "diff", f"{_pct(level)}% CI")
    lines = [(*head, f"{_pct(adj)}% CI (Bonferroni)", "result", "wall s")]
    for r in rows:
        has = r["diff_mean"] is not None
        lines.append(
            (
                r["variant"],
                r["model"],
                r["metric"],
                str(r["n_seeds"]),
                num(r["mean"], "{:.4f}"),
                num(r["std"], "{:.4f}"),
                num(r["diff_mean"]),
                f"[{num(r['ci_low'])}, {num(r['ci_high'])}]" if has else "",
                f"[{num(r['adj_low'])}, {num(r['adj_high'])}]" if has else "",
                flag(r["result"]),
                num(r["wall_s"], "{:.1f}"),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    table = [text[0], "  ".join("-" * w for w in widths), *text[1:]]
    if not rows:
        return "\n".join(table)
    r0 = rows[0]
    notes = cautions(r0["n_seeds"], r0["n_resamples"], level, r0["n_comparisons"])
    method = interval_method(r0["n_resamples"], level, r0["n_comparisons"])
    return "\n".join([f"intervals: {method}", *table, *notes])


def write_outputs(
    out: Path,
    spec: AblationSpec,
    members: list[str],
    rows: list[dict[str, Any]],
    records: list[dict[str, Any]],
    data: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """``ablation.csv``, ``ablation.json`` and ``ablation.png`` in ``out``, each written atomically."""
    import polars as pl

    paths = {"csv": out / "ablation.csv", "json": out / "ablation.json", "png": out / "ablation.png"}
    with io_utils.atomic_path(paths["csv"]) as tmp:
        pl.DataFrame(rows, infer_schema_length=None).write_csv(tmp)
    r0 = rows[0] if rows else {"n_comparisons": 0, "n_resamples": spec.n_resamples or 0}
    k, n_resamples = r0["n_comparisons"], r0["n_resamples"]
    io_utils.write_json(
        paths["json"],
        {
            "base": BASE,
            "data": data or data_provenance(spec.data_dir),
            "variants": {v.name: v.overrides for v in spec.variants},
            "seeds": spec.seeds,
            "members": members,
            "metrics": list(METRICS),
            "bootstrap": {
                "method": interval_method(n_resamples, spec.ci_level, k),
                "units": ["seed", "subject"],
                "n_resamples": n_resamples,
                "level": spec.ci_level,
                "interval": "percentile",
                "correction": "bonferroni",
                "n_comparisons": k,
                "corrected_level": corrected_level(spec.ci_level, k),
                "min_seeds": MIN_SEEDS,
                "seed": spec.bootstrap_seed,
                "cautions": cautions(len(spec.seeds), n_resamples, spec.ci_level, k),
            },
            "rows": rows,
            "runs": [
                {k: r[k] for k in ("variant", "seed", "dir", "reused", "wall_s", "finished", "settings")}
                for r in records
            ],
        },
    )
    plot(rows, paths["png"], spec.ci_level)
    return paths


def plot(rows: list[dict[str, Any]], path: Path, level: float = 0.95) -> None:
    """Per model (rows) and metric (columns): each variant's difference to the base with both intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != BASE))
    height = 1.2 + 0.45 * max(len(variants), 1) * len(models)
    fig, axes = plt.subplots(len(models), len(METRICS), figsize=(4.2 * len(METRICS), height), squeeze=False)
    by = {(r["variant"], r["model"], r["metric"]): r for r in rows}
    adj = rows[0]["adj_level"] if rows else level
    for i, model in enumerate(models):
        for j, metric in enumerate(METRICS):
            ax = axes[i][j]
            ax.axvline(0.0, color="0.4", lw=0.8)
            for k, v in enumerate(variants):
                r = by.get((v, model, metric))
                if r is None or r["diff_mean"] is None:
                    continue
                d = r["diff_mean"]
                color = "tab:blue" if r["result"] else "tab:gray"
                for lo, hi, lw in ((r["adj_low"], r["adj_high"], 0.8), (r["ci_low"], r["ci_high"], 2.5)):
                    # a percentile interval need not contain the point estimate: clamp, matplotlib rejects negatives
                    err = [[0.0 if lo is None else max(d - lo, 0.0)], [0.0 if hi is None else max(hi - d, 0.0)]]
                    ax.errorbar([d], [k], xerr=err, fmt="o", color=color, capsize=3, elinewidth=lw)
            ax.set_yticks(range(len(variants)), variants)
            ax.set_ylim(-0.7, max(len(variants), 1) - 0.3)
            ax.set_title(f"{model}: {metric}", fontsize=9)
            if i == len(models) - 1:
                ax.set_xlabel(f"variant - base (thick {_pct(level)} %, thin {_pct(adj)} % CI)")
    fig.suptitle(
        "two-level bootstrap (seeds and subjects); blue: a result (the Bonferroni-corrected interval excludes 0)"
        if variants
        else "no variants: the base alone",
        fontsize=9,
    )
    fig.tight_layout()
    with io_utils.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
