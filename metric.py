"""The competition metric: 0.5 * binary F1 (target vs non-target) + 0.5 * macro F1.

The gesture vocabulary lives here because the metric defines it: the gateway
rejects any other string. This module imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import f1_score

TARGET_GESTURES: tuple[str, ...] = (
    "Above ear - pull hair",
    "Cheek - pinch skin",
    "Eyebrow - pull hair",
    "Eyelash - pull hair",
    "Forehead - pull hairline",
    "Forehead - scratch",
    "Neck - pinch skin",
    "Neck - scratch",
)
NON_TARGET_GESTURES: tuple[str, ...] = (
    "Drink from bottle/cup",
    "Feel around in tray and pull out an object",
    "Glasses on/off",
    "Pinch knee/leg skin",
    "Pull air toward your face",
    "Scratch knee/leg skin",
    "Text on phone",
    "Wave hello",
    "Write name in air",
    "Write name on leg",
)
# The one global class order: every probability matrix in the project has these columns.
GESTURES: tuple[str, ...] = TARGET_GESTURES + NON_TARGET_GESTURES
N_CLASSES = len(GESTURES)
NON_TARGET_LABEL = "non_target"

_GESTURE_SET = frozenset(GESTURES)
_TARGET_SET = frozenset(TARGET_GESTURES)


class InvalidGestureError(ValueError):
    """A string that is not one of the 18 gesture names."""


def check_gestures(labels: Sequence[str], what: str = "labels") -> None:
    """Raise naming the offending strings if any label is not one of the 18 gestures."""
    bad = sorted({str(x) for x in labels if x not in _GESTURE_SET})
    if bad:
        shown = ", ".join(repr(b) for b in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise InvalidGestureError(f"{what}: {len(bad)} unknown gesture string(s): {shown}{more}")


def is_target(labels: Sequence[str]) -> np.ndarray:
    return np.array([x in _TARGET_SET for x in labels], dtype=bool)


def collapse_non_target(labels: Sequence[str]) -> list[str]:
    return [x if x in _TARGET_SET else NON_TARGET_LABEL for x in labels]


def score_components(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, float]:
    """Binary F1, macro F1 and their mean (the official score) on gesture strings."""
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if not y_true:
        raise ValueError("cannot score an empty set of predictions")
    check_gestures(y_true, "y_true")
    check_gestures(y_pred, "y_pred")
    binary = f1_score(is_target(y_true), is_target(y_pred), pos_label=True, zero_division=0)
    t, p = collapse_non_target(y_true), collapse_non_target(y_pred)
    present = sorted(set(t) | set(p))  # classes present in truth or prediction
    macro = f1_score(t, p, labels=present, average="macro", zero_division=0)
    return {"binary_f1": float(binary), "macro_f1": float(macro), "score": float(0.5 * binary + 0.5 * macro)}


def competition_score(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    return score_components(y_true, y_pred)["score"]


_N_TARGETS = len(TARGET_GESTURES)


def score_indices(y_true_idx: np.ndarray, y_pred_idx: np.ndarray) -> float:
    """The official score on class indices (into GESTURES), from confusion counts.

    Same definition as ``score_components``, about 100x faster: weight fitting
    calls it thousands of times. A test checks both agree.
    """
    t = np.asarray(y_true_idx, dtype=np.int64)
    p = np.asarray(y_pred_idx, dtype=np.int64)
    if len(t) == 0 or len(t) != len(p):
        raise ValueError(f"need equal, non-zero numbers of labels, got {len(t)} and {len(p)}")
    # collapse the non-targets into one class (index _N_TARGETS)
    tc, pc = np.minimum(t, _N_TARGETS), np.minimum(p, _N_TARGETS)
    k = _N_TARGETS + 1
    tp = np.bincount(tc[tc == pc], minlength=k).astype(np.float64)
    n_true = np.bincount(tc, minlength=k).astype(np.float64)
    n_pred = np.bincount(pc, minlength=k).astype(np.float64)
    present = (n_true + n_pred) > 0
    denom = n_true + n_pred
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    macro = f1[present].mean()
    tt, pt = t < _N_TARGETS, p < _N_TARGETS
    btp = float(np.sum(tt & pt))
    bden = float(tt.sum() + pt.sum())
    binary = 2 * btp / bden if bden > 0 else 0.0
    return float(0.5 * binary + 0.5 * macro)


def score_proba(y_true_idx: np.ndarray, proba: np.ndarray) -> float:
    """Score of the argmax of a (n, 18) probability matrix against class indices."""
    return score_indices(y_true_idx, np.asarray(proba).argmax(axis=1))


def per_class_f1(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, float]:
    """F1 of each of the 18 gestures (one-vs-rest), for reports."""
    scores = f1_score(list(y_true), list(y_pred), labels=list(GESTURES), average=None, zero_division=0)
    return {g: float(s) for g, s in zip(GESTURES, scores)}
