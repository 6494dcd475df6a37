"""Folds and out-of-fold (OOF) predictions shared by every member.

Folds are computed once per data set (``folds.csv``, with each sequence's subject
and gesture) and reused only while ids, subjects and gestures all match; every member
writes its OOF probabilities in one sequence order and one class order, for a
full-sensor view and an IMU-only view (half of the hidden test has no thm/tof).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from sklearn.model_selection import StratifiedGroupKFold

from io_utils import atomic_path, read_json, read_npy, write_json, write_npy
from metric import GESTURES, score_proba

log = logging.getLogger(__name__)


class FoldsError(ValueError):
    """Folds or OOF files that do not belong to the data or to each other."""


def make_folds(
    sequence_ids: np.ndarray, subjects: np.ndarray, gestures: np.ndarray, n_folds: int = 5, seed: int = 42
) -> pl.DataFrame:
    """StratifiedGroupKFold: grouped by subject (no subject in two folds), stratified by gesture.

    Returns ``sequence_id, subject, gesture, fold`` sorted by sequence id: what ``load_or_make_folds`` checks
    a saved ``folds.csv`` against before reusing it.
    """
    n_subjects = len(np.unique(subjects))
    if n_subjects < n_folds:
        raise FoldsError(f"{n_subjects} subject(s) cannot fill {n_folds} subject-grouped folds; lower CMI_N_FOLDS")
    fold = np.full(len(sequence_ids), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    try:
        for k, (_, val) in enumerate(splitter.split(np.zeros(len(gestures)), gestures, groups=subjects)):
            fold[val] = k
    except ValueError as e:  # e.g. every gesture rarer than the number of folds
        raise FoldsError(f"cannot make {n_folds} stratified folds of {len(gestures)} sequences: {e}") from None
    return pl.DataFrame(
        {
            "sequence_id": np.asarray(sequence_ids).astype(str),
            "subject": np.asarray(subjects).astype(str),
            "gesture": np.asarray(gestures).astype(str),
            "fold": fold,
        }
    ).sort("sequence_id")


def folds_hash(folds: pl.DataFrame) -> str:
    text = "\n".join(f"{s},{f}" for s, f in folds.sort("sequence_id").select("sequence_id", "fold").iter_rows())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


FOLDS_SCHEMA = {"sequence_id": pl.String, "subject": pl.String, "gesture": pl.String, "fold": pl.Int64}
_REMAKE_HINT = "`train --force` (or `run`/`ablate --force`) remakes the folds and retrains every member on them"


def _changed(column: str, old: pl.Series, new: np.ndarray, ids: pl.Series) -> str | None:
    """``"N sequence(s) changed <column> (e.g. ...)"`` when ``old`` and ``new`` differ, else None."""
    differs = old.cast(pl.String).fill_null("").to_numpy().astype(str) != new
    if not differs.any():
        return None
    first = ", ".join(np.asarray(ids.to_list())[differs][:3].tolist())
    return f"{int(differs.sum())} sequence(s) changed {column} (e.g. {first})"


def check_folds(
    path: str | Path, folds: pl.DataFrame, sequence_ids: np.ndarray, subjects: np.ndarray, gestures: np.ndarray
) -> None:
    """Raise ``FoldsError`` unless a saved ``folds.csv`` belongs to exactly these sequences, subjects and gestures.

    Folds made for other subjects would put one subject in two folds (subject leakage into the OOF); folds
    made for other gestures would no longer be stratified. The message says what changed and how to remake.
    """
    path = Path(path)
    have, want = set(folds["sequence_id"].to_list()), set(np.asarray(sequence_ids).astype(str).tolist())
    if have != want:
        raise FoldsError(
            f"{path} does not match the training data: {len(want - have)} sequence(s) without a fold, "
            f"{len(have - want)} unknown; {_REMAKE_HINT}"
        )
    if folds.height != len(have):
        raise FoldsError(f"{path} lists {folds.height - len(have)} sequence(s) more than once; {_REMAKE_HINT}")
    missing = [c for c in ("subject", "gesture") if c not in folds.columns]
    if missing:
        raise FoldsError(
            f"{path} has no {' or '.join(missing)} column (written by an older version), so it cannot be checked "
            f"against the training data's subjects and gestures; {_REMAKE_HINT}"
        )
    want_df = pl.DataFrame(
        {
            "sequence_id": np.asarray(sequence_ids).astype(str),
            "subject": np.asarray(subjects).astype(str),
            "gesture": np.asarray(gestures).astype(str),
        }
    ).sort("sequence_id")
    saved = folds.sort("sequence_id")
    found = (
        _changed(c, saved[c], want_df[c].to_numpy().astype(str), saved["sequence_id"]) for c in ("subject", "gesture")
    )
    changes = [c for c in found if c]
    if changes:
        raise FoldsError(
            f"{path} was made for other data: {'; '.join(changes)}. Its folds are grouped by subject and "
            f"stratified by gesture for those data (reused, a subject could sit in two folds); {_REMAKE_HINT}"
        )
    split = saved.group_by("subject").agg(pl.col("fold").n_unique().alias("n")).filter(pl.col("n") > 1)
    if split.height:
        raise FoldsError(
            f"{path} puts {split.height} subject(s) in more than one fold (e.g. {split['subject'][0]}): "
            f"folds must be grouped by subject; {_REMAKE_HINT}"
        )


def load_or_make_folds(
    path: str | Path,
    sequence_ids: np.ndarray,
    subjects: np.ndarray,
    gestures: np.ndarray,
    n_folds: int,
    seed: int,
    remake: bool = False,
) -> pl.DataFrame:
    """Reuse ``folds.csv`` when it belongs to these data (``check_folds``), else make and save it.

    A saved file that does not match is an error (``FoldsError``), never silently replaced: members trained
    on it would be skipped or resumed on other folds. ``remake`` (``train --force``) makes the folds afresh.
    """
    path = Path(path)
    if path.exists() and not remake:
        try:
            folds = pl.read_csv(path, schema_overrides=FOLDS_SCHEMA)
        except pl.exceptions.PolarsError as e:
            raise FoldsError(f"{path} cannot be read as folds ({e}); {_REMAKE_HINT}") from None
        if "sequence_id" not in folds.columns or "fold" not in folds.columns:
            raise FoldsError(f"{path} lacks a sequence_id or fold column; {_REMAKE_HINT}")
        check_folds(path, folds, sequence_ids, subjects, gestures)
        if folds["fold"].n_unique() != n_folds:
            raise FoldsError(f"{path} has {folds['fold'].n_unique()} folds but CMI_N_FOLDS={n_folds}; {_REMAKE_HINT}")
        log.info("reusing folds from %s (hash %s)", path, folds_hash(folds))
        return folds
    if path.exists():
        log.info("remaking %s (--force)", path)
    folds = make_folds(sequence_ids, subjects, gestures, n_folds, seed)
    with atomic_path(path) as tmp:
        folds.write_csv(tmp)
    log.info("wrote %s (%d folds, hash %s)", path, n_folds, folds_hash(folds))
    return folds


def fold_array(folds: pl.DataFrame, sequence_ids: np.ndarray) -> np.ndarray:
    """Fold of each sequence, in the order of ``sequence_ids``."""
    mapping = dict(zip(folds["sequence_id"].to_list(), folds["fold"].to_list()))
    try:
        return np.array([mapping[s] for s in np.asarray(sequence_ids).tolist()], dtype=np.int64)
    except KeyError as e:
        raise FoldsError(f"sequence {e.args[0]} has no fold in folds.csv") from None


# --------------------------------------------------------------------------- OOF


def view_scores(y_true: np.ndarray, proba_full: np.ndarray, proba_imu: np.ndarray) -> dict[str, float]:
    """Competition score on the full view, the IMU-only view, and their mean (the test-like score)."""
    full, imu = score_proba(y_true, proba_full), score_proba(y_true, proba_imu)
    return {"full": full, "imu_only": imu, "mean": 0.5 * (full + imu)}


def write_member_oof(
    oof_dir: str | Path,
    member: str,
    sequence_ids: np.ndarray,
    y_true: np.ndarray,
    fold_ids: np.ndarray,
    proba_full: np.ndarray,
    proba_imu: np.ndarray,
    folds_hash: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a member's OOF probabilities and summary; returns the summary."""
    oof_dir = Path(oof_dir)
    n = len(sequence_ids)
    for name, p in (("proba_full", proba_full), ("proba_imu", proba_imu)):
        if p.shape != (n, len(GESTURES)):
            raise FoldsError(f"{member} {name} has shape {p.shape}, expected ({n}, {len(GESTURES)})")
        if not np.isfinite(p).all():
            raise FoldsError(f"{member} {name} has non-finite probabilities")
    order = np.argsort(np.asarray(sequence_ids).astype(str), kind="stable")  # one shared sequence order
    seq, y, folds = np.asarray(sequence_ids).astype(str)[order], np.asarray(y_true)[order], np.asarray(fold_ids)[order]
    full, imu = proba_full[order].astype(np.float32), proba_imu[order].astype(np.float32)
    _check_or_write_shared(oof_dir, seq, y, folds, folds_hash)
    per_fold = {int(k): view_scores(y[folds == k], full[folds == k], imu[folds == k]) for k in np.unique(folds)}
    summary = {
        "member": member,
        "n_sequences": n,
        "folds_hash": folds_hash,
        "overall": view_scores(y, full, imu),
        "per_fold": per_fold,
        **(extra or {}),
    }
    write_npy(oof_dir / f"oof_{member}_proba.npy", full)
    write_npy(oof_dir / f"oof_{member}_imu_proba.npy", imu)
    write_json(oof_dir / f"{member}_summary.json", summary)
    o = summary["overall"]
    log.info("%s OOF score: full %.4f | IMU-only %.4f | mean %.4f", member, o["full"], o["imu_only"], o["mean"])
    return summary


def _check_or_write_shared(oof_dir: Path, seq: np.ndarray, y: np.ndarray, folds: np.ndarray, fhash: str) -> None:
    """sequence_ids/y_true/folds/classes are shared by all members: write once, then insist they match."""
    meta_path = oof_dir / "oof_meta.json"
    if meta_path.exists():
        meta = read_json(meta_path)
        same = (
            meta.get("folds_hash") == fhash
            and meta.get("classes") == list(GESTURES)
            and np.array_equal(read_npy(oof_dir / "sequence_ids.npy").astype(str), seq)
            and np.array_equal(read_npy(oof_dir / "y_true.npy"), y)
        )
        if same:
            return
        log.warning("OOF folder %s held another data set or folds; starting it afresh", oof_dir)
        for p in oof_dir.glob("*"):
            if p.is_file():
                p.unlink()
    write_npy(oof_dir / "sequence_ids.npy", seq.astype("U"))
    write_npy(oof_dir / "y_true.npy", y.astype(np.int64))
    write_npy(oof_dir / "fold_ids.npy", folds.astype(np.int64))
    write_json(oof_dir / "classes.json", list(GESTURES))
    write_json(meta_path, {"folds_hash": fhash, "classes": list(GESTURES), "n_sequences": len(seq)})


@dataclass(frozen=True)
class MemberOOF:
    member: str
    sequence_ids: np.ndarray
    y_true: np.ndarray
    fold_ids: np.ndarray
    proba_full: np.ndarray
    proba_imu: np.ndarray
    summary: dict[str, Any]


def available_members(oof_dir: str | Path) -> list[str]:
    return sorted(p.name[: -len("_summary.json")] for p in Path(oof_dir).glob("*_summary.json"))


def read_member_oof(oof_dir: str | Path, member: str) -> MemberOOF:
    """Read a member's OOF files and check them against the shared order, classes and folds."""
    oof_dir = Path(oof_dir)
    meta = read_json(oof_dir / "oof_meta.json")
    if meta.get("classes") != list(GESTURES):
        raise FoldsError(f"{oof_dir}/oof_meta.json: class order differs from the code's")
    summary = read_json(oof_dir / f"{member}_summary.json")
    if summary.get("folds_hash") != meta.get("folds_hash"):
        raise FoldsError(
            f"{member} OOF was trained on folds {summary.get('folds_hash')} but the OOF folder holds folds "
            f"{meta.get('folds_hash')}: retrain {member} on the shared folds.csv"
        )
    seq = read_npy(oof_dir / "sequence_ids.npy").astype(str)
    full = read_npy(oof_dir / f"oof_{member}_proba.npy")
    imu = read_npy(oof_dir / f"oof_{member}_imu_proba.npy")
    for name, p in (("full", full), ("imu", imu)):
        if p.shape != (len(seq), len(GESTURES)):
            raise FoldsError(f"{member} OOF {name} has shape {p.shape}, expected ({len(seq)}, {len(GESTURES)})")
    return MemberOOF(
        member=member,
        sequence_ids=seq,
        y_true=read_npy(oof_dir / "y_true.npy"),
        fold_ids=read_npy(oof_dir / "fold_ids.npy"),
        proba_full=full,
        proba_imu=imu,
        summary=summary,
    )
