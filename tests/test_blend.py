"""The one ``Blend`` (issue 24, item 2): weights.json has one reader and writer, a format version, and the
blend that serving applies is the one the replay applies; the report's per-class figures are the honest
(cross-fitted) blend OOF's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import blend
import cv
import ensemble
import ensemble_seal
import serving_guard
from blend import Blend, BlendError
from bundle import BundleError
from config import load_config
from metric import GESTURES, N_CLASSES, per_class_f1
from tests.factory import make_sequence
from tools import report


def _record(weights: dict[str, float], bias: list[float] | None = None, **extra) -> dict:
    views = {
        v: {"weights": dict(weights), "calibration": {"class_bias": bias if v == "full" else None}} for v in blend.VIEWS
    }
    return {"members": list(weights), "views": views, **extra}


def _proba(rng: np.random.Generator, n: int) -> np.ndarray:
    p = rng.dirichlet(np.ones(N_CLASSES), n)
    return p.astype(np.float32)


# --------------------------------------------------------------------------- the file


def test_the_written_file_carries_its_version_and_reads_back_the_same(tmp_path):
    bias = list(np.linspace(-0.5, 0.5, N_CLASSES))
    record = _record({"lgbm": 0.25, "torch": 0.75}, bias, class_prior=[1.0] * N_CLASSES, test_like_score=0.5)
    written = ensemble.save_weights(tmp_path / blend.WEIGHTS_FILE, record)
    stored = json.loads((tmp_path / blend.WEIGHTS_FILE).read_text())
    assert stored["format_version"] == blend.FORMAT_VERSION == 1
    assert {k: v for k, v in stored.items() if k != "format_version"} == json.loads(json.dumps(record))
    ensemble_seal.write_manifest(tmp_path, {})
    for read in (Blend.read(tmp_path), Blend.load_sealed(tmp_path)):
        assert read.members == ("lgbm", "torch") and read.format_version == 1
        assert dict(read.views["imu_only"].weights) == {"lgbm": 0.25, "torch": 0.75}
        np.testing.assert_allclose(read.views["full"].class_bias, bias)
        assert read.views["imu_only"].class_bias is None
        np.testing.assert_allclose(read.class_prior, np.full(N_CLASSES, 1 / N_CLASSES))
        assert read.record["test_like_score"] == 0.5 and read.to_dict() == written.to_dict()
    assert Blend.read(tmp_path / "nowhere") is None and Blend.load_sealed(tmp_path / "nowhere") is None


def test_a_file_without_a_version_is_version_1_and_another_version_is_refused_naming_it(tmp_path):
    old = _record({"lgbm": 1.0})  # what training wrote before the field existed
    assert Blend.from_dict(old).format_version == 1
    with pytest.raises(BlendError, match=r"weights\.json: format version 2; this code reads version 1"):
        Blend.from_dict({**old, "format_version": 2}, tmp_path / "weights.json")
    # through the Predictor: STRICT=1 raises naming the version, serving falls back to the defaults and says why
    (tmp_path / "bundles" / "lgbm").mkdir(parents=True)
    (tmp_path / "ensemble").mkdir()
    (tmp_path / "ensemble" / "weights.json").write_text(json.dumps({**old, "format_version": 2}))
    ensemble_seal.write_manifest(tmp_path / "ensemble", {})

    class One:
        classes_ = GESTURES

        def predict_proba(self, table):
            return np.full((table.n_sequences, N_CLASSES), 1 / N_CLASSES)

    specs = [ensemble.MemberSpec("lgbm", lambda d, c: One())]
    with pytest.raises(BlendError, match="format version 2"):
        ensemble.Predictor(load_config({"STRICT": "1"}), specs, bundle_root=tmp_path / "bundles")
    pred = ensemble.Predictor(load_config({}), specs, bundle_root=tmp_path / "bundles")
    assert "format version 2" in pred.summary()["start_up"]["steps_left_out"]["weights"]
    assert pred.weights == {"full": {"lgbm": 1.0}, "imu_only": {"lgbm": 1.0}}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["views"]["full"]["weights"].update(lgbm=float("nan")), "finite and >= 0; found lgbm in view full"),
        (
            lambda r: r["views"]["full"]["calibration"].update(class_bias=[1.0] * 3),
            "class_bias of view full must be 18",
        ),
        (lambda r: r.update(class_prior=[1.0] * 5), "class_prior must be 18 non-negative"),
        (lambda r: r.update(members="lgbm"), "members must be a list"),
        (lambda r: r["views"].pop("imu_only"), "is not a weights file of this project"),
    ],
)
def test_a_bad_record_is_refused_before_it_is_written(tmp_path, edit, message):
    record = _record({"lgbm": 1.0}, [0.0] * N_CLASSES)
    edit(record)
    with pytest.raises(BlendError, match=message):
        ensemble.save_weights(tmp_path / blend.WEIGHTS_FILE, record)
    assert not (tmp_path / blend.WEIGHTS_FILE).exists()


def test_the_prior_of_the_loaded_blend_is_the_serving_fallback(tmp_path):
    prior = [0.0] * (N_CLASSES - 1) + [2.0]
    fitted = Blend.from_dict(_record({"lgbm": 1.0}, class_prior=prior), tmp_path / "weights.json")
    got = serving_guard.load_class_prior(fitted, tmp_path / "oof")
    assert got.answer == GESTURES[-1] and got.source.endswith("weights.json") and got.proba.sum() == 1.0
    assert serving_guard.load_class_prior(Blend.defaults({"lgbm": 1.0}), tmp_path / "oof").is_uniform


# --------------------------------------------------------------------------- one arithmetic


def test_serving_and_the_oof_replay_apply_the_same_blend(tmp_path):
    """The served blend (per row, by view, with the view's class bias) is the replay's ``Blend.apply``."""
    rng = np.random.default_rng(0)
    n = 40
    bias = list(rng.normal(0, 0.5, N_CLASSES))
    record = _record({"lgbm": 0.3, "torch": 0.7}, bias)
    record["views"]["imu_only"]["weights"] = {"lgbm": 0.9, "torch": 0.1}
    fitted = Blend.from_dict(record)
    probas = {m: _proba(rng, n).astype(np.float64) for m in fitted.members}
    has_tof = np.arange(n) % 3 != 0
    served = fitted.served_by(list(fitted.members)).combine(has_tof, probas)
    for view, rows in (("full", has_tof), ("imu_only", ~has_tof)):
        replay = fitted.apply(view, [p[rows] for p in probas.values()])
        np.testing.assert_allclose(served[rows], replay, rtol=1e-12)
    assert not np.allclose(served[has_tof], fitted.apply("full", [p[has_tof] for p in probas.values()])[::-1])
    # the replay without an honest OOF applies exactly this to the members' OOF files
    seq = np.array([f"SEQ_{i:06d}" for i in range(n)])
    y, folds = rng.integers(0, N_CLASSES, n), np.arange(n) % 4
    for m, p in probas.items():
        cv.write_member_oof(tmp_path / "oof", m, seq, y, folds, p, p, "hash")
    fitted.write(tmp_path / "ensemble")
    y_oof, oof, honest = blend.shipped_oof(tmp_path / "ensemble", tmp_path / "oof")
    assert not honest and np.array_equal(y_oof, y)
    stored = {m: cv.read_member_oof(tmp_path / "oof", m).proba_full for m in fitted.members}
    np.testing.assert_allclose(oof["full"], fitted.apply("full", list(stored.values())))
    # with the honest OOF beside it, that is what the replay (and the report) read
    cv.write_member_oof(
        tmp_path / "ensemble" / "oof", blend.BLEND, seq, y, folds, probas["lgbm"], probas["torch"], "hash"
    )
    _, oof, honest = blend.shipped_oof(tmp_path / "ensemble", tmp_path / "oof")
    assert honest and np.allclose(oof["imu_only"], probas["torch"])


def test_an_uncovered_row_is_named_by_the_predictor(tmp_path):
    fitted = Blend.from_dict(_record({"lgbm": 1.0, "torch": 0.0})).served_by(["lgbm", "torch"])
    with pytest.raises(blend.Uncovered):
        fitted.combine(np.array([True]), {"torch": np.full((1, N_CLASSES), 1 / N_CLASSES)})
    assert fitted.row_weights(np.array([True, False])).tolist() == [[1.0, 0.0], [1.0, 0.0]]


# --------------------------------------------------------------------------- the report


def _table_rows(text: str, heading: str) -> dict[str, list[float]]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| (.+?) \| (?:target|non-target) \| ([0-9.]+) \| ([0-9.]+) \|", line)
        if m:
            rows[m.group(1)] = [float(m.group(2)), float(m.group(3))]
    return rows


def test_the_reports_per_class_figures_are_the_honest_blend_oofs(tmp_path):
    """Old main computed them from the members' OOF and the in-sample full-view weights, without the bias."""
    rng = np.random.default_rng(1)
    n = 180
    y = np.arange(n) % N_CLASSES
    seq = np.array([f"SEQ_{i:06d}" for i in range(n)])
    folds = np.arange(n) % 3
    member = np.full((n, N_CLASSES), 0.01, np.float32)
    member[:, 0] = 0.9  # the member (and any in-sample blend of it) answers class 0 everywhere
    cv.write_member_oof(tmp_path / "oof", "lgbm", seq, y, folds, member, member, "hash")
    honest = _proba(rng, n)
    honest[np.arange(n) % 2 == 0, :] = 0.0
    honest[np.arange(n) % 2 == 0, y[np.arange(n) % 2 == 0]] = 1.0  # right on every other row
    honest_imu = _proba(rng, n)
    cv.write_member_oof(tmp_path / "ensemble" / "oof", blend.BLEND, seq, y, folds, honest, honest_imu, "hash")
    cfg = load_config({"ENSEMBLE_RANDOM_SEARCH_DRAWS": "8", "ENSEMBLE_N_STARTS": "1"})
    ensemble.save_weights(
        tmp_path / "ensemble" / "weights.json", ensemble.fit_ensemble(tmp_path / "oof", ["lgbm"], cfg)
    )
    text = report.write_report(tmp_path).read_text()
    heading = "## Per-class F1 (cross-fitted served blend OOF)"
    assert heading in text
    rows = _table_rows(text, heading)
    names = [GESTURES[i] for i in y]
    full = per_class_f1(names, [GESTURES[i] for i in honest.argmax(1)])
    imu = per_class_f1(names, [GESTURES[i] for i in honest_imu.argmax(1)])
    assert rows == {g: [round(full[g], 3), round(imu[g], 3)] for g in GESTURES}
    assert "Confusion matrix and per-class F1: the cross-fitted served blend OOF" in text


def test_the_report_without_the_honest_blend_oof_says_why(tmp_path):
    y = np.arange(36) % N_CLASSES
    p = np.full((36, N_CLASSES), 1 / N_CLASSES, np.float32)
    cv.write_member_oof(tmp_path / "oof", "lgbm", np.array([f"S{i}" for i in range(36)]), y, y % 2, p, p, "h")
    text = report.write_report(tmp_path).read_text()
    assert "Plots and per-class F1 skipped: no cross-fitted served blend OOF" in text
    assert "## Per-class F1" not in text


def test_predictor_blend_comes_from_the_sealed_file_only(tmp_path):
    """weights.json beside the bundles but not in the manifest: refused (STRICT) / defaults (serving)."""
    (tmp_path / "bundles" / "lgbm").mkdir(parents=True)
    ensemble_seal.write_manifest(tmp_path / "ensemble", {})
    Blend.from_dict(_record({"lgbm": 1.0}, [5.0] + [0.0] * (N_CLASSES - 1))).write(tmp_path / "ensemble")

    class Flat:
        classes_ = GESTURES

        def predict_proba(self, table):
            p = np.full((table.n_sequences, N_CLASSES), 0.01)
            p[:, 3] = 0.83
            return p

    specs = [ensemble.MemberSpec("lgbm", lambda d, c: Flat())]
    with pytest.raises(BundleError, match="not sealed"):
        ensemble.Predictor(load_config({"STRICT": "1"}), specs, bundle_root=tmp_path / "bundles")
    pred = ensemble.Predictor(load_config({}), specs, bundle_root=tmp_path / "bundles")
    assert pred.class_bias == {} and pred.predict(make_sequence("SEQ_1", 9), None) == GESTURES[3]
    ensemble_seal.write_manifest(tmp_path / "ensemble", {})  # now sealed: its bias moves the answer to class 0
    pred = ensemble.Predictor(load_config({}), specs, bundle_root=tmp_path / "bundles")
    assert set(pred.class_bias) == {"full"} and pred.predict(make_sequence("SEQ_1", 9), None) == GESTURES[0]


def test_only_blend_opens_weights_json():
    """No other module reads or writes the file: the name appears in code only in blend.py, the seal's list of
    ensemble files and main.py's removal of an earlier run's files."""
    import ast

    root = Path(__file__).resolve().parents[1]
    users = set()
    for path in sorted([*root.glob("*.py"), *root.glob("tools/**/*.py")]):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value == "weights.json" or node.value.endswith("/weights.json"):
                    users.add(path.name)
    assert users <= {"blend.py", "ensemble_seal.py", "main.py"}, users
