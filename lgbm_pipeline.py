"""LightGBM member: gradient-boosted trees on per-sequence aggregates.

Two models per fold: "full" (trained on the full-view aggregates) and "imu"
(trained on the aggregates of the IMU-only view). Prediction routes sequences
without any thm/tof value to the IMU model, the rest to the full model, and
averages the folds. Bundles hold LightGBM's own text model files (no pickle)
plus a metadata file that pins feature order, class order and the present-class
mapping of every model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import bundle
import features
import io_utils
import threads
from config import Config
from member_base import FoldResult, FoldSplit, MemberPipeline, TrainingData
from metric import GESTURES, N_CLASSES, score_proba

try:
    import lightgbm as lgb

    _IMPORT_ERROR = ""
except ImportError as exc:  # pragma: no cover - lightgbm is in Kaggle's image and our venv
    lgb = None  # type: ignore[assignment]
    _IMPORT_ERROR = str(exc)

MEMBER = "lgbm"
VIEWS: tuple[str, ...] = ("full", "imu")
# Keys of the params dict that drive the training loop rather than LightGBM itself.
_LOOP_KEYS = ("n_estimators", "early_stopping_rounds")

log = logging.getLogger(__name__)


def is_available() -> tuple[bool, str]:
    if lgb is None:
        return False, f"lightgbm is not installed ({_IMPORT_ERROR})"
    return True, f"lightgbm {lgb.__version__}"


def _require_lightgbm() -> None:
    if lgb is None:
        raise RuntimeError(f"the {MEMBER} member needs lightgbm, which is not installed ({_IMPORT_ERROR})")


def params_from_config(cfg: Config) -> dict[str, Any]:
    """LightGBM parameters from ``cfg.lgbm`` plus the loop keys ``n_estimators``/``early_stopping_rounds``."""
    c = cfg.lgbm
    return {
        "objective": "multiclass",
        "metric": "multi_logloss",
        "learning_rate": c.learning_rate,
        "num_leaves": c.num_leaves,
        "min_data_in_leaf": c.min_child_samples,
        "feature_fraction": c.feature_fraction,
        "bagging_fraction": c.bagging_fraction,
        "bagging_freq": c.bagging_freq,
        "lambda_l2": c.lambda_l2,
        "num_threads": threads.n_threads(cfg),
        # deterministic needs a fixed histogram layout to be reproducible (LightGBM docs)
        "deterministic": True,
        "force_col_wise": True,
        "verbosity": -1,
        "n_estimators": c.debug_n_estimators if cfg.run.debug else c.n_estimators,
        "early_stopping_rounds": c.early_stopping_rounds,
    }


class LGBMSequenceClassifier:
    """A scikit-learn-shaped multiclass classifier whose columns are always the 18 ``GESTURES``.

    LightGBM needs labels 0..k-1, so it is trained on the classes present in
    ``y`` (remapped) and its probabilities are scattered back into the global
    18 columns; absent classes get exactly 0.
    """

    classes_: tuple[str, ...] = GESTURES

    def __init__(self, params: dict[str, Any], random_state: int = 42) -> None:
        self.params = dict(params)
        self.random_state = int(random_state)
        self.booster_: Any = None
        self.present_classes_: np.ndarray = np.zeros(0, dtype=np.int64)
        self.feature_names_: list[str] = []
        self.best_iteration_: int = 0

    # ---- training -------------------------------------------------------------------------
    def _train_params(self, n_present: int) -> dict[str, Any]:
        params = {k: v for k, v in self.params.items() if k not in _LOOP_KEYS}
        params.update(objective="multiclass", num_class=n_present, seed=self.random_state)
        params.setdefault("verbosity", -1)
        return params

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        X_val: np.ndarray | None = None,
        y_val: np.ndarray | None = None,
        feature_names: Sequence[str] | None = None,
    ) -> LGBMSequenceClassifier:
        _require_lightgbm()
        X = _as_matrix(X, "X")
        y = _as_labels(y, len(X), "y")
        names = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(X.shape[1])]
        if len(names) != X.shape[1]:
            raise ValueError(f"{len(names)} feature names for {X.shape[1]} columns")
        present = np.unique(y)
        if len(present) < 2:
            raise ValueError(f"training data hold {len(present)} class(es); a multiclass model needs at least 2")
        params = self._train_params(len(present))
        train_set = lgb.Dataset(X, label=np.searchsorted(present, y), feature_name=names, free_raw_data=True)

        n_rounds = int(self.params.get("n_estimators", 100))
        valid_sets, callbacks = [], []
        if X_val is not None and y_val is not None:
            X_val = _as_matrix(X_val, "X_val")
            y_val = _as_labels(y_val, len(X_val), "y_val")
            if X_val.shape[1] != X.shape[1]:
                raise ValueError(f"X_val has {X_val.shape[1]} columns, X has {X.shape[1]}")
            # Classes the model never saw cannot be scored by its logloss: leave them out of early stopping.
            keep = np.isin(y_val, present)
            if keep.any():
                valid_sets = [
                    lgb.Dataset(X_val[keep], label=np.searchsorted(present, y_val[keep]), reference=train_set)
                ]
                callbacks.append(lgb.early_stopping(int(self.params.get("early_stopping_rounds", 100)), verbose=False))
            else:
                log.warning(
                    "no validation row has a class seen in training: training %d rounds without early stopping",
                    n_rounds,
                )
        booster = lgb.train(
            params,
            train_set,
            num_boost_round=n_rounds,
            valid_sets=valid_sets or None,
            valid_names=["val"] if valid_sets else None,
            callbacks=callbacks,
        )
        self.booster_ = booster
        self.present_classes_ = present.astype(np.int64)
        self.feature_names_ = names
        # best_iteration is 0 when early stopping did not run: then every round counts.
        self.best_iteration_ = int(booster.best_iteration) or int(booster.current_iteration())
        return self

    @classmethod
    def from_booster(
        cls, booster: Any, present_classes: Sequence[int], params: dict[str, Any] | None = None, random_state: int = 42
    ) -> LGBMSequenceClassifier:
        """Wrap a booster loaded from a model file (which holds exactly the rounds to use)."""
        present = np.asarray(present_classes, dtype=np.int64)
        n_class = int(booster.num_model_per_iteration())  # == num_class for a multiclass booster
        if n_class != len(present):
            raise ValueError(f"booster has {n_class} classes but the present-class mapping has {len(present)}")
        if len(present) and (present.min() < 0 or present.max() >= N_CLASSES or np.any(np.diff(present) <= 0)):
            raise ValueError(f"present-class mapping {present.tolist()} is not a sorted subset of 0..{N_CLASSES - 1}")
        model = cls(params or {}, random_state)
        model.booster_ = booster
        model.present_classes_ = present
        model.feature_names_ = list(booster.feature_name())
        model.best_iteration_ = int(booster.current_iteration())
        return model

    # ---- prediction -----------------------------------------------------------------------
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if self.booster_ is None:
            raise RuntimeError("LGBMSequenceClassifier is not fitted")
        X = _as_matrix(X, "X")
        if X.shape[1] != len(self.feature_names_):
            raise ValueError(f"X has {X.shape[1]} columns, the model was trained on {len(self.feature_names_)}")
        out = np.zeros((len(X), N_CLASSES), dtype=np.float64)
        if len(X):
            # a loaded booster would otherwise use every core: keep to the configured share
            kwargs = {"num_threads": int(self.params["num_threads"])} if "num_threads" in self.params else {}
            local = self.booster_.predict(X, num_iteration=self.best_iteration_, **kwargs)
            out[:, self.present_classes_] = np.asarray(local, dtype=np.float64).reshape(len(X), -1)
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Global class indices."""
        return self.predict_proba(X).argmax(axis=1)

    def save_model(self, path: str | Path) -> None:
        """LightGBM's text format, cut at the best iteration so a reload predicts the same."""
        self.booster_.save_model(str(path), num_iteration=self.best_iteration_)

    def gain_importance(self) -> np.ndarray:
        return np.asarray(self.booster_.feature_importance("gain", iteration=self.best_iteration_), dtype=np.float64)

    def split_importance(self) -> np.ndarray:
        return np.asarray(self.booster_.feature_importance("split", iteration=self.best_iteration_), dtype=np.float64)


def _as_matrix(X: Any, what: str) -> np.ndarray:
    X = np.asarray(X)
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float32)
    if X.ndim != 2:
        raise ValueError(f"{what} must be 2-D, got shape {X.shape}")
    return X


def _as_labels(y: Any, n: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"{what} has shape {y.shape}, expected ({n},)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} must hold integer class indices into metric.GESTURES, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= N_CLASSES):
        raise ValueError(f"{what} holds class indices outside 0..{N_CLASSES - 1}")
    return y.astype(np.int64)


# ---- routing ----------------------------------------------------------------------------------
def _mean_proba(models: Sequence[LGBMSequenceClassifier], X: np.ndarray) -> np.ndarray:
    return np.mean([m.predict_proba(X) for m in models], axis=0)


def _routed_proba(
    use_imu: np.ndarray,
    X_full: np.ndarray | None,
    X_imu: np.ndarray | None,
    full_models: Sequence[LGBMSequenceClassifier],
    imu_models: Sequence[LGBMSequenceClassifier],
) -> np.ndarray:
    """Rows with ``use_imu`` go to the IMU models (``X_imu`` holds those rows), the others to the full models."""
    out = np.zeros((len(use_imu), N_CLASSES), dtype=np.float64)
    if (~use_imu).any():
        out[~use_imu] = _mean_proba(full_models, X_full)
    if use_imu.any():
        out[use_imu] = _mean_proba(imu_models, X_imu)
    return out


def _aggregates(
    table: features.FrameTable, cfg: Config, imu_only: bool, expected: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    X, names = features.sequence_aggregates(table, cfg.features, imu_only=imu_only)
    names = list(names)
    if expected is not None and names != list(expected):
        view = "imu" if imu_only else "full"
        raise bundle.BundleError(
            f"{MEMBER}: the {view} aggregates differ from the bundle's: "
            f"{_diff(f'{view} features', list(expected), names)}"
        )
    return np.asarray(X, dtype=np.float32), names


# ---- the loaded member ----------------------------------------------------------------------
class LGBMMember:
    """Every fold's full and IMU models, loaded once; ``predict_proba`` averages folds and routes."""

    classes_: tuple[str, ...] = GESTURES

    def __init__(
        self,
        full_models: Sequence[LGBMSequenceClassifier],
        imu_models: Sequence[LGBMSequenceClassifier],
        feature_names_full: Sequence[str],
        feature_names_imu: Sequence[str],
        cfg: Config,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if not full_models or len(full_models) != len(imu_models):
            raise ValueError(f"need one full and one IMU model per fold, got {len(full_models)} and {len(imu_models)}")
        self.full_models = list(full_models)
        self.imu_models = list(imu_models)
        self.feature_names_ = list(feature_names_full)
        self.feature_names_imu_ = list(feature_names_imu)
        self.cfg = cfg
        self.metadata = metadata or {}

    @property
    def n_folds(self) -> int:
        return len(self.full_models)

    def predict_proba(self, table: features.FrameTable, folds: Sequence[int] | None = None) -> np.ndarray:
        """(n_seq, 18) in ``GESTURES`` order; ``folds`` (positions) restricts the average, e.g. to check OOF."""
        picks = range(self.n_folds) if folds is None else list(folds)
        full = [self.full_models[i] for i in picks]
        imu = [self.imu_models[i] for i in picks]
        use_imu = ~np.asarray(table.has_tof_thm, dtype=bool)
        # Aggregates only for the rows each view serves: predict() usually sees one sequence.
        X_full = X_imu = None
        if (~use_imu).any():
            sub = table if not use_imu.any() else table.select(np.flatnonzero(~use_imu))
            X_full, _ = _aggregates(sub, self.cfg, False, self.feature_names_)
        if use_imu.any():
            sub = table if use_imu.all() else table.select(np.flatnonzero(use_imu))
            X_imu, _ = _aggregates(sub, self.cfg, True, self.feature_names_imu_)
        return _routed_proba(use_imu, X_full, X_imu, full, imu)


# ---- the pipeline: training hooks and loading ------------------------------------------------
@dataclass
class _Context:
    """Aggregates of both views, computed once for every fold."""

    X_full: np.ndarray
    X_imu: np.ndarray
    names_full: list[str]
    names_imu: list[str]
    params: dict[str, Any]
    use_imu_full_view: np.ndarray  # sequences without thm/tof, which serving routes to the IMU model


def inner_split(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """One subject-grouped, stratified split of the training rows; None when there are too few subjects."""
    from sklearn.model_selection import StratifiedGroupKFold

    if len(np.unique(groups)) < 2:
        return None
    n_splits = min(n_splits, len(np.unique(groups)))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        return next(iter(splitter.split(np.zeros(len(y)), y, groups=groups)))
    except ValueError:  # e.g. a class rarer than the number of splits: stratification cannot be honoured
        return None


def fit_without_scored_fold(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    params: dict[str, Any],
    cfg: Config,
    seed: int,
    names: Sequence[str],
) -> LGBMSequenceClassifier:
    """Fit on the training folds only; the number of rounds comes from them too.

    ``stopping="inner"``: early stopping on an inner subject-grouped split of
    these rows picks the rounds, then the model is refitted on all of them for
    that many rounds. ``"fixed"``: ``n_estimators`` rounds.
    """
    rounds = int(params["n_estimators"])
    if cfg.lgbm.stopping == "inner":
        split = inner_split(y, groups, cfg.lgbm.inner_folds, seed)
        if split is None:
            log.warning("%s: too few training subjects for an inner split: %d fixed rounds", MEMBER, rounds)
        else:
            fit, stop = split
            probe = LGBMSequenceClassifier(params, seed).fit(X[fit], y[fit], X[stop], y[stop], names)
            rounds = max(1, probe.best_iteration_)
    return LGBMSequenceClassifier({**params, "n_estimators": rounds}, seed).fit(X, y, feature_names=names)


class LGBMPipeline(MemberPipeline):
    """Two boosters per fold (full view, IMU-only view), LightGBM text files in the bundle."""

    name = MEMBER
    packages = ("lightgbm",)
    code_modules = ("lgbm_pipeline",)  # with MemberPipeline.shared_code_modules: their code is in the fingerprint

    def is_available(self) -> tuple[bool, str]:
        return is_available()

    def prepare(self, data: TrainingData, cfg: Config) -> _Context:
        _require_lightgbm()
        X_full, names_full = _aggregates(data.table, cfg, imu_only=False)
        X_imu, names_imu = _aggregates(data.imu_table, cfg, imu_only=True)
        return _Context(
            X_full,
            X_imu,
            names_full,
            names_imu,
            params_from_config(cfg),
            ~np.asarray(data.table.has_tof_thm, dtype=bool),
        )

    def feature_names(self, ctx: _Context | None, cfg: Config) -> list[str]:
        return current_feature_names(cfg)[0]

    def fold_files(self, fold: int) -> list[str]:
        return [f"fold{fold}_{view}.txt" for view in VIEWS]

    def fit_fold(self, ctx: _Context, data: TrainingData, split: FoldSplit, cfg: Config, work: Path) -> FoldResult:
        tr, va, k, y = split.train, split.valid, split.fold, data.y
        seed = cfg.run.seed
        groups = np.asarray(data.table.subjects)[tr]
        # The validation fold's labels are used for scoring only: its OOF must not be chosen with them.
        full = fit_without_scored_fold(ctx.X_full[tr], y[tr], groups, ctx.params, cfg, seed, ctx.names_full)
        imu = fit_without_scored_fold(ctx.X_imu[tr], y[tr], groups, ctx.params, cfg, seed, ctx.names_imu)
        # Full view routed exactly as predict_proba routes, so the OOF is what serving would answer.
        # For a sequence without thm/tof, its imu_table aggregates equal its table aggregates.
        route = ctx.use_imu_full_view[va]
        p_full = _routed_proba(route, ctx.X_full[va][~route], ctx.X_imu[va][route], [full], [imu])
        p_imu = imu.predict_proba(ctx.X_imu[va])
        s_full, s_imu = score_proba(y[va], p_full), score_proba(y[va], p_imu)
        models = []
        for view, model, score in (("full", full, s_full), ("imu", imu, s_imu)):
            model.save_model(work / f"fold{k}_{view}.txt")
            io_utils.write_npy(
                work / f"fold{k}_{view}_importance.npy", np.stack([model.gain_importance(), model.split_importance()])
            )
            models.append(
                {
                    "fold": k,
                    "view": view,
                    "file": f"fold{k}_{view}.txt",
                    "present_classes": model.present_classes_.tolist(),
                    "rounds": model.best_iteration_,  # chosen on the training folds (LGBM_STOPPING)
                    "val_score": score,
                }
            )
        log.info(
            "%s fold %d: full %.4f imu %.4f | rounds full %d imu %d (%s) | %d train / %d val",
            MEMBER,
            k,
            s_full,
            s_imu,
            full.best_iteration_,
            imu.best_iteration_,
            cfg.lgbm.stopping,
            len(tr),
            len(va),
        )
        return FoldResult(p_full, p_imu, {"models": models})

    def summary_extra(self, ctx: _Context, records: dict[int, dict], cfg: Config) -> dict[str, Any]:
        return {"rounds": {m["file"]: m["rounds"] for r in records.values() for m in r["models"]}}

    def bundle_extra(self, ctx: _Context, records: dict[int, dict], cfg: Config) -> dict[str, Any]:
        return {
            "feature_names_imu": ctx.names_imu,
            "feature_config": dataclasses.asdict(cfg.features),
            "models": [m for k in sorted(records) for m in records[k]["models"]],
            "params": ctx.params,
            "lightgbm_version": lgb.__version__,
        }

    def write_extra_files(self, bundle_tmp: Path, ctx: _Context, records: dict[int, dict], work: Path) -> None:
        for view, names in (("full", ctx.names_full), ("imu", ctx.names_imu)):
            imp = np.stack([io_utils.read_npy(work / f"fold{k}_{view}_importance.npy") for k in sorted(records)])
            _write_importance(bundle_tmp / f"importance_{view}.csv", names, imp[:, 0], imp[:, 1])

    def load(self, bundle_dir: Path, cfg: Config) -> LGBMMember:
        return load_member(bundle_dir, cfg)


def _write_importance(path: Path, names: Sequence[str], gain: np.ndarray, split: np.ndarray) -> None:
    """Gain importance averaged over folds (rows of ``gain``/``split``), most important first (for the report)."""
    order = np.argsort(-gain.mean(axis=0), kind="stable")
    lines = ["feature,gain_mean,gain_std,split_mean"]
    lines += [f"{names[i]},{gain[:, i].mean():.6g},{gain[:, i].std():.6g},{split[:, i].mean():.6g}" for i in order]
    io_utils.write_text(path, "\n".join(lines) + "\n")


def current_feature_names(cfg: Config) -> tuple[list[str], list[str]]:
    """The aggregate names this code produces: (full view, IMU view)."""
    return list(features.aggregate_feature_names(imu_only=False)), list(features.aggregate_feature_names(imu_only=True))


def _diff(name: str, bundle_names: list[str], code_names: list[str]) -> str:
    # bundle.py owns the wording of list differences
    return bundle.diff_list(name, bundle_names, code_names)


def load_member(bundle_dir: Path, cfg: Config) -> LGBMMember:
    """Load every booster once after checking the bundle against the current code."""
    _require_lightgbm()
    bundle_dir = Path(bundle_dir)
    names_full, names_imu = current_feature_names(cfg)
    meta = bundle.read_metadata(bundle_dir, MEMBER, names_full)
    meta_path = bundle_dir / "metadata.json"
    imu_in_bundle = bundle.field(meta, "feature_names_imu", list, meta_path)
    if list(imu_in_bundle) != names_imu:
        raise bundle.BundleError(
            f"{MEMBER} bundle {meta_path} does not match the code: "
            f"{_diff('feature_names_imu', list(imu_in_bundle), names_imu)}"
        )
    # Same names but other settings (tail fraction, mirroring, dt) would silently change every value.
    trained_with = bundle.field(meta, "feature_config", dict, meta_path)
    now = json.loads(json.dumps(dataclasses.asdict(cfg.features)))  # tuples read back as lists
    changed = sorted(k for k in set(trained_with) | set(now) if trained_with.get(k) != now.get(k))
    if changed:
        raise bundle.BundleError(
            f"{MEMBER} bundle {meta_path} was trained with other feature settings: "
            + ", ".join(f"{k}: bundle {trained_with.get(k)!r} vs now {now.get(k)!r}" for k in changed)
        )
    if meta.get("lightgbm_version") != lgb.__version__:
        # the text format reads across versions; a difference is worth knowing when numbers move
        log.warning(
            "%s bundle trained with lightgbm %s, running %s", MEMBER, meta.get("lightgbm_version"), lgb.__version__
        )
    params = {**bundle.field(meta, "params", dict, meta_path), "num_threads": threads.n_threads(cfg)}
    seed = bundle.field(meta, "seed", int, meta_path, default=42)
    entries = bundle.field(meta, "models", list, meta_path, items=dict)
    for i in range(len(entries)):  # every entry well-formed before any file is opened
        bundle.field(meta, ("models", i, "view"), str, meta_path)
        bundle.field(meta, ("models", i, "fold"), int, meta_path)
        bundle.field(meta, ("models", i, "file"), str, meta_path)
        bundle.field(meta, ("models", i, "present_classes"), list, meta_path, items=int)
    by_view: dict[str, list[LGBMSequenceClassifier]] = {"full": [], "imu": []}
    for view in VIEWS:
        expected = names_full if view == "full" else names_imu
        view_entries = sorted((e for e in entries if e["view"] == view), key=lambda e: e["fold"])
        for e in view_entries:
            # The one way to a model file: sealed in metadata.json, inside the bundle, digest checked just now
            # (LightGBM's parser aborts the interpreter on some truncated files).
            path = bundle.sealed_file(bundle_dir, meta, e["file"])
            try:
                booster = lgb.Booster(model_file=str(path))
            except lgb.basic.LightGBMError as err:
                raise bundle.BundleError(f"{path}: not a readable LightGBM model file: {err}") from None
            got = list(booster.feature_name())
            if got != expected:
                raise bundle.BundleError(
                    f"{path}: booster features differ from the code's {view} features: "
                    f"{_diff('booster feature_name()', got, expected)}"
                )
            try:
                model = LGBMSequenceClassifier.from_booster(booster, e["present_classes"], params, seed)
            except ValueError as err:
                raise bundle.BundleError(f"{path}: {err}") from None
            by_view[view].append(model)
    if not by_view["full"] or len(by_view["full"]) != len(by_view["imu"]):
        raise bundle.BundleError(
            f"{meta_path}: needs one full and one IMU model per fold, lists "
            f"{len(by_view['full'])} full and {len(by_view['imu'])} IMU models"
        )
    log.info("%s: loaded %d folds from %s", MEMBER, len(by_view["full"]), bundle_dir)
    return LGBMMember(by_view["full"], by_view["imu"], names_full, names_imu, cfg, meta)


__all__ = [
    "MEMBER",
    "LGBMSequenceClassifier",
    "LGBMMember",
    "LGBMPipeline",
    "is_available",
    "params_from_config",
    "load_member",
    "current_feature_names",
]
