"""Upside-down wear: detecting subjects who wear the device turned 180 degrees about its z axis, and undoing it.

Such a wearer's rows differ from a normal wearer's by a fixed transform of the raw
signal: acc_x and acc_y change sign, the quaternion gains a half turn about device z,
thermopiles and ToF sensors 2<->4 and 3<->5 trade places, and every ToF grid is
turned 180 degrees. The transform is its own inverse, so ``rotate_rows`` both makes a
rotated copy and corrects a rotated wearer.

The detector scores each sequence with a logistic model on features that change sign
under the transform (acc_x/acc_y means, thermopile and ToF differences 2-4 and 3-5),
trained on training subjects and on their synthetically rotated copies (the copy's
features are the negated features, so no second feature pass is needed). A subject's
evidence is the sum of its sequences' log-odds; past a threshold chosen on held-out
training subjects, the subject is taken as rotated and its rows are corrected before
features. Imports only config, schema, features and io_utils.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy.spatial.transform import Rotation

import ensemble_seal
import serving_guard
from config import Config, EnsembleConfig
from features import FrameTable, clean_sensors, feature_index
from io_utils import read_json, write_json
from schema import ACC_COLS, N_TOF_SENSORS, ROT_COLS, THM_COLS, TOF_COLS, TOF_PIXELS

log = logging.getLogger(__name__)

WEAR_FILE = "wear.json"
FORMAT_VERSION = 1
# Sensor k (1-based) of a rotated wearer sits where sensor SWAP[k] of a normal wearer does.
_SENSOR_PERM = [0, 3, 4, 1, 2]  # 0-based: 2<->4, 3<->5
DETECTOR_FEATURES: tuple[str, ...] = (
    "acc_x_mean",
    "acc_y_mean",
    "acc_x_tail",
    "acc_y_tail",
    "acc_xz_tail",
    "acc_yz_tail",
    "thm_2m4",
    "thm_3m5",
    "tof_2m4",
    "tof_3m5",
    "tofvalid_2m4",
    "tofvalid_3m5",
)
_N_GROUPS = 5  # subject groups for choosing the threshold on held-out subjects
_N_ORDERS = 50  # random arrival orders per held-out subject when choosing the threshold (cheap: cumsums)


class WearError(ValueError):
    """A wear file that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------- the physical transform


def rotate_rows(raw: pl.DataFrame) -> pl.DataFrame:
    """The rows as a device turned 180 degrees about its z axis would record them (an involution).

    Cleans first (``features.clean_sensors``: Float32 sensors, sorted), so String-typed
    gateway columns are fine; null readings stay null.
    """
    df = clean_sensors(raw)
    acc = df.select(ACC_COLS).to_numpy().astype(np.float64)
    acc[:, :2] *= -1
    quat = df.select(ROT_COLS).to_numpy().astype(np.float64)  # (w, x, y, z), NaN where missing
    ok = np.isfinite(quat).all(axis=1) & (np.linalg.norm(np.nan_to_num(quat), axis=1) > 1e-6)
    if ok.any():
        # scipy is scalar-last, the files scalar-first; the half turn is about the device's own z (right product)
        r = Rotation.from_quat(quat[ok][:, [1, 2, 3, 0]]) * Rotation.from_rotvec([0.0, 0.0, np.pi])
        q = r.as_quat()[:, [3, 0, 1, 2]]
        q[q[:, 0] < 0] *= -1  # stored with w >= 0, as in the files
        quat[ok] = q
    thm = df.select(THM_COLS).to_numpy()[:, _SENSOR_PERM]
    tof = df.select(TOF_COLS).to_numpy().reshape(-1, N_TOF_SENSORS, 8, 8)[:, _SENSOR_PERM, ::-1, ::-1]
    tof = tof.reshape(-1, N_TOF_SENSORS * TOF_PIXELS)
    cols = (
        dict(zip(ACC_COLS, acc.T))
        | dict(zip(ROT_COLS, quat.T))
        | dict(zip(THM_COLS, thm.T))
        | dict(zip(TOF_COLS, tof.T))
    )
    return df.with_columns(pl.Series(c, v, dtype=pl.Float32, nan_to_null=True) for c, v in cols.items())


def correct_subjects(raw: pl.DataFrame, subjects: list[str] | set[str]) -> pl.DataFrame:
    """``raw`` with the rows of the given subjects rotated back (the others untouched, order kept)."""
    subjects = sorted(set(subjects))
    if not subjects:
        return raw
    df = clean_sensors(raw).with_row_index("_row")
    hit = df["subject"].is_in(subjects)
    fixed = rotate_rows(df.filter(hit)).select(df.columns)
    return pl.concat([df.filter(~hit), fixed]).sort("_row").drop("_row")


# --------------------------------------------------------------------------- detector features


def detector_features(table: FrameTable, tail_fraction: float = 0.4) -> np.ndarray:
    """(n_seq, len(DETECTOR_FEATURES)) features that change sign when the device is worn rotated."""
    idx = feature_index(
        ["acc_x", "acc_y", "acc_z", "acc_mag"]
        + [f"thm{k}" for k in range(2, 6)]
        + [f"tof{k}_mean" for k in range(2, 6)]
        + [f"tof{k}_valid_ratio" for k in range(2, 6)]
    )
    v = table.values[:, idx].astype(np.float64)
    mag = np.maximum(v[:, 3:4], 1e-3)
    unit = v[:, :3] / mag  # gravity dominates: the direction of "up" in the device frame
    starts, lengths = table.offsets[:-1], table.lengths
    whole = np.add.reduceat(unit, starts, axis=0) / lengths[:, None]
    tail_len = np.maximum(1, np.ceil(lengths * tail_fraction).astype(np.int64))
    rows = np.concatenate([np.arange(e - t, e) for e, t in zip(table.offsets[1:], tail_len)]) if len(lengths) else []
    tail_off = np.concatenate([[0], np.cumsum(tail_len)[:-1]]).astype(np.int64)
    tail = np.add.reduceat(unit[rows], tail_off, axis=0) / tail_len[:, None]
    sens = np.add.reduceat(v[:, 4:], starts, axis=0) / lengths[:, None]
    thm, tof, valid = sens[:, 0:4], sens[:, 4:8], sens[:, 8:12]  # sensors 2..5
    has = table.has_tof_thm.astype(np.float64)[:, None]  # IMU-only sequences: no thm/tof evidence
    out = np.column_stack(
        [
            whole[:, 0],
            whole[:, 1],
            tail[:, 0],
            tail[:, 1],
            tail[:, 0] * tail[:, 2],
            tail[:, 1] * tail[:, 2],
            has[:, 0] * (thm[:, 0] - thm[:, 2]),
            has[:, 0] * (thm[:, 1] - thm[:, 3]),
            has[:, 0] * (tof[:, 0] - tof[:, 2]) / 100.0,
            has[:, 0] * (tof[:, 1] - tof[:, 3]) / 100.0,
            has[:, 0] * (valid[:, 0] - valid[:, 2]),
            has[:, 0] * (valid[:, 1] - valid[:, 3]),
        ]
    )
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


# --------------------------------------------------------------------------- detector model


@dataclass(frozen=True)
class Detector:
    """Per-sequence log-odds ``(x / scale) . coef`` of "worn rotated"; no intercept (odd in x)."""

    coef: np.ndarray
    scale: np.ndarray

    def log_odds(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) / self.scale) @ self.coef


def fit_detector(x_normal: np.ndarray, c: float = 1.0) -> Detector:
    """Logistic regression on normal rows (label 0) and their rotated copies (-x, label 1)."""
    from sklearn.linear_model import LogisticRegression

    scale = np.sqrt(np.mean(x_normal**2, axis=0))  # RMS, not std: centring would break the odd symmetry
    scale = np.where(scale < 1e-9, 1.0, scale)
    z = x_normal / scale
    X = np.concatenate([z, -z])
    y = np.concatenate([np.zeros(len(z)), np.ones(len(z))])
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=2000).fit(X, y)
    return Detector(coef=model.coef_[0].astype(np.float64), scale=scale.astype(np.float64))


def _subject_groups(subjects: np.ndarray) -> dict[str, int]:
    uniq = sorted(set(subjects.tolist()))
    return {s: i % _N_GROUPS for i, s in enumerate(uniq)}


def _prefix_sums(lo: np.ndarray, rng: np.random.Generator, n_orders: int) -> np.ndarray:
    """(n_orders, n) running sums of a subject's sequence log-odds in random arrival orders."""
    return np.stack([np.cumsum(lo[rng.permutation(len(lo))]) for _ in range(n_orders)])


def _held_out_log_odds(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per-sequence log-odds from detectors fitted on the other subject groups."""
    out = np.zeros(len(x))
    for k in np.unique(groups):
        if (groups != k).any():
            out[groups == k] = fit_detector(x[groups != k]).log_odds(x[groups == k])
    return out


def _threshold_and_held_out(
    x: np.ndarray, subj: np.ndarray, g: np.ndarray, rotated: list[str], cfg: Config, seed: int
) -> tuple[np.ndarray, float, np.random.Generator]:
    """Held-out log-odds of the corrected rows, the evidence threshold, and the generator to continue with.

    The threshold is the one serving applies: ``margin`` times the highest running sum a held-out normal
    subject reached in ``_N_ORDERS`` random orders, at least ``wear_min_log_odds``.
    """
    sign = np.where(np.isin(subj, rotated), -1.0, 1.0)[:, None]
    held = _held_out_log_odds(x * sign, g)  # corrected features: every subject now a normal wearer
    rng = np.random.default_rng(seed)
    normal_max = [float(_prefix_sums(held[subj == s], rng, _N_ORDERS).max()) for s in sorted(set(subj.tolist()))]
    w = cfg.ensemble
    threshold = max(float(w.wear_min_log_odds), float(w.wear_threshold_margin) * max(normal_max))
    return held, threshold, rng


def max_rotated_training_subjects(n_subjects: int, cfg: Config) -> int:
    """The most training subjects the correction may rotate: max(1, floor(ENSEMBLE_WEAR_MAX_TRAIN_SHARE x n))."""
    return max(1, int(np.floor(cfg.ensemble.wear_max_train_share * n_subjects + 1e-9)))


def fit_wear(table: FrameTable, cfg: Config, seed: int = 0) -> tuple[dict[str, Any], list[str]]:
    """Fit the detector on training subjects; returns (content of wear.json, rotated training subjects).

    1. fit on every subject taken as normal; the subject with the highest positive mean log-odds
       under the models of the other subject groups is taken as a rotated wearer; refit with its
       features negated (= corrected) and repeat until no subject's mean reaches half the normal subjects' typical
       magnitude on the positive side (one at a
       time, so one rotated wearer among few subjects cannot drag a normal one over). Only subjects with at
       least ``ENSEMBLE_WEAR_MIN_SEQUENCES`` sequences are candidates, as at serving;
    2. threshold on the running sum of log-odds, chosen on held-out subject groups so that no
       held-out normal subject crosses it in any of ``_N_ORDERS`` random orders (times a margin);
    3. serving's evidence rule, applied to the training subjects: a candidate stays rotated only when its
       summed held-out log-odds (rows as recorded) pass that threshold; failing ones are taken back and
       the threshold recomputed until no candidate fails;
    4. more candidates than ``max_rotated_training_subjects``: none is rotated (a warning; recorded);
    5. the final detector is fitted on the corrected features of every subject.
    """
    x = detector_features(table, cfg.features.tail_fraction)
    subj = np.asarray(table.subjects).astype(str)
    if len(set(subj.tolist()) - {""}) < 2:
        raise WearError("the wear detector needs at least 2 training subjects")
    w = cfg.ensemble
    names = sorted(set(subj.tolist()))
    n_seq = {s: int(n) for s, n in zip(*np.unique(subj, return_counts=True))}
    enough = {s for s in names if n_seq[s] >= w.wear_min_sequences}
    group = _subject_groups(subj)
    g = np.array([group[s] for s in subj])
    rotated: list[str] = []
    per_subject: dict[str, float] = {}
    for _ in range(len(group)):  # greedy: flag the clearest rotated wearer, refit with it corrected, repeat
        sign = np.where(np.isin(subj, rotated), -1.0, 1.0)[:, None]
        held_lo = _held_out_log_odds(x * sign, g) * sign[:, 0]  # log-odds of the rows as recorded
        per_subject = {s: float(held_lo[subj == s].mean()) for s in names}
        # a rotated wearer mirrors the normal ones: its mean must reach half their typical magnitude, not just 0
        typical = np.median([-m for s, m in per_subject.items() if s not in rotated and m < 0] or [0.0])
        candidates = {
            s: m for s, m in per_subject.items() if s in enough and s not in rotated and m > max(0.5 * typical, 0.0)
        }
        if not candidates or len(rotated) + 1 > len(group) // 2:  # upside down is the exception, never the rule
            break
        rotated.append(max(candidates, key=candidates.get))
    rotated = sorted(rotated)
    below_threshold: list[dict[str, Any]] = []
    while True:  # serving's evidence bar: summed log-odds of the rows as recorded above the threshold
        held, threshold, rng = _threshold_and_held_out(x, subj, g, rotated, cfg, seed)
        evidence = {s: float(-held[subj == s].sum()) for s in rotated}  # held is of the corrected rows
        weak = [s for s in rotated if evidence[s] <= threshold]
        if not weak:
            break
        below_threshold += [{"subject": s, "sequences": n_seq[s], "log_odds": evidence[s]} for s in weak]
        rotated = [s for s in rotated if s not in weak]
    cap = max_rotated_training_subjects(len(names), cfg)
    refused: list[dict[str, Any]] = []
    if len(rotated) > cap:
        refused = [{"subject": s, "sequences": n_seq[s], "log_odds": evidence[s]} for s in rotated]
        log.warning(
            "wear detector: %d of %d training subjects look rotated (%s), more than the %d that "
            "ENSEMBLE_WEAR_MAX_TRAIN_SHARE=%g allows; upside down is the exception, so none is rotated in "
            "training (raise ENSEMBLE_WEAR_MAX_TRAIN_SHARE if the data really hold that many)",
            len(rotated),
            len(names),
            ", ".join(rotated),
            cap,
            w.wear_max_train_share,
        )
        rotated = []
        held, threshold, rng = _threshold_and_held_out(x, subj, g, rotated, cfg, seed)
        evidence = {}
    sign = np.where(np.isin(subj, rotated), -1.0, 1.0)[:, None]
    xc = x * sign  # corrected features: every subject now a normal wearer
    # held-out recall on the synthetic rotated copies: detected by the end, and how many sequences it took
    detect_at: list[int] = []
    n_normal_fp = 0
    for s in names:
        lo = held[subj == s]
        pos = _prefix_sums(-lo, rng, _N_ORDERS)
        crossed = (pos > threshold) & (np.arange(1, len(lo) + 1)[None, :] >= w.wear_min_sequences)
        detect_at += [int(np.argmax(r)) + 1 if r.any() else -1 for r in crossed]
        neg = _prefix_sums(lo, rng, _N_ORDERS)
        n_normal_fp += int(((neg > threshold).any(axis=1)).sum())
    found = [d for d in detect_at if d > 0]
    detector = fit_detector(xc)
    seq_acc = float(np.mean(np.concatenate([held < 0, -held > 0])))
    info = {
        "format_version": FORMAT_VERSION,
        "feature_names": list(DETECTOR_FEATURES),
        "coef": detector.coef.tolist(),
        "scale": detector.scale.tolist(),
        "threshold": threshold,
        "min_sequences": int(w.wear_min_sequences),
        "tail_fraction": float(cfg.features.tail_fraction),
        "rotated_training_subjects": rotated,
        # what the training correction decided, on which evidence (summed held-out log-odds of the rows as recorded)
        "training_evidence": {
            "rule": "at least min_sequences sequences and summed log-odds above threshold, as at serving",
            "subjects": len(names),
            "subjects_below_min_sequences": len(names) - len(enough),
            "rotated": [{"subject": s, "sequences": n_seq[s], "log_odds": evidence[s]} for s in rotated],
            "below_threshold": below_threshold,
            "max_share": float(w.wear_max_train_share),
            "max_subjects": cap,
            "refused_by_cap": bool(refused),
            "refused": refused,
        },
        "held_out": {
            "per_sequence_accuracy": seq_acc,
            "subject_mean_log_odds": per_subject,
            "orders": _N_ORDERS,
            "normal_subject_orders_flagged": n_normal_fp,
            "normal_subject_orders": len(per_subject) * _N_ORDERS,
            "rotated_copy_orders_detected": len(found),
            "rotated_copy_orders": len(detect_at),
            "sequences_to_detect_median": float(np.median(found)) if found else None,
            "sequences_to_detect_max": int(max(found)) if found else None,
        },
    }
    if below_threshold:
        log.info(
            "wear detector: %d candidate(s) below the evidence threshold %.2f, not rotated: %s",
            len(below_threshold),
            threshold,
            ", ".join(
                f"{d['subject']} ({d['sequences']} sequences, log-odds {d['log_odds']:.1f})" for d in below_threshold
            ),
        )
    log.info(
        "wear detector: per-sequence held-out accuracy %.3f; threshold %.2f; rotated copies detected in %d/%d "
        "orders (median after %s sequences); normal subjects flagged in %d/%d orders; rotated training "
        "subjects: %s",
        seq_acc,
        threshold,
        len(found),
        len(detect_at),
        info["held_out"]["sequences_to_detect_median"],
        n_normal_fp,
        len(per_subject) * _N_ORDERS,
        rotated or "none",
    )
    return info, rotated


def prepare_training_rows(
    rows: pl.DataFrame,
    demographics: pl.DataFrame,
    table: FrameTable,
    cfg: Config,
    ensemble_dir: Path,
    record: dict[str, Any] | None = None,
) -> tuple[pl.DataFrame, bool]:
    """Fit the detector, write ``wear.json``, and rotate back the training subjects it finds.

    Returns (rows, changed). With ``ENSEMBLE_WEAR_DETECT=0``, or on data that cannot support a detector
    (fewer than 2 training subjects), nothing is fitted or changed and no ``wear.json`` is left (the
    reason is logged). ``record``, when given, receives what was done (``status``: fitted / skipped /
    off, the reason, the subjects rotated back) for the run's ``optional_steps.json``.
    """
    record = {} if record is None else record
    path = Path(ensemble_dir) / WEAR_FILE
    if path.exists():  # a detector of an earlier run must not serve with these bundles, whatever happens below
        path.unlink()
        log.info("removed the earlier run's %s", path)
    subjects = np.asarray(table.subjects).astype(str)
    n_subjects = len(set(subjects.tolist()) - {""})
    if not cfg.ensemble.wear_detect:
        log.info("wear detection switched off (ENSEMBLE_WEAR_DETECT=0): training rows used as recorded")
        record.update(status="off", reason="ENSEMBLE_WEAR_DETECT=0")
        return rows, False
    if n_subjects < 2:
        reason = f"{n_subjects} training subject(s): the detector is fitted on held-out subjects and needs 2"
        log.warning("wear detection skipped: %s; training rows used as recorded, no %s", reason, WEAR_FILE)
        record.update(status="skipped", reason=reason)
        return rows, False
    info, rotated = fit_wear(table, cfg, cfg.run.seed)
    info["training_corrected"] = bool(rotated) and cfg.ensemble.wear_correct_training
    ev = info["training_evidence"]
    record.update(
        status="fitted",
        rotated=ev["rotated"],
        refused_by_cap=ev["refused_by_cap"],
        training_corrected=info["training_corrected"],
    )
    if ev["refused_by_cap"]:
        record["reason"] = (
            f"{len(ev['refused'])} subjects looked rotated, more than the {ev['max_subjects']} "
            f"ENSEMBLE_WEAR_MAX_TRAIN_SHARE={ev['max_share']:g} allows: none rotated"
        )
    if rotated and not cfg.ensemble.wear_correct_training:
        log.info(
            "wear detector found %d rotated training subject(s) (%s) but ENSEMBLE_WEAR_CORRECT_TRAINING=0: "
            "training rows used as recorded",
            len(rotated),
            ", ".join(rotated),
        )
    if info["training_corrected"]:
        log.info(
            "rotating back %d of %d training subject(s) worn upside down (each with >= %d sequences and summed "
            "log-odds above the threshold %.2f): %s",
            len(rotated),
            n_subjects,
            info["min_sequences"],
            info["threshold"],
            ", ".join(
                f"{d['subject']} ({d['sequences']} sequences, log-odds {d['log_odds']:.1f})" for d in ev["rotated"]
            ),
        )
        rows = correct_subjects(rows, rotated)
    write_json(path, info)  # last: a wear.json on disk describes rows that were corrected as it says
    return rows, info["training_corrected"]


# --------------------------------------------------------------------------- serving


@dataclass
class _SubjectEvidence:
    # the newest sequences' log-odds by id, oldest first (a retried id counts once among them); older ones
    # are folded into ``earlier_*``, so the evidence is still the sum over every sequence seen
    per_sequence: dict[str, float] = field(default_factory=dict)
    rotated: bool = False
    earlier_n: int = 0
    earlier_log_odds: float = 0.0

    @property
    def n(self) -> int:
        return self.earlier_n + len(self.per_sequence)

    @property
    def log_odds(self) -> float:
        return float(self.earlier_log_odds + sum(self.per_sequence.values()))

    def add(self, sequence_id: str, log_odds: float, max_history: int) -> None:
        self.per_sequence.pop(sequence_id, None)  # a retried id: replaced, and now the newest
        self.per_sequence[sequence_id] = log_odds
        while len(self.per_sequence) > max_history:
            oldest = next(iter(self.per_sequence))
            self.earlier_log_odds += self.per_sequence.pop(oldest)
            self.earlier_n += 1


@dataclass
class WearDetector:
    """Per-subject evidence across ``predict`` calls; once past the threshold a subject stays rotated.

    Bounded: evidence is kept for at most ``max_subjects`` subjects (``ENSEMBLE_SERVE_MAX_SUBJECTS``; the
    least recently seen is forgotten beyond it, counted in ``n_evicted`` and logged now and then) and, per
    subject, for the newest ``max_history`` sequence ids (``ENSEMBLE_WEAR_MAX_HISTORY``). Not thread-safe
    on its own: the Predictor calls it under its lock.
    """

    detector: Detector | None
    threshold: float = float("inf")
    min_sequences: int = 1
    tail_fraction: float = 0.4
    enabled: bool = False
    state: OrderedDict[str, _SubjectEvidence] = field(default_factory=OrderedDict)  # least recently seen first
    max_subjects: int = EnsembleConfig.serve_max_subjects
    max_history: int = EnsembleConfig.wear_max_history
    n_evicted: int = 0

    def with_bounds(self, cfg: Config) -> WearDetector:
        """This detector with the serving bounds of ``cfg`` (the Predictor calls it after ``load``)."""
        self.max_subjects = int(cfg.ensemble.serve_max_subjects)
        self.max_history = int(cfg.ensemble.wear_max_history)
        return self

    def _subject(self, subject: str) -> _SubjectEvidence:
        """The subject's evidence, now the most recently seen; a new subject may evict the least recent one."""
        ev, evicted = serving_guard.subject_state(self.state, subject, _SubjectEvidence, self.max_subjects)
        for gone, old in evicted:
            self.n_evicted += 1
            if self.n_evicted == 1 or self.n_evicted % self.max_subjects == 0:  # now and then, not per call
                log.warning(
                    "wear: evidence is kept for at most %d subjects (ENSEMBLE_SERVE_MAX_SUBJECTS): %d least "
                    "recently seen forgotten so far (latest %s, %d sequence(s)%s)",
                    self.max_subjects,
                    self.n_evicted,
                    gone,
                    old.n,
                    ", taken as rotated" if old.rotated else "",
                )
        return ev

    @classmethod
    def load(cls, ensemble_dir: str | Path, cfg: Config) -> WearDetector:
        path = Path(ensemble_dir) / WEAR_FILE
        if not cfg.ensemble.wear_detect:
            log.info("wear detection at serving switched off (ENSEMBLE_WEAR_DETECT=0)")
            return cls(None)
        raw = ensemble_seal.read_sealed(ensemble_dir, WEAR_FILE)  # digest checked against manifest.json
        if raw is None:
            log.info("no %s: no upside-down wear detection at serving", path)
            return cls(None)
        d = ensemble_seal.parse_json(raw, path)
        try:
            if d["format_version"] != FORMAT_VERSION or list(d["feature_names"]) != list(DETECTOR_FEATURES):
                raise WearError(
                    f"{path}: written by another version of wear.py (format {d.get('format_version')}, "
                    f"features {d.get('feature_names')}); retrain"
                )
            det = Detector(np.asarray(d["coef"], np.float64), np.asarray(d["scale"], np.float64))
            if det.coef.shape != (len(DETECTOR_FEATURES),) or det.scale.shape != det.coef.shape:
                raise WearError(
                    f"{path}: coef/scale of shapes {det.coef.shape}/{det.scale.shape}, "
                    f"expected ({len(DETECTOR_FEATURES)},)"
                )
            out = cls(det, float(d["threshold"]), int(d["min_sequences"]), float(d["tail_fraction"]), True)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, WearError):
                raise
            raise WearError(f"{path} is not a wear file of this project ({type(e).__name__}: {e})") from None
        log.info(
            "wear detection from %s: threshold %.2f after >= %d sequence(s)", path, out.threshold, out.min_sequences
        )
        return out

    def observe(self, subject: str, table: FrameTable, corrected: bool = False) -> bool:
        """Add this sequence's evidence; True when the subject is (now) taken as a rotated wearer.

        ``corrected``: the table was built from already rotated-back rows; its log-odds are negated
        (the features are odd under the turn), so the evidence is that of the rows as recorded.
        """
        if not self.enabled or not subject or self.detector is None:
            return False
        ev = self._subject(subject)
        lo = float(self.detector.log_odds(detector_features(table, self.tail_fraction))[0])
        ev.add(str(table.sequence_ids[0]), -lo if corrected else lo, self.max_history)
        if not ev.rotated and ev.n >= self.min_sequences and ev.log_odds > self.threshold:
            ev.rotated = True
            log.info(
                "subject %s taken as wearing the device rotated 180 degrees (evidence %.1f after %d sequences): "
                "its rows are corrected from now on",
                subject,
                ev.log_odds,
                ev.n,
            )
        return ev.rotated

    def is_rotated(self, subject: str) -> bool:
        """Whether ``subject`` is taken as a rotated wearer so far (reads the state, changes nothing)."""
        ev = self.state.get(subject) if self.enabled and subject else None
        return ev is not None and ev.rotated

    def correct(self, subject: str, sequence: pl.DataFrame) -> tuple[pl.DataFrame, bool]:
        """The serving stage "correct wear": the rows to featurize, and whether they were rotated back.

        Rotated back (``rotate_rows``) when the subject is already taken as a rotated wearer; reads the
        state only. This sequence's own evidence is added afterwards, from its features (``observe``,
        with the returned flag as ``corrected``).
        """
        if self.is_rotated(subject):
            return rotate_rows(sequence), True
        return sequence, False

    def rotated_subjects(self) -> list[str]:
        return sorted(s for s, ev in self.state.items() if ev.rotated)

    def summary(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "threshold": self.threshold,
            "subjects_seen": len(self.state),  # those kept: at most max_subjects
            "subjects_evicted": self.n_evicted,
            "max_subjects": self.max_subjects,
            "rotated_subjects": self.rotated_subjects(),
        }


def score_against_truth(
    detected: list[str], data_dir: str | Path, submission: str | Path | None = None
) -> dict[str, Any]:
    """Detector precision/recall and the hold-out split by wear, when the generator's ``synth_info.json`` exists."""
    info_path = Path(data_dir) / "synth_info.json"
    if not info_path.exists():
        return {}
    truth = set(read_json(info_path).get("rotated_subjects", {}).get("test", []))
    found = set(detected)
    tp = len(truth & found)
    out: dict[str, Any] = {
        "true_rotated": sorted(truth),
        "detected": sorted(found),
        "true_positives": tp,
        "precision": tp / len(found) if found else None,
        "recall": tp / len(truth) if truth else None,
    }
    solution = Path(data_dir) / "test_solution.csv"
    test_csv = Path(data_dir) / "test.csv"
    if submission is not None and Path(submission).exists() and solution.exists() and test_csv.exists():
        from metric import score_components

        subj = pl.scan_csv(test_csv).select("sequence_id", "subject").unique().collect()
        joined = (
            pl.read_csv(solution)
            .join(pl.read_parquet(submission), on="sequence_id", suffix="_pred")
            .join(subj, on="sequence_id")
        )
        for flag, name in ((True, "holdout_rotated_subjects"), (False, "holdout_normal_subjects")):
            part = joined.filter(pl.col("subject").is_in(sorted(truth)) == flag)
            if part.height:
                out[name] = score_components(part["gesture"].to_list(), part["gesture_pred"].to_list())
    return out
