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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy.spatial.transform import Rotation

from config import Config
from features import FrameTable, build_frame_table, clean_sensors, feature_index
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


def fit_wear(table: FrameTable, cfg: Config, seed: int = 0) -> tuple[dict[str, Any], list[str]]:
    """Fit the detector on training subjects; returns (content of wear.json, rotated training subjects).

    1. fit on every subject taken as normal; the subject with the highest positive mean log-odds
       under the models of the other subject groups is taken as a rotated wearer; refit with its
       features negated (= corrected) and repeat until no subject's mean reaches half the normal subjects' typical
       magnitude on the positive side (one at a
       time, so one rotated wearer among few subjects cannot drag a normal one over);
    2. the final detector is fitted on the corrected features of every subject;
    3. threshold on the running sum of log-odds, chosen on held-out subject groups so that no
       held-out normal subject crosses it in any of ``_N_ORDERS`` random orders (times a margin).
    """
    x = detector_features(table, cfg.features.tail_fraction)
    subj = np.asarray(table.subjects).astype(str)
    if len(set(subj.tolist()) - {""}) < 2:
        raise WearError("the wear detector needs at least 2 training subjects")
    group = _subject_groups(subj)
    g = np.array([group[s] for s in subj])
    rotated: list[str] = []
    for _ in range(len(group)):  # greedy: flag the clearest rotated wearer, refit with it corrected, repeat
        sign = np.where(np.isin(subj, rotated), -1.0, 1.0)[:, None]
        held_lo = _held_out_log_odds(x * sign, g) * sign[:, 0]  # log-odds of the rows as recorded
        per_subject = {s: float(held_lo[subj == s].mean()) for s in sorted(set(subj.tolist()))}
        # a rotated wearer mirrors the normal ones: its mean must reach half their typical magnitude, not just 0
        typical = np.median([-m for s, m in per_subject.items() if s not in rotated and m < 0] or [0.0])
        candidates = {s: m for s, m in per_subject.items() if s not in rotated and m > max(0.5 * typical, 0.0)}
        if not candidates or len(rotated) + 1 > len(group) // 2:  # upside down is the exception, never the rule
            break
        rotated.append(max(candidates, key=candidates.get))
    rotated = sorted(rotated)
    sign = np.where(np.isin(subj, rotated), -1.0, 1.0)[:, None]
    xc = x * sign  # corrected features: every subject now a normal wearer
    rng = np.random.default_rng(seed)
    normal_max, detect_at = [], []
    held = _held_out_log_odds(xc, g)
    for s in sorted(set(subj.tolist())):
        normal_max.append(float(_prefix_sums(held[subj == s], rng, _N_ORDERS).max()))
    w = cfg.ensemble
    threshold = max(float(w.wear_min_log_odds), float(w.wear_threshold_margin) * max(normal_max))
    # held-out recall on the synthetic rotated copies: detected by the end, and how many sequences it took
    n_normal_fp = 0
    for s in sorted(set(subj.tolist())):
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
    rows: pl.DataFrame, demographics: pl.DataFrame, table: FrameTable, cfg: Config, ensemble_dir: Path
) -> tuple[pl.DataFrame, bool]:
    """Fit the detector, write ``wear.json``, and rotate back the training subjects it finds.

    Returns (rows, changed). With ``ENSEMBLE_WEAR_DETECT=0`` nothing is fitted or changed.
    """
    path = Path(ensemble_dir) / WEAR_FILE
    n_subjects = len(set(np.asarray(table.subjects).astype(str).tolist()) - {""})
    if not cfg.ensemble.wear_detect or n_subjects < 2:
        log.info(
            "wear detection %s: training rows used as recorded",
            "switched off (ENSEMBLE_WEAR_DETECT=0)"
            if not cfg.ensemble.wear_detect
            else f"skipped ({n_subjects} training subject(s))",
        )
        if path.exists():  # a detector of an earlier run must not serve with these bundles
            path.unlink()
            log.info("removed the earlier run's %s", path)
        return rows, False
    info, rotated = fit_wear(table, cfg, cfg.run.seed)
    info["training_corrected"] = bool(rotated) and cfg.ensemble.wear_correct_training
    write_json(path, info)
    if not info["training_corrected"]:
        return rows, False
    log.info("rotating back %d training subject(s) worn upside down: %s", len(rotated), rotated)
    return correct_subjects(rows, rotated), True


# --------------------------------------------------------------------------- serving


@dataclass
class _SubjectEvidence:
    per_sequence: dict[str, float] = field(default_factory=dict)  # a retried sequence id counts once
    rotated: bool = False

    @property
    def n(self) -> int:
        return len(self.per_sequence)

    @property
    def log_odds(self) -> float:
        return float(sum(self.per_sequence.values()))


@dataclass
class WearDetector:
    """Per-subject evidence across ``predict`` calls; once past the threshold a subject stays rotated."""

    detector: Detector | None
    threshold: float = float("inf")
    min_sequences: int = 1
    tail_fraction: float = 0.4
    enabled: bool = False
    state: dict[str, _SubjectEvidence] = field(default_factory=dict)

    @classmethod
    def load(cls, ensemble_dir: str | Path, cfg: Config) -> WearDetector:
        path = Path(ensemble_dir) / WEAR_FILE
        if not cfg.ensemble.wear_detect:
            log.info("wear detection at serving switched off (ENSEMBLE_WEAR_DETECT=0)")
            return cls(None)
        if not path.exists():
            log.info("no %s: no upside-down wear detection at serving", path)
            return cls(None)
        d = read_json(path)
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
        ev = self.state.setdefault(subject, _SubjectEvidence())
        lo = float(self.detector.log_odds(detector_features(table, self.tail_fraction))[0])
        ev.per_sequence[str(table.sequence_ids[0])] = -lo if corrected else lo
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

    def rows_for_features(self, subject: str, sequence: pl.DataFrame) -> pl.DataFrame:
        """The rows to build features from: rotated back when the subject is already taken as rotated."""
        ev = self.state.get(subject) if self.enabled and subject else None
        if ev is not None and ev.rotated:
            return rotate_rows(sequence)
        return sequence

    def corrected_table(
        self, subject: str, sequence: pl.DataFrame, demographics: pl.DataFrame | None, table: FrameTable, cfg: Config
    ) -> FrameTable:
        """The sequence's frame table from corrected rows when its subject is a rotated wearer.

        ``table`` was built from ``rows_for_features(subject, sequence)``: corrected already when the
        subject was known to be rotated before this call; rebuilt here only on the call that decides it.
        """
        ev = self.state.get(subject) if self.enabled and subject else None
        before = ev is not None and ev.rotated
        if not self.observe(subject, table, corrected=before) or before:
            return table
        return build_frame_table(rotate_rows(sequence), demographics, cfg.features)

    def rotated_subjects(self) -> list[str]:
        return sorted(s for s, ev in self.state.items() if ev.rotated)

    def summary(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "threshold": self.threshold,
            "subjects_seen": len(self.state),
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
