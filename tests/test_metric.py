import numpy as np
import pytest

from metric import (
    GESTURES,
    NON_TARGET_GESTURES,
    TARGET_GESTURES,
    InvalidGestureError,
    competition_score,
    per_class_f1,
    score_components,
    score_indices,
    score_proba,
)


def test_class_lists():
    assert len(TARGET_GESTURES) == 8 and len(NON_TARGET_GESTURES) == 10
    assert len(set(GESTURES)) == 18 and GESTURES[:8] == TARGET_GESTURES


def test_perfect_score():
    y = list(GESTURES)
    assert competition_score(y, y) == pytest.approx(1.0)


def test_all_wrong_within_targets():
    # Every target predicted as another target: binary F1 is perfect (all targets), macro F1 is 0.
    y = list(TARGET_GESTURES)
    pred = y[1:] + y[:1]
    c = score_components(y, pred)
    assert c["binary_f1"] == pytest.approx(1.0)
    assert c["macro_f1"] == pytest.approx(0.0)
    assert c["score"] == pytest.approx(0.5)


def test_only_non_targets_collapse_to_one_class():
    # Non-targets confused among themselves are all "non_target": a perfect macro F1.
    y = list(NON_TARGET_GESTURES)
    pred = y[::-1]
    c = score_components(y, pred)
    assert c["macro_f1"] == pytest.approx(1.0)
    assert c["binary_f1"] == pytest.approx(0.0)  # no positive in truth or prediction: zero_division=0
    assert c["score"] == pytest.approx(0.5)


def test_hand_worked_mixed_case():
    y = ["Neck - scratch", "Neck - scratch", "Wave hello", "Text on phone"]
    p = ["Neck - scratch", "Scratch knee/leg skin", "Neck - scratch", "Wave hello"]
    # binary: truth T,T,F,F  pred T,F,T,F -> tp=1 fp=1 fn=1 -> F1 = 0.5
    # macro over {Neck - scratch, non_target}: Neck: tp1 fp1 fn1 -> 0.5; non_target: tp1 fp1 fn1 -> 0.5
    c = score_components(y, p)
    assert c["binary_f1"] == pytest.approx(0.5)
    assert c["macro_f1"] == pytest.approx(0.5)


def test_class_only_in_predictions_counts_in_macro():
    y = ["Neck - scratch", "Neck - scratch"]
    p = ["Neck - scratch", "Cheek - pinch skin"]
    # classes present: Neck (P=1,R=.5 -> 2/3) and Cheek (only predicted -> 0): macro = 1/3
    c = score_components(y, p)
    assert c["macro_f1"] == pytest.approx(1 / 3)
    assert c["binary_f1"] == pytest.approx(1.0)


def test_invalid_gesture_string_is_an_error():
    with pytest.raises(InvalidGestureError, match="Hair pull"):
        competition_score(["Neck - scratch"], ["Hair pull"])
    with pytest.raises(ValueError, match="has 2 labels"):
        competition_score(["Neck - scratch", "Wave hello"], ["Neck - scratch"])
    with pytest.raises(ValueError, match="empty"):
        competition_score([], [])


def test_score_proba_and_per_class():
    y = np.array([0, 1, 17])
    proba = np.eye(18)[[0, 1, 17]]
    assert score_proba(y, proba) == pytest.approx(1.0)
    f1 = per_class_f1([GESTURES[0]], [GESTURES[1]])
    assert f1[GESTURES[0]] == 0.0 and len(f1) == 18


def test_fast_score_agrees_with_the_official_definition():
    rng = np.random.default_rng(0)
    for n in (1, 5, 50, 400):
        for _ in range(20):
            y = rng.integers(0, 18, n)
            p = np.where(rng.random(n) < 0.5, y, rng.integers(0, 18, n))
            official = competition_score([GESTURES[i] for i in y], [GESTURES[i] for i in p])
            assert score_indices(y, p) == pytest.approx(official, abs=1e-12)
    assert score_indices(np.arange(8, 18), np.arange(8, 18)[::-1]) == pytest.approx(0.5)
