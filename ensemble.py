"""Blending the members: weights fitted on OOF probabilities, and the serving ``Predictor``.

The ensemble sees members through the registry's small interface (``members.py``):
each member has a ``name``, ``is_available()`` and ``load(bundle_dir, cfg)``
returning an object with ``predict_proba(table) -> (n, 18)``. Its switch
(``USE_<MEMBER>``) and default weight (``ENSEMBLE_W_<MEMBER>``) come from its
config section. It knows nothing of LightGBM, torch or Keras.

``fit_ensemble`` returns the record that ``save_weights`` stores through ``blend.Blend`` (the one reader
and writer of weights.json); the ``Predictor`` serves one sequence through named stages in one
direction: admit -> correct wear -> featurize -> call members -> blend -> decide -> record.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import polars as pl

import ensemble_seal
import members as members_registry
import serving_guard
import subject_pp
import wear
from blend import BLEND, VIEWS, WEIGHTS_FILE, Blend, ServedBlend, Uncovered, apply_class_bias, mix
from config import Config
from cv import FoldsError, MemberOOF, read_member_oof, write_member_oof
from features import FRAME_FEATURES, FrameTable, build_frame_table, drop_tof_thm
from metric import GESTURES, N_CLASSES, score_indices, score_proba
from schema import DEMOGRAPHIC_FEATURES

if TYPE_CHECKING:  # the one protocol of a loaded member (member_base); no import at run time
    from member_base import LoadedMember

log = logging.getLogger(__name__)


class MemberSource(Protocol):
    """What the Predictor needs to reach one member (a registered ``MemberPipeline`` is one)."""

    name: str

    def is_available(self) -> tuple[bool, str]: ...

    def load(self, bundle_dir: Path, cfg: Config) -> LoadedMember: ...


@dataclass(frozen=True)
class MemberSpec:
    """A ``MemberSource`` made of plain callables (for members that are not pipelines, e.g. in tests)."""

    name: str
    load_member: Callable[[Path, Config], LoadedMember]
    is_available: Callable[[], tuple[bool, str]] = lambda: (True, "")

    def load(self, bundle_dir: Path, cfg: Config) -> LoadedMember:
        return self.load_member(bundle_dir, cfg)


# --------------------------------------------------------------------------- weight fitting


blend = mix  # the weighted mean of the members' probabilities (``blend.mix``), the name fitting code uses


def _score(y: np.ndarray, probas: list[np.ndarray], w: np.ndarray) -> float:
    return score_proba(y, blend(probas, w)) if w.sum() > 0 else -1.0


def fit_weights_coordinate(
    y: np.ndarray, probas: list[np.ndarray], n_starts: int = 8, seed: int = 0, grid: int = 21, max_rounds: int = 10
) -> tuple[np.ndarray, float]:
    """Coordinate ascent on the simplex for the competition metric, from several starts.

    The metric is a step function of the weights, so a gradient method has
    nothing to follow; a line search over a grid of each coordinate does.
    Starts: equal weights, each member alone, and random Dirichlet points.
    """
    m = len(probas)
    rng = np.random.default_rng(seed)
    starts = [np.full(m, 1.0 / m)] + [np.eye(m)[i] for i in range(m)]
    starts += [rng.dirichlet(np.ones(m)) for _ in range(max(0, n_starts - len(starts)))]
    best_w, best = starts[0], -1.0
    steps = np.linspace(0.0, 1.0, grid)
    for w in starts:
        w = w.copy()
        current = _score(y, probas, w)
        for _ in range(max_rounds):
            improved = False
            for i in range(m):
                for v in steps:
                    cand = w.copy()
                    cand[i] = v
                    if cand.sum() == 0:
                        continue
                    cand = cand / cand.sum()
                    s = _score(y, probas, cand)
                    if s > current + 1e-12:
                        w, current, improved = cand, s, True
            if not improved:
                break
        if current > best + 1e-12:
            best_w, best = w, current
    return best_w / best_w.sum(), best


def fit_weights_random(
    y: np.ndarray, probas: list[np.ndarray], draws: int = 4096, seed: int = 0
) -> tuple[np.ndarray, float]:
    """The original notebook's method: the best of ``draws`` random Dirichlet weight vectors."""
    rng = np.random.default_rng(seed)
    best_w, best = np.full(len(probas), 1.0 / len(probas)), -1.0
    for w in rng.dirichlet(np.ones(len(probas)), size=draws):
        s = _score(y, probas, w)
        if s > best:
            best_w, best = w, s
    return best_w, best


def cross_fitted_blend(
    y: np.ndarray, probas: list[np.ndarray], fold_ids: np.ndarray, fit: Callable[..., tuple[np.ndarray, float]]
) -> np.ndarray:
    """Blended OOF probabilities where each fold's weights were fitted on the other folds."""
    blended = np.zeros_like(probas[0], dtype=np.float64)
    for k in np.unique(fold_ids):
        train, held = fold_ids != k, fold_ids == k
        w, _ = fit(y[train], [p[train] for p in probas])
        blended[held] = blend([p[held] for p in probas], w)
    return blended


def fit_class_bias(
    y: np.ndarray, proba: np.ndarray, grid: np.ndarray | None = None, max_rounds: int = 3
) -> tuple[np.ndarray, float]:
    """Per-class log-prior shifts maximising the metric of argmax(log p + bias), by coordinate ascent.

    The metric weighs the 8 targets and the collapsed non-target class equally,
    so the probability-optimal argmax is not metric-optimal; this corrects it.
    While class c's shift is searched the other columns are fixed, so their best
    class is found once per c and each grid value only compares against it (the
    same argmax, ties to the lower index included).
    """
    grid = np.linspace(-1.0, 1.0, 21) if grid is None else grid
    logp = np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-12, None))
    bias = np.zeros(logp.shape[1])
    best = score_indices(y, logp.argmax(1))
    for _ in range(max_rounds):
        improved = False
        for c in range(logp.shape[1]):
            others = logp + bias
            others[:, c] = -np.inf
            top, top_at = others.max(1), others.argmax(1)
            for v in grid:
                col = logp[:, c] + v
                wins = (col > top) | ((col == top) & (c < top_at))
                s = score_indices(y, np.where(wins, c, top_at))
                if s > best + 1e-12:
                    bias = bias.copy()
                    bias[c] = v
                    best, improved = s, True
        if not improved:
            break
    return bias, best


def equal_weights(y: np.ndarray, probas: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """The "fit" of a fixed blend (one member alone, or equal weights): nothing learned from the labels."""
    return np.full(len(probas), 1.0 / len(probas)), float("nan")


class _FoldFits:
    """The cross-fitted pieces of one candidate of a view, each keyed by the folds it must not see.

    A candidate is the blend ``fit`` makes of ``probas`` (one member alone, with ``equal_weights``). For a set
    ``out`` of folds: ``weights(out)`` are fitted on the rows of the other folds; ``held(j, out)`` is fold j's
    rows blended with ``weights(out | {j})``; ``cross(out)`` holds ``held(j, out)`` for every fold j not in
    ``out``; ``bias(out)`` is the class bias fitted on ``cross(out)``; ``calibrated(out)`` is ``cross(out)``
    with fold j shifted by ``bias(out | {j})``. So nothing computed for ``out`` reads a label of a fold in it.
    Each fit is made once per instance (one ``fit_ensemble`` call): the nested decisions share most of them.
    """

    def __init__(
        self,
        y: np.ndarray,
        probas: list[np.ndarray],
        fold_ids: np.ndarray,
        fit: Callable[..., tuple[np.ndarray, float]],
    ) -> None:
        self.y, self.probas, self.fold_ids, self.fit = y, probas, fold_ids, fit
        self.folds = frozenset(int(k) for k in np.unique(fold_ids))
        self._weights: dict[frozenset[int], np.ndarray] = {}
        self._bias: dict[frozenset[int], np.ndarray] = {}

    def rows(self, out: frozenset[int]) -> np.ndarray:
        return ~np.isin(self.fold_ids, sorted(out))

    def inside(self, out: frozenset[int]) -> list[int]:
        return sorted(self.folds - out)

    def weights(self, out: frozenset[int]) -> np.ndarray:
        if out not in self._weights:
            rows = self.rows(out)
            if not rows.any():  # callers count folds first; this guards the invariant
                raise FoldsError(f"no OOF rows left to fit blend weights on once folds {sorted(out)} are held out")
            self._weights[out] = self.fit(self.y[rows], [p[rows] for p in self.probas])[0]
        return self._weights[out]

    def held(self, j: int, out: frozenset[int]) -> np.ndarray:
        rows = self.fold_ids == j
        return blend([p[rows] for p in self.probas], self.weights(out | {j}))

    def cross(self, out: frozenset[int]) -> np.ndarray:
        p = np.zeros(self.probas[0].shape, dtype=np.float64)
        for j in self.inside(out):
            p[self.fold_ids == j] = self.held(j, out)
        return p

    def bias(self, out: frozenset[int]) -> np.ndarray:
        if out not in self._bias:
            rows = self.rows(out)
            self._bias[out] = fit_class_bias(self.y[rows], self.cross(out)[rows])[0]
        return self._bias[out]

    def calibrated(self, out: frozenset[int]) -> np.ndarray:
        p = np.zeros(self.probas[0].shape, dtype=np.float64)
        for j in self.inside(out):
            p[self.fold_ids == j] = apply_class_bias(self.held(j, out), self.bias(out | {j}))
        return p


def _decide(y: np.ndarray, cands: dict[str, _FoldFits], out: frozenset[int], min_gain: float) -> dict[str, Any]:
    """Blend or best member, class bias or not, decided on the rows of the folds not in ``out`` only.

    ``cands``: the members alone (by name) and, with two or more members, ``BLEND``. The blend is chosen
    when its cross-fitted score (within those folds) beats the best member there; the class bias when its
    nested cross-fitted score beats the chosen candidate's by more than ``min_gain``. Too few folds to
    cross-fit a comparison (2 for the blend, 3 for the bias) keep the side that needs no evidence: the
    best member, no bias (``None`` scores). ``out`` empty: the decision shipped for serving.
    """
    any_fits = next(iter(cands.values()))
    rows, inside = any_fits.rows(out), any_fits.inside(out)
    yy = y[rows]
    names = [m for m in cands if m != BLEND]
    singles = {m: score_proba(yy, cands[m].probas[0][rows]) for m in names}
    best = max(names, key=lambda m: singles[m]) if names else None
    blend_score = None
    if BLEND in cands and len(inside) >= 2:
        blend_score = score_proba(yy, cands[BLEND].cross(out)[rows])
    beats = best is None or (blend_score is not None and blend_score > singles[best])
    shipped = BLEND if BLEND in cands and beats else best
    without = with_bias = None
    if len(inside) >= 3:
        chosen = cands[shipped]
        without = score_proba(yy, chosen.cross(out)[rows])
        with_bias = score_proba(yy, chosen.calibrated(out)[rows])
    return {
        "shipped": shipped,
        "best_member": best,
        "member_scores": singles,
        "blend_cross_fitted": blend_score,
        "bias_used": bool(with_bias is not None and with_bias > without + min_gain),
        "bias_without": without,
        "bias_with": with_bias,
    }


def _served_oof(
    y: np.ndarray, cands: dict[str, _FoldFits], min_gain: float
) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """The honest served OOF: fold k's rows from fold k's own decision, taken on the other folds.

    Fold k gets the candidate ``_decide`` picks without fold k, blended with weights fitted without fold k,
    shifted by a bias fitted without fold k when that decision uses one. Returns the rows and, per fold
    (as a string key, for JSON), the decision and the score of its served rows.
    """
    any_fits = next(iter(cands.values()))
    served = np.zeros(any_fits.probas[0].shape, dtype=np.float64)
    per_fold: dict[str, dict[str, Any]] = {}
    for k in sorted(any_fits.folds):
        out = frozenset({k})
        d = _decide(y, cands, out, min_gain)
        chosen, rows = cands[d["shipped"]], any_fits.fold_ids == k
        p = chosen.held(k, frozenset())
        served[rows] = apply_class_bias(p, chosen.bias(out)) if d["bias_used"] else p
        per_fold[str(k)] = {**d, "score": score_proba(y[rows], served[rows]), "n_rows": int(rows.sum())}
    return served, per_fold


def _calibration_record(
    decision: dict[str, Any], y: np.ndarray, probas: list[np.ndarray], weights: np.ndarray, min_gain: float
) -> dict[str, Any]:
    """The class-bias part of a view's weights.json record: the bias serving uses (decided on every fold)."""
    bias, fitted = fit_class_bias(y, blend(probas, weights))  # fitted on the blend that is served
    return {
        "class_bias": bias.tolist() if decision["bias_used"] else None,
        "used": decision["bias_used"],
        "cross_fitted_without": decision["bias_without"],
        "cross_fitted_with": decision["bias_with"],
        "in_sample_with": fitted,
        "min_gain": min_gain,
    }


def _fold_counts(per_fold: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {
        "n_folds": len(per_fold),
        "folds_blend": sum(d["shipped"] == BLEND for d in per_fold.values()),
        "folds_bias": sum(bool(d["bias_used"]) for d in per_fold.values()),
    }


def calibration_for_view(
    y: np.ndarray,
    probas: list[np.ndarray],
    fold_ids: np.ndarray,
    min_gain: float,
    fit: Callable[..., tuple[np.ndarray, float]] = equal_weights,
) -> tuple[dict[str, Any], np.ndarray]:
    """Judge a class bias on top of the blend ``fit`` makes of ``probas``, nested: nothing sees the scored fold.

    The bias is judged on a cross-fitted blend: fitted on the other folds' cross-fitted blend (whose weights
    never saw the held-out fold either) and scored on the held-out fold. Returns the record for weights.json
    (the decision on every fold: what serving uses; ``per_fold`` holds each fold's own decision) and the
    honest OOF: fold k with its bias exactly when the decision taken without fold k uses one.
    """
    cands = {BLEND: _FoldFits(y, probas, fold_ids, fit)}
    decision = _decide(y, cands, frozenset(), min_gain)
    honest, per_fold = _served_oof(y, cands, min_gain)
    record = _calibration_record(decision, y, probas, fit(y, probas)[0], min_gain)
    record["per_fold_used"] = {k: d["bias_used"] for k, d in per_fold.items()}
    return record, honest


def fit_ensemble(
    oof_dir: str | Path, members: list[str], cfg: Config, blend_oof_dir: str | Path | None = None
) -> dict[str, Any]:
    """Fit blend weights per view on the members' OOF files; returns the content of weights.json.

    What is shipped for serving is decided on every OOF row (that is training): the blend when its
    cross-fitted score beats the best member's OOF, else that member alone; the class bias when its
    nested cross-fitted gain exceeds ``ENSEMBLE_CALIBRATION_MIN_GAIN``. What is *scored* is decided per
    fold: fold k's served OOF rows come from the same two decisions taken on the other folds only, with
    weights and bias fitted there (``per_fold`` in each view's record), so no fold's served rows depend on
    its labels. ``score`` / ``test_like_score`` score those rows; ``blend_oof_dir`` receives them (as a
    member named ``blend``), the input of the subject post-processing replay and the ablations.
    """
    oofs: list[MemberOOF] = [read_member_oof(oof_dir, m) for m in members]
    if not oofs:
        raise FoldsError(f"no member OOF files in {oof_dir}")
    base = oofs[0]
    for o in oofs[1:]:
        if not np.array_equal(o.sequence_ids, base.sequence_ids):
            raise FoldsError(f"{o.member} OOF rows are in another sequence order than {base.member}'s")
        if o.summary["folds_hash"] != base.summary["folds_hash"]:
            raise FoldsError(f"{o.member} was trained on other folds than {base.member}")
    y, folds = base.y_true, base.fold_ids
    if len(np.unique(folds)) < 2:
        raise FoldsError(f"{oof_dir} holds {len(np.unique(folds))} fold: the blend needs OOF rows of at least 2 folds")
    seed, starts = cfg.run.seed, cfg.ensemble.n_starts
    min_gain = cfg.ensemble.calibration_min_gain
    out: dict[str, Any] = {"members": members, "folds_hash": base.summary["folds_hash"], "views": {}}
    honest: dict[str, np.ndarray] = {}

    def fit(yy: np.ndarray, pp: list[np.ndarray]) -> tuple[np.ndarray, float]:
        return fit_weights_coordinate(yy, pp, n_starts=starts, seed=seed)

    for view in VIEWS:
        probas = [o.proba_full if view == "full" else o.proba_imu for o in oofs]
        singles = {o.member: score_proba(y, p) for o, p in zip(oofs, probas)}
        t0 = time.perf_counter()
        w, s = fit(y, probas)
        t_coord = time.perf_counter() - t0
        t0 = time.perf_counter()
        w_rand, s_rand = fit_weights_random(y, probas, draws=cfg.ensemble.random_search_draws, seed=seed)
        t_rand = time.perf_counter() - t0
        cands = {m: _FoldFits(y, [p], folds, equal_weights) for m, p in zip(members, probas)}
        if len(members) > 1:
            cands[BLEND] = _FoldFits(y, probas, folds, fit)
        t0 = time.perf_counter()
        decision = _decide(y, cands, frozenset(), min_gain)  # what serving ships: every training fold
        honest[view], per_fold = _served_oof(y, cands, min_gain)  # what is scored: each fold decided without it
        t_decide = time.perf_counter() - t0
        shipped, best = decision["shipped"], decision["best_member"]
        if shipped == BLEND:
            weights = {m: float(x) for m, x in zip(members, w)}
            calibration = _calibration_record(decision, y, probas, w, min_gain)
        else:  # the fitted weights lose to one member on folds they never saw: serve that member
            weights = {m: float(m == shipped) for m in members}
            calibration = _calibration_record(decision, y, [probas[members.index(shipped)]], np.ones(1), min_gain)
        cross = decision["blend_cross_fitted"] if BLEND in cands else singles[best]
        counts = _fold_counts(per_fold)
        out["views"][view] = {
            "score": score_proba(y, honest[view]),  # the honest headline: each fold's rows decided without it
            "shipped": shipped,
            "weights": weights,  # what serving uses
            "calibration": calibration,
            "per_fold": per_fold,  # fold -> the decision taken on the other folds, and its rows' score
            **counts,
            "fitted_weights": {m: float(x) for m, x in zip(members, w)},
            "blend_score_in_sample": s,  # weights fitted and scored on the same rows: optimistic
            "blend_score_cross_fitted": cross,
            "best_member": best,
            "member_scores": singles,
            "equal_weights_score": _score(y, probas, np.ones(len(probas))),
            "random_search": {
                "weights": {m: float(x) for m, x in zip(members, w_rand)},
                "score": s_rand,
                "draws": cfg.ensemble.random_search_draws,
                "seconds": t_rand,
            },
            "coordinate_seconds": t_coord,
            "decision_seconds": t_decide,
        }
        log.info(
            "blend %s: %s -> cross-fitted %.4f (in-sample %.4f; random search %.4f); members %s; shipped: %s",
            view,
            {m: round(float(x), 3) for m, x in zip(members, w)},
            cross,
            s,
            s_rand,
            {m: round(v, 4) for m, v in singles.items()},
            "the blend" if shipped == BLEND else f"{shipped} alone (the blend does not beat it cross-fitted)",
        )
        log.info(
            "class-bias calibration %s (nested): cross-fitted %s -> %s: %s",
            view,
            _fmt(calibration["cross_fitted_without"]),
            _fmt(calibration["cross_fitted_with"]),
            "used" if calibration["used"] else "not used",
        )
        log.info(
            "served OOF %s, each fold decided on the other folds: %.4f (blend in %d of %d folds, class bias in %d)",
            view,
            out["views"][view]["score"],
            counts["folds_blend"],
            counts["n_folds"],
            counts["folds_bias"],
        )
    out["class_prior"] = serving_guard.class_prior_from_labels(y)  # the serving fallback of last resort but one
    v = out["views"]
    out["test_like_score"] = 0.5 * (v["full"]["score"] + v["imu_only"]["score"])
    out["test_like_score_in_sample"] = 0.5 * (
        v["full"]["blend_score_in_sample"] + v["imu_only"]["blend_score_in_sample"]
    )
    if blend_oof_dir is not None:
        decisions = {
            view: {
                **_fold_counts(v[view]["per_fold"]),
                "per_fold": {
                    k: {"shipped": d["shipped"], "bias_used": d["bias_used"]} for k, d in v[view]["per_fold"].items()
                },
            }
            for view in VIEWS
        }
        write_member_oof(
            blend_oof_dir,
            BLEND,
            base.sequence_ids,
            y,
            folds,
            honest["full"],
            honest["imu_only"],
            base.summary["folds_hash"],
            extra={
                "members": members,
                "shipped": {view: v[view]["shipped"] for view in VIEWS},  # for serving (every fold)
                "decisions": decisions,  # what each fold's rows were assembled from
            },
        )
    return out


def _fmt(x: float | None) -> str:
    return "not judged (too few folds)" if x is None else f"{x:.4f}"


def save_weights(path: str | Path, weights: dict[str, Any]) -> Blend:
    """Store the record ``fit_ensemble`` returned as ``path`` (``<ensemble>/weights.json``) through ``Blend``,
    which checks it first (a weight that is not finite and >= 0 is refused before it reaches serving)."""
    path = Path(path)
    if path.name != WEIGHTS_FILE:
        raise ValueError(f"{path}: the blend is stored as {WEIGHTS_FILE} in the ensemble folder")
    fitted = Blend.from_dict(weights, path)
    fitted.write(path.parent)
    return fitted


# --------------------------------------------------------------------------- serving


class PredictorError(RuntimeError):
    pass


class ReloadingMember:
    """The low-memory mode of the original notebooks: nothing kept between calls, every fold reloaded per call."""

    classes_ = GESTURES

    def __init__(self, source: MemberSource, bundle_dir: Path, cfg: Config) -> None:
        self.source, self.bundle_dir, self.cfg = source, bundle_dir, cfg

    def predict_proba(self, table: FrameTable) -> np.ndarray:
        reload = getattr(self.source, "predict_proba_reload_per_call", None)
        if reload is not None:
            return reload(self.bundle_dir, table, self.cfg)
        return self.source.load(self.bundle_dir, self.cfg).predict_proba(table)


@dataclass
class PredictorStats:
    calls: int = 0
    member_failures: Counter = field(default_factory=Counter)
    unknown_demographics: int = 0
    answers: Counter = field(default_factory=Counter)  # which step of the fallback chain answered
    n_degraded: int = 0  # answers from a fallback step or on repaired input
    degraded: dict[str, dict[str, Any]] = field(default_factory=dict)  # sequence_id -> {"answer", "problems"}
    sequences_cut: int = 0  # longer than ENSEMBLE_SERVE_MAX_ROWS: cut to their tail (serving)


# How many degraded sequences are listed by id (all are counted): the hidden test has ~3,257.
MAX_LISTED_DEGRADED = 5000


@dataclass
class Admitted:
    """One sequence past the admit stage: the rows the members are asked about, and whose they are.

    ``rows`` None: nothing a member can use (a frame of another type, zero rows, no usable accelerometer
    row): the class prior answers. ``problems``: what was repaired or went wrong, in order (serving; the
    sequence is listed as degraded when there are any). ``usable_imu``: serving's mask of the rows with a
    usable accelerometer reading, for the IMU-only fallback (None under STRICT=1, which has no fallback).
    """

    sequence_id: str
    rows: pl.DataFrame | None
    demographics: pl.DataFrame | None = None
    subject: str = ""  # "" when neither the rows nor the demographics say (serving_guard.subject_of)
    problems: list[str] = field(default_factory=list)
    usable_imu: np.ndarray | None = None


@dataclass(frozen=True)
class Attempt:
    """One try of the members on an admitted sequence: the rows and demographics they get."""

    source: str  # the step counted in summary()["answers"] when it answers: "members" or "imu_only"
    label: str  # how its failure is listed among the sequence's problems
    rows: pl.DataFrame
    demographics: pl.DataFrame | None


class Predictor:
    """Loads every present member bundle and the blend once; ``predict`` answers one sequence.

    ``predict`` has the signature the competition gateway calls and is a bound
    method named ``predict`` (the server finds the endpoint by ``__name__``).

    A call runs the serving stages in one direction, each a method named for what it does:
    admit (``_admit`` / ``_admit_strict``: repair or check the frames, find the subject) -> correct wear
    (``wear.correct``) -> featurize once (``_featurize``; the wear evidence of this sequence is added
    after) -> call members (``_call_members``) -> blend (``_blend``, the ``ServedBlend`` of weights.json)
    -> decide (``_decide``: the subject's slot assignment) -> record (``_record``). Serving tries the
    members again on the IMU-only view of the usable rows when they fail (``_attempts``), and the class
    prior answers when nothing can; STRICT=1 raises instead.

    Start-up treats a damaged part like a missing one in serving (``cfg.run.strict`` off): a member whose
    bundle raises while loading or in its warm-up call is left out (``missing`` and ``damaged``), and so
    is an optional step whose file raises (blend weights -> the ``ENSEMBLE_W_*`` defaults, class prior ->
    the next source, subject post-processing and wear detection -> off; ``steps_left_out``), each logged
    and listed in ``summary()["start_up"]`` (serve.json). With STRICT=1 each of these raises. Nothing to
    serve (no member loaded) raises in both modes, and so does a missing or damaged member with
    ``FAIL_IF_<M>_MISSING=1``.

    Bounds: a sequence longer than ``ENSEMBLE_SERVE_MAX_ROWS`` is cut to its tail (serving; STRICT raises),
    per-subject state is kept for at most ``ENSEMBLE_SERVE_MAX_SUBJECTS`` subjects. Concurrency: one lock
    around each whole ``predict`` call (and ``summary``), so concurrent calls run one after another and
    cannot mix sequences or per-subject state; the gateway calls one at a time, where it costs nothing.
    """

    def __init__(
        self,
        cfg: Config,
        specs: Sequence[MemberSource] | None = None,
        bundle_root: str | Path | None = None,
        ensemble_dir: str | Path | None = None,
    ) -> None:
        t0 = time.perf_counter()
        self.cfg = cfg
        self._lock = threading.Lock()  # one predict() at a time: per-call and per-subject state are not shared
        self.bundle_root = Path(bundle_root) if bundle_root else cfg.run.resolved_bundle_dir()
        # weights.json, protocol.json, orientation_model.txt, wear.json and manifest.json: beside the bundles
        self.ensemble_dir = Path(ensemble_dir) if ensemble_dir else self.bundle_root.parent / "ensemble"
        self.members: dict[str, LoadedMember] = {}
        self.missing: dict[str, str] = {}
        self.damaged: dict[str, str] = {}  # serving: members whose bundle raised at start-up (also in missing)
        self.steps_left_out: dict[str, str] = {}  # serving: optional steps whose file raised at start-up
        sources: list[MemberSource] = []
        if specs is None:  # every registered member; one that cannot be imported counts as missing
            for name in members_registry.names():
                try:
                    sources.append(members_registry.get(name))
                except ImportError as e:
                    self.missing[name] = f"cannot be imported: {e}"
        else:
            sources = list(specs)
        for spec in sources:
            section = cfg.member(spec.name)
            if not section.use:
                self.missing[spec.name] = f"switched off (USE_{spec.name.upper()}=0)"
                continue
            ok, why = spec.is_available()
            bundle_dir = self._bundle_dir(spec.name)
            if not ok:
                self.missing[spec.name] = why
            elif not bundle_dir.exists():
                self.missing[spec.name] = f"no bundle at {bundle_dir}"
            else:
                try:
                    self.members[spec.name] = self._load_member(spec, bundle_dir, section.folds_in_memory)
                except Exception as e:  # noqa: BLE001  (strict: re-raised; serving: left out like a missing one)
                    why = self._start_up_failure(f"member {spec.name}", bundle_dir, e, "left out")
                    self.missing[spec.name] = self.damaged[spec.name] = why
        for name, why in self.missing.items():
            if cfg.member(name).fail_if_missing and cfg.member(name).use:
                raise PredictorError(
                    f"member {name} is required (FAIL_IF_{name.upper()}_MISSING=1) but not usable: {why}"
                )
            if name not in self.damaged:  # a damaged one was logged as an error already
                log.warning("member %s not used: %s", name, why)
        if not self.members:
            raise PredictorError(f"no member could be loaded from {self.bundle_root}: {self.missing}")
        defaults = Blend.defaults({s.name: cfg.member(s.name).weight for s in sources})
        fitted: Blend | None = None
        try:
            fitted = self._load_blend(defaults)
        except Exception as e:  # noqa: BLE001
            self.steps_left_out["weights"] = self._start_up_failure(
                "blend weights", self.ensemble_dir / WEIGHTS_FILE, e, "the ENSEMBLE_W_* default weights, no class bias"
            )
        self.blend: ServedBlend = (fitted or defaults).served_by(list(self.members))
        prior_problems: list[str] | None = None if cfg.run.strict else []
        self.prior = serving_guard.load_class_prior(  # not from a weights.json left out as damaged
            fitted, self.bundle_root.parent / "oof", prior_problems
        )
        if prior_problems:
            self.steps_left_out["class_prior"] = f"{'; '.join(prior_problems)} -> {self.prior.source}"
        self.stats = PredictorStats()
        # Per-subject online state lives on this instance: upside-down wear detection and slot assignment.
        try:
            detector = wear.WearDetector.load(self.ensemble_dir, cfg)
        except Exception as e:  # noqa: BLE001
            self.steps_left_out["wear"] = self._start_up_failure(
                "wear detection", self.ensemble_dir / wear.WEAR_FILE, e, "off (no upside-down wear detection)"
            )
            detector = wear.WearDetector(None)
        self.wear = detector.with_bounds(cfg)
        try:
            self.subject_pp = subject_pp.SubjectPostProcessor.load(self.ensemble_dir, cfg)
        except Exception as e:  # noqa: BLE001
            self.steps_left_out["subject_pp"] = self._start_up_failure(
                "subject post-processing", self.ensemble_dir / subject_pp.PROTOCOL_FILE, e, "off (plain argmax)"
            )
            self.subject_pp = subject_pp.SubjectPostProcessor(None, None, cfg)
        self._pool = self._member_pool(cfg.ensemble.predict_threads)
        self.load_seconds = time.perf_counter() - t0
        log.info(
            "Predictor ready in %.2f s: members %s, weights %s", self.load_seconds, list(self.members), self.weights
        )
        if self.damaged or self.steps_left_out:
            log.error(
                "Predictor serves without %d damaged member(s) %s and %d optional step(s) %s (see serve.json "
                "start_up; STRICT=1 makes each an error)",
                len(self.damaged),
                sorted(self.damaged),
                len(self.steps_left_out),
                sorted(self.steps_left_out),
            )
        unused = [m for m in self.members if all(self.weights[v].get(m, 0.0) <= 0 for v in VIEWS)]
        if unused:
            log.info("member(s) %s have weight 0 in both views: loaded and checked, never called", unused)

    @property
    def weights(self) -> dict[str, dict[str, float]]:
        """Per view, member -> the weight serving uses (over the loaded members, summing to 1)."""
        return {v: dict(w) for v, w in self.blend.weights.items()}

    @property
    def class_bias(self) -> dict[str, np.ndarray]:
        """The class bias of each view that uses one."""
        return dict(self.blend.class_bias)

    # ----------------------------------------------------------------------- start-up

    def _bundle_dir(self, name: str) -> Path:
        section = self.cfg.member(name)
        return Path(section.bundle_path) if section.bundle_path else self.bundle_root / name

    def _load_member(self, spec: MemberSource, bundle_dir: Path, folds_in_memory: bool) -> LoadedMember:
        """One member loaded and warmed up: a corrupt bundle, or a member that cannot predict, raises here."""
        member = spec.load(bundle_dir, self.cfg)
        if not folds_in_memory:
            log.warning(
                "member %s: LOAD_%s_FOLDS_IN_MEMORY=0: every predict() call reloads each fold "
                "from %s (low memory, much slower per call; see the benchmarks)",
                spec.name,
                spec.name.upper(),
                bundle_dir,
            )
            member = ReloadingMember(spec, bundle_dir, self.cfg)
        self._warm_up(member)
        return member

    def _start_up_failure(self, what: str, path: Path, error: Exception, instead: str) -> str:
        """A member or optional step whose file raised at start-up: re-raised under STRICT=1 (with a note naming
        it), else logged; returns the reason listed in ``summary()["start_up"]``."""
        why = f"{path} could not be loaded: {type(error).__name__}: {error}"
        if self.cfg.run.strict:
            error.add_note(f"Predictor start-up (STRICT=1): {what} from {path}")
            raise error
        log.error("%s: %s; serving goes on: %s (STRICT=1 makes this an error)", what, why, instead)
        return f"{why} -> {instead}"

    def _load_blend(self, defaults: Blend) -> Blend | None:
        """The fitted blend of ``ensemble_dir``, None when there is none (``defaults`` serve then).

        The ensemble set is checked first (``ensemble_seal``): the loaded bundles must be those the set was
        fitted with, and weights.json is parsed only from bytes whose digest matched the manifest
        (``Blend.load_sealed``). Every failure is a ``bundle.BundleError`` naming the file (a weight that is
        not finite and >= 0 names the view and member).
        """
        path = self.ensemble_dir / WEIGHTS_FILE
        ensemble_seal.check_bundles(self.ensemble_dir, {name: self._bundle_dir(name) for name in self.members})
        fitted = Blend.load_sealed(self.ensemble_dir)
        if fitted is None:
            log.info("no fitted %s: default weights ENSEMBLE_W_* %s", path, dict(defaults.views["full"].weights))
        else:
            biased = sorted(v for v, view in fitted.views.items() if view.class_bias is not None)
            log.info("blend weights from %s (class-bias calibration: %s)", path, biased or "none")
        return fitted

    def _member_pool(self, threads: int) -> ThreadPoolExecutor | None:
        """Threads that call the members of one request concurrently; None: one after another."""
        if threads < 0:
            raise PredictorError(f"ENSEMBLE_PREDICT_THREADS={threads}: must be 0 (automatic), 1 or more")
        n = min(len(self.members), os.cpu_count() or 1) if threads == 0 else min(threads, len(self.members))
        return ThreadPoolExecutor(max_workers=n, thread_name_prefix="member") if n > 1 else None

    @staticmethod
    def _warm_up(member: LoadedMember) -> None:
        """One full-sensor and one IMU-only call before serving: graph building and compilation
        (Keras XLA, lazy allocations) happen at start-up, not inside the first timed predict()."""
        n_ch = len(FRAME_FEATURES)
        for has_tof in (True, False):
            table = FrameTable(
                sequence_ids=np.array(["WARMUP"]),
                offsets=np.array([0, 40]),
                values=np.zeros((40, n_ch), np.float32),
                has_tof_thm=np.array([has_tof]),
                rot_missing=np.array([False]),
                subjects=np.array([""]),
                demographics=np.full((1, len(DEMOGRAPHIC_FEATURES)), np.nan, np.float32),
            )
            member.predict_proba(table)  # a member that cannot predict fails here, at start-up

    # ----------------------------------------------------------------------- one call, stage by stage

    def predict(self, sequence: pl.DataFrame, demographics: pl.DataFrame) -> str:
        """The gateway's entry point: one sequence's rows and its subject's demographics row -> a gesture.

        Serving (``cfg.run.strict`` off) never raises: hostile input is repaired, and an input no
        member can use is answered by the fallback chain of ``serving_guard`` (logged, counted in
        ``summary()``). With STRICT=1 every such problem raises an error naming it.

        One call at a time (a lock around the whole call): concurrent callers wait, so no call sees
        another's rows or a half-updated subject. A sequence longer than ``ENSEMBLE_SERVE_MAX_ROWS`` is
        cut to its tail first (listed as degraded); with STRICT=1 it raises.
        """
        with self._lock:
            if self.cfg.run.strict:
                return self._serve(self._admit_strict(sequence, demographics))
            try:
                return self._serve(self._admit(sequence, demographics))
            except Exception as e:  # the last line of defence: a bug here must not cost the submission
                log.exception("predict: unexpected %s; answering from the class prior", type(e).__name__)
                problem = f"unexpected {type(e).__name__}: {e}"
                return self._record(Admitted(serving_guard.UNKNOWN_SEQUENCE_ID, None, problems=[problem]), None, None)

    def _serve(self, admitted: Admitted) -> str:
        """Every stage after admit, in order, for each attempt until one answers; then the answer is recorded.

        Under STRICT=1 a failing stage raises; in serving its error is listed and the next attempt runs
        (the prior answers when none is left).
        """
        self.stats.calls += 1
        if admitted.rows is None:
            return self._record(admitted, None, None)
        subject = admitted.subject
        for attempt in self._attempts(admitted):
            try:
                rows, corrected = self.wear.correct(subject, attempt.rows)  # 2. correct wear: the verdict so far
                table = self._featurize(rows, attempt.demographics)  # 3. featurize, once
                if self.wear.observe(subject, table, corrected=corrected) and not corrected:
                    # this sequence's evidence tipped its subject over the threshold (once per subject): it is
                    # answered from its corrected rows, featurized for that
                    table = build_frame_table(wear.rotate_rows(attempt.rows), attempt.demographics, self.cfg.features)
                proba = self.predict_proba_table(table)  # 4. call members, 5. blend
                gesture = self._decide(subject, table, proba[0])  # 6. decide: the subject's slot assignment
            except Exception as e:  # noqa: BLE001  (strict: re-raised; serving: listed, the next attempt runs)
                if self.cfg.run.strict:
                    raise
                admitted.problems.append(f"{attempt.label}: {type(e).__name__}: {e}")
                continue
            return self._record(admitted, attempt.source, gesture)  # 7. record
        return self._record(admitted, None, None)

    def _admit_strict(self, sequence: Any, demographics: Any) -> Admitted:
        """Stage 1 under STRICT=1: the frames checked, never repaired; each problem a ``PredictorError``."""
        try:
            sequence = serving_guard.to_polars(sequence, "sequence")
            demographics = serving_guard.to_polars(demographics, "demographics")
        except TypeError as e:
            raise PredictorError(str(e)) from None
        if sequence is None or sequence.height == 0:
            raise PredictorError("predict() got a sequence with zero rows")
        if sequence.height > self.cfg.ensemble.serve_max_rows:
            raise PredictorError(
                f"predict() got a sequence of {sequence.height} rows, more than ENSEMBLE_SERVE_MAX_ROWS="
                f"{self.cfg.ensemble.serve_max_rows} (serving would cut it to its tail)"
            )
        if "sequence_id" in sequence.columns and sequence["sequence_id"].null_count():
            raise PredictorError(f"{sequence['sequence_id'].null_count()} row(s) have no sequence_id")
        if "sequence_id" in sequence.columns and sequence["sequence_id"].n_unique() > 1:
            raise PredictorError(f"predict() got {sequence['sequence_id'].n_unique()} sequences; it answers one")
        if "sequence_id" not in sequence.columns:
            sequence = sequence.with_columns(pl.lit(serving_guard.UNKNOWN_SEQUENCE_ID).alias("sequence_id"))
        subject = serving_guard.subject_of(sequence, demographics)
        return Admitted(str(sequence["sequence_id"][0]), sequence, demographics, subject)

    def _admit(self, sequence: Any, demographics: Any) -> Admitted:
        """Stage 1 in serving (never raises): the frames repaired (``serving_guard``), each repair listed.

        A sequence longer than ``ENSEMBLE_SERVE_MAX_ROWS`` is cut to its tail first (counted in
        ``summary()["bounds"]``), so every later step has a bounded cost.
        """
        problems: list[str] = []
        try:
            seq = serving_guard.to_polars(sequence, "sequence")
        except TypeError as e:
            return Admitted(serving_guard.UNKNOWN_SEQUENCE_ID, None, problems=[str(e)])
        try:
            demo = serving_guard.to_polars(demographics, "demographics")
        except TypeError as e:
            demo, problems = None, [f"{e}: predicted without demographics"]
        if seq is None or seq.height == 0:
            return Admitted(serving_guard.UNKNOWN_SEQUENCE_ID, None, problems=problems + ["zero rows"])
        seq, cut = serving_guard.cut_to_tail(seq, self.cfg.ensemble.serve_max_rows)  # bounded cost from here on
        if cut:
            self.stats.sequences_cut += 1
            problems += cut
        seq, repairs = serving_guard.repair_sequence(seq)
        problems += repairs
        sid = str(seq["sequence_id"][0])
        subject = serving_guard.subject_of(seq, demo)  # the same rule as under STRICT=1
        demo, demo_problems = serving_guard.repair_demographics(demo, subject or None)
        problems += demo_problems
        usable = serving_guard.usable_imu_rows(seq)
        if not usable.any():
            problems.append(f"no usable accelerometer row in {seq.height}")
            return Admitted(sid, None, demo, subject, problems)
        return Admitted(sid, seq, demo, subject, problems, usable)

    def _attempts(self, admitted: Admitted) -> Iterator[Attempt]:
        """What the members are asked, in order: the admitted rows; in serving, should that fail, the
        IMU-only view of the rows with a usable accelerometer, with and then without demographics."""
        rows, demo = admitted.rows, admitted.demographics
        if rows is None:  # nothing to ask (``_serve`` answers such a sequence from the prior)
            return
        yield Attempt("members", "members", rows, demo)
        if self.cfg.run.strict or admitted.usable_imu is None:
            return
        imu_rows = drop_tof_thm(rows.filter(pl.Series(admitted.usable_imu)))
        if demo is not None:
            yield Attempt("imu_only", "imu_only", imu_rows, demo)
        yield Attempt("imu_only", "imu_only without demographics", imu_rows, None)

    def _featurize(self, rows: pl.DataFrame, demographics: pl.DataFrame | None) -> FrameTable:
        """Stage 3: the frame table of one sequence's rows (counts the calls whose demographics are unknown)."""
        table = build_frame_table(rows, demographics, self.cfg.features)
        if np.isnan(table.demographics).all():
            self.stats.unknown_demographics += 1
            if self.stats.unknown_demographics == 1:
                log.warning(
                    "sequence %s: no usable demographics row; predicting without demographics "
                    "(further cases are only counted)",
                    table.sequence_ids[0],
                )
        return table

    def predict_proba_table(self, table: FrameTable) -> np.ndarray:
        """Stages 4 and 5: blended (n, 18) probabilities; IMU-only sequences use the IMU-only view's weights."""
        return self._blend(table, self._call_members(table))

    def _call_members(self, table: FrameTable) -> dict[str, np.ndarray]:
        """Stage 4: member -> (n, 18) probabilities, for the members with weight in the views of ``table``'s rows
        (a member with weight 0 there cannot change the answer: not called).

        A member that raises or returns probabilities of another shape or non-finite ones is left out of this
        call (counted in ``summary()["member_failures"]``, logged); STRICT=1 re-raises.
        """
        n = table.n_sequences
        row_weights = self.blend.row_weights(table.has_tof_thm)
        called = [m for j, m in enumerate(self.blend.members) if row_weights[:, j].any()]
        answers: dict[str, np.ndarray] = {}
        for name, p in self._run_members(table, called).items():
            try:
                if isinstance(p, BaseException):
                    raise p
                if p.shape != (n, N_CLASSES) or not np.isfinite(p).all():
                    raise PredictorError(f"returned probabilities of shape {p.shape} / non-finite values")
            except Exception as e:  # one member's failure must not cost the answer: excluded, counted, logged
                if self.cfg.run.strict:
                    raise
                self.stats.member_failures[name] += 1
                log.error(
                    "member %s failed on sequence(s) %s: %s: %s (excluded for this call)",
                    name,
                    list(table.sequence_ids[:3]),
                    type(e).__name__,
                    e,
                )
                continue
            answers[name] = p
        return answers

    def _run_members(self, table: FrameTable, names: list[str]) -> dict[str, np.ndarray | BaseException]:
        """Each named member's probabilities for ``table``, or the exception it raised (in the members' order)."""

        def call(name: str) -> np.ndarray:
            return np.asarray(self.members[name].predict_proba(table), dtype=np.float64)

        out: dict[str, np.ndarray | BaseException] = {}
        if self._pool is None or len(names) < 2:
            for name in names:
                try:
                    out[name] = call(name)
                except Exception as e:  # handled (strict: re-raised) by the caller, one member at a time
                    out[name] = e
            return out
        futures = {name: self._pool.submit(call, name) for name in names}
        for name, future in futures.items():
            error = future.exception()
            out[name] = error if error is not None else future.result()
        return out

    def _blend(self, table: FrameTable, answers: dict[str, np.ndarray]) -> np.ndarray:
        """Stage 5: the members' answers blended with the shipped weights and class bias (``ServedBlend``)."""
        try:
            return self.blend.combine(table.has_tof_thm, answers)
        except Uncovered as e:
            raise PredictorError(f"every member failed on sequence(s) {list(table.sequence_ids[e.rows][:3])}") from None

    def _decide(self, subject: str, table: FrameTable, proba: np.ndarray) -> str:
        """Stage 6: the gesture of the slot the subject's assignment gives this sequence (adds it to the
        subject's state); the argmax without a subject or a protocol."""
        return GESTURES[self.subject_pp.answer(subject, table, proba)]

    def _record(self, admitted: Admitted, source: str | None, gesture: str | None) -> str:
        """Stage 7: count which step answered; list and log the sequence when its answer is degraded.

        ``gesture`` None: no attempt answered, the class prior read at start-up does (uniform when none was
        stored). Returns the gesture.
        """
        if gesture is None or source is None:
            source = "uniform_prior" if self.prior.is_uniform else "class_prior"
            gesture = self.prior.answer
        self.stats.answers[source] += 1
        sid, problems = admitted.sequence_id, admitted.problems
        if problems or source != "members":
            self.stats.n_degraded += 1
            if sid in self.stats.degraded or len(self.stats.degraded) < MAX_LISTED_DEGRADED:
                self.stats.degraded[sid] = {"answer": source, "gesture": gesture, "problems": problems[:8]}
            log.warning("sequence %s: degraded answer %r from %s: %s", sid, gesture, source, "; ".join(problems)[:600])
        return gesture

    def degraded_sequences(self) -> dict[str, dict[str, Any]]:
        """sequence_id -> how its answer was degraded (the step that answered, the problems found)."""
        with self._lock:
            return {k: dict(v) for k, v in self.stats.degraded.items()}

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return self._summary()

    def _summary(self) -> dict[str, Any]:
        e = self.cfg.ensemble
        return {
            "members": list(self.members),
            "missing": self.missing,
            # start-up in serving: damaged members left out and optional steps left out, with the reason of each
            "start_up": {
                "members_damaged": dict(self.damaged),
                "steps_left_out": dict(self.steps_left_out),
                "count": len(self.damaged) + len(self.steps_left_out),
            },
            "bounds": {
                "max_rows": e.serve_max_rows,
                "sequences_cut": self.stats.sequences_cut,
                "max_subjects": e.serve_max_subjects,
                "subjects_evicted": {
                    "wear": self.wear.n_evicted,
                    "subject_pp": self.subject_pp.assigner.n_evicted if self.subject_pp.assigner else 0,
                },
                "concurrency": "one lock around each predict() call",
            },
            "weights": self.weights,
            "load_seconds": self.load_seconds,
            "calls": self.stats.calls,
            "member_failures": dict(self.stats.member_failures),
            "unknown_demographics": self.stats.unknown_demographics,
            "subject_pp": self.subject_pp.summary(),
            "wear": self.wear.summary(),
            "answers": dict(self.stats.answers),
            "degraded": {
                "count": self.stats.n_degraded,
                "fallback_prior": self.prior.source,
                "sequences": {k: dict(v) for k, v in self.stats.degraded.items()},
            },
        }
