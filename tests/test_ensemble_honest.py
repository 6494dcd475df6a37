"""Issue 25: the ensemble's decisions for a fold (blend or member, class bias or not) never read that fold's labels.

The relabel test of the members (tests/test_members.py ``validation_labels_leak``) applied to ``fit_ensemble``:
member OOF folders are written from fixed synthetic probabilities (no training), the blend is fitted, one fold's
labels are changed in the OOF folder, the blend is refitted, and that fold's served OOF rows (``ensemble/oof/blend``)
must be the same bytes. Only the labels change, so anything that moves those rows chose with them.
"""

from pathlib import Path

import numpy as np
import pytest

import cv
import ensemble
from config import load_config
from metric import N_CLASSES, score_proba

N, N_FOLDS = 150, 5
MEMBERS = ("lgbm", "torch")


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _oof(seed: int) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Labels and two members of about equal skill (full and IMU-only views): the blend is a close call."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, N_CLASSES, N)
    probas = {}
    for name in MEMBERS:
        views = []
        for signal in (2.0, 1.4):  # the IMU-only view knows less
            logits = rng.normal(0, 1.5, (N, N_CLASSES))
            logits[np.arange(N), y] += signal
            logits[:, 0] -= 1.0  # a class both under-predict: the class bias has something to find
            views.append(_softmax(logits))
        probas[name] = (views[0], views[1])
    return y, probas


def _write(oof_dir: Path, y: np.ndarray, probas: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    seq = np.array([f"SEQ_{i:06d}" for i in range(N)])  # already in the sorted order the OOF folder keeps
    for name, (full, imu) in probas.items():
        cv.write_member_oof(oof_dir, name, seq, y, np.arange(N) % N_FOLDS, full, imu, "hash")


def _served(oof_dir: Path, cfg) -> tuple[np.ndarray, np.ndarray]:
    blend_dir = oof_dir.parent / "blend"
    ensemble.fit_ensemble(oof_dir, list(MEMBERS), cfg, blend_oof_dir=blend_dir)
    b = cv.read_member_oof(blend_dir, "blend")
    return b.proba_full, b.proba_imu


def relabelled_folds_that_move(tmp: Path, y, probas, cfg, folds=range(N_FOLDS)) -> list[tuple[int, str]]:
    """Fit; then per fold k and per relabelling of fold k, refit: the (k, relabelling) whose served rows of k moved.

    The relabellings make one member, or neither, right on fold k: a decision taken on fold k's rows flips.
    """
    fold = np.arange(N) % N_FOLDS
    _write(tmp / "true" / "oof", y, probas)
    base = _served(tmp / "true" / "oof", cfg)
    moved = []
    for k in folds:
        held = fold == k
        relabels = {f"as {m} says": p[0][held].argmax(1) for m, p in probas.items()}
        relabels["shifted"] = (y[held] + 1) % N_CLASSES
        for name, labels in relabels.items():
            y2 = y.copy()
            y2[held] = labels
            assert (y2[~held] == y[~held]).all() and (y2[held] != y[held]).any()
            run = tmp / f"fold{k}_{name.replace(' ', '_')}"
            _write(run / "oof", y2, probas)
            served = _served(run / "oof", cfg)
            if any(a[held].tobytes() != b[held].tobytes() for a, b in zip(base, served)):
                moved.append((k, name))
    return moved


@pytest.fixture
def cfg():
    return load_config({"ENSEMBLE_N_STARTS": "1", "ENSEMBLE_RANDOM_SEARCH_DRAWS": "8", "CMI_SEED": "0"})


@pytest.fixture
def quick_fits(monkeypatch):
    """Coarser weight and class-bias searches (seconds instead of a minute): both still read the labels given.

    What is tested is which rows each fit and decision reads, not the optimiser; the slow test below and
    tests/test_ensemble_gateway.py use the real searches.
    """
    fit_bias = ensemble.fit_class_bias

    def weights(y, probas, **_):
        grid = [np.eye(len(probas))[i] for i in range(len(probas))] + [np.full(len(probas), 1.0 / len(probas))]
        scores = [score_proba(y, ensemble.blend(probas, w)) for w in grid]
        return grid[int(np.argmax(scores))], max(scores)

    monkeypatch.setattr(ensemble, "fit_weights_coordinate", weights)
    monkeypatch.setattr(
        ensemble, "fit_class_bias", lambda y, p: fit_bias(y, p, grid=np.linspace(-1.0, 1.0, 5), max_rounds=1)
    )


def test_a_folds_labels_do_not_move_its_served_oof_rows(tmp_path, cfg, quick_fits):
    y, probas = _oof(seed=4)
    assert relabelled_folds_that_move(tmp_path, y, probas, cfg) == []


@pytest.mark.slow
def test_a_folds_labels_do_not_move_its_served_oof_rows_with_the_real_searches(tmp_path, cfg):
    y, probas = _oof(seed=4)
    assert relabelled_folds_that_move(tmp_path, y, probas, cfg, folds=[0]) == []


def test_the_relabel_check_catches_a_decision_taken_on_every_fold(tmp_path, cfg, quick_fits, monkeypatch):
    """Positive control: the old leak (blend-or-member and bias decided on all OOF rows) moves the rows."""
    honest = ensemble._decide

    def on_every_fold(y, cands, out, min_gain):
        return honest(y, cands, frozenset(), min_gain)  # ignores which fold is scored

    monkeypatch.setattr(ensemble, "_decide", on_every_fold)
    y, probas = _oof(seed=4)
    assert relabelled_folds_that_move(tmp_path, y, probas, cfg) != []


def test_per_fold_decisions_are_recorded_and_the_served_score_is_their_assembly(tmp_path, cfg, quick_fits):
    y, probas = _oof(seed=4)
    _write(tmp_path / "oof", y, probas)
    weights = ensemble.fit_ensemble(tmp_path / "oof", list(MEMBERS), cfg, blend_oof_dir=tmp_path / "blend")
    b = cv.read_member_oof(tmp_path / "blend", "blend")
    fold = np.arange(N) % N_FOLDS
    for view, served in (("full", b.proba_full), ("imu_only", b.proba_imu)):
        v = weights["views"][view]
        assert v["score"] == pytest.approx(score_proba(y, served))
        assert sorted(v["per_fold"]) == [str(k) for k in range(N_FOLDS)] and v["n_folds"] == N_FOLDS
        assert v["folds_blend"] == sum(d["shipped"] == "blend" for d in v["per_fold"].values())
        assert v["folds_bias"] == sum(d["bias_used"] for d in v["per_fold"].values())
        for k, d in v["per_fold"].items():
            rows = fold == int(k)
            assert d["shipped"] in ("blend", *MEMBERS) and d["n_rows"] == rows.sum()
            assert d["score"] == pytest.approx(score_proba(y[rows], served[rows]))
            if d["shipped"] != "blend" and not d["bias_used"]:  # a member alone: its own OOF rows, untouched
                member = probas[d["shipped"]][0 if view == "full" else 1]
                np.testing.assert_allclose(served[rows], member[rows], rtol=1e-6)
        assert b.summary["decisions"][view]["folds_blend"] == v["folds_blend"]
        assert b.summary["shipped"][view] == v["shipped"]


def test_too_few_folds_keep_the_side_that_needs_no_evidence(tmp_path, cfg, quick_fits):
    """Two folds: each fold's decision sees one fold, where nothing can be cross-fitted: best member, no bias."""
    y, probas = _oof(seed=4)
    seq = np.array([f"SEQ_{i:06d}" for i in range(N)])
    for name, (full, imu) in probas.items():
        cv.write_member_oof(tmp_path / "oof", name, seq, y, np.arange(N) % 2, full, imu, "hash2")
    weights = ensemble.fit_ensemble(tmp_path / "oof", list(MEMBERS), cfg)
    for view in ("full", "imu_only"):
        v = weights["views"][view]
        assert v["folds_blend"] == 0 and v["folds_bias"] == 0 and v["n_folds"] == 2
        assert v["calibration"]["cross_fitted_with"] is None and not v["calibration"]["used"]  # 2 folds: not judged
        assert all(d["blend_cross_fitted"] is None for d in v["per_fold"].values())
