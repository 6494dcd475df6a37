import logging
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import cv
import ensemble
import ensemble_seal
import inference_server
from config import load_config
from features import build_frame_table
from io_utils import write_json
from metric import GESTURES, score_proba
from schema import TEST_COLUMNS, THM_COLS, TOF_COLS
from tests.factory import SHARED_CMI, demographics, make_sequence


class FakeMember:
    """Answers a fixed class: enough to test blending, routing and failure handling."""

    classes_ = GESTURES

    def __init__(self, cls: int, fail: bool = False):
        self.cls, self.fail, self.calls = cls, fail, 0

    def predict_proba(self, table):
        self.calls += 1
        if self.fail and table.sequence_ids[0] != "WARMUP":  # fails on real input, after a clean start-up
            raise RuntimeError("boom")
        p = np.full((table.n_sequences, 18), 0.01)
        p[:, self.cls] = 0.83
        return p


def _specs(tmp_path: Path, members: dict[str, FakeMember]) -> list[ensemble.MemberSpec]:
    for name in members:
        (tmp_path / "bundles" / name).mkdir(parents=True, exist_ok=True)
    return [ensemble.MemberSpec(name=n, load_member=lambda d, c, m=m: m) for n, m in members.items()]


def test_predictor_blends_with_renormalised_default_weights(tmp_path):
    cfg = load_config({}, out_dir=str(tmp_path))
    members = {"lgbm": FakeMember(0), "torch": FakeMember(5)}  # keras absent: weights renormalised
    pred = ensemble.Predictor(cfg, _specs(tmp_path, members), bundle_root=tmp_path / "bundles")
    assert pred.weights["full"] == pytest.approx({"lgbm": 0.2 / 0.65, "torch": 0.45 / 0.65})
    seq = make_sequence("SEQ_000001", 12)
    assert pred.predict(seq, demographics(["SUBJ_000001"])) == GESTURES[5]
    assert pred.predict.__name__ == "predict"
    assert members["torch"].calls == 3  # loaded once; two warm-up calls at start-up, then one per sequence


def _with_fitted_weights(tmp_path: Path, members: dict[str, FakeMember], full: dict, imu_only: dict):
    """A Predictor over ``members`` with a weights.json of these per-view weights."""
    weights = {"views": {"full": {"weights": full}, "imu_only": {"weights": imu_only}}}
    write_json(tmp_path / "ensemble" / "weights.json", weights)
    ensemble_seal.write_manifest(tmp_path / "ensemble", {})  # the ensemble set is served only when sealed
    cfg = load_config({}, out_dir=str(tmp_path))
    return ensemble.Predictor(cfg, _specs(tmp_path, members), bundle_root=tmp_path / "bundles")


def test_fitted_weights_and_imu_only_view(tmp_path):
    members = {"lgbm": FakeMember(0), "torch": FakeMember(5)}
    pred = _with_fitted_weights(tmp_path, members, {"lgbm": 0.9, "torch": 0.1}, {"lgbm": 0.1, "torch": 0.9})
    assert pred.predict(make_sequence("SEQ_000001", 8), None) == GESTURES[0]
    assert pred.predict(make_sequence("SEQ_000002", 8, imu_only=True), None) == GESTURES[5]


def test_a_member_with_weight_zero_in_a_view_is_not_called_for_it(tmp_path, caplog):
    members = {"lgbm": FakeMember(0), "torch": FakeMember(5)}
    full = {"lgbm": 1.0, "torch": 0.0}
    pred = _with_fitted_weights(tmp_path, members, full, {"lgbm": 0.3, "torch": 0.7})
    after_start = members["torch"].calls  # start-up checks every member, whatever its weight
    assert pred.predict(make_sequence("SEQ_000001", 8), None) == GESTURES[0]
    assert members["torch"].calls == after_start  # weight 0 in the full view: not called for it
    assert pred.predict(make_sequence("SEQ_000002", 8, imu_only=True), None) == GESTURES[5]
    assert members["torch"].calls == after_start + 1
    with caplog.at_level(logging.INFO, logger="ensemble"):
        _with_fitted_weights(tmp_path, members, full, full)
    assert "['torch'] have weight 0 in both views" in caplog.text


class BarrierMember(FakeMember):
    """Answers only once the other member is inside its call too: proves the calls overlap."""

    def __init__(self, cls: int, barrier: threading.Barrier):
        super().__init__(cls)
        self.barrier = barrier

    def predict_proba(self, table):
        if table.sequence_ids[0] != "WARMUP":  # the warm-up calls run one after another
            self.barrier.wait(timeout=10)
        return super().predict_proba(table)


def test_members_answer_one_call_concurrently(tmp_path):
    barrier = threading.Barrier(2)
    members = {"lgbm": BarrierMember(0, barrier), "torch": BarrierMember(5, barrier)}
    cfg = load_config({"ENSEMBLE_PREDICT_THREADS": "2", "STRICT": "1"}, out_dir=str(tmp_path))
    pred = ensemble.Predictor(cfg, _specs(tmp_path, members), bundle_root=tmp_path / "bundles")
    assert pred.predict(make_sequence("SEQ_000001", 12), None) == GESTURES[5]  # a sequential call would break it
    with pytest.raises(ensemble.PredictorError, match="ENSEMBLE_PREDICT_THREADS"):
        ensemble.Predictor(
            load_config({"ENSEMBLE_PREDICT_THREADS": "-1"}), _specs(tmp_path, members), tmp_path / "bundles"
        )


@pytest.mark.parametrize("threads", ["1", "3"])
def test_member_failure_is_excluded_logged_and_strict_raises(tmp_path, caplog, threads):
    """The same in sequence (1) and with the members called concurrently (3 threads)."""
    members = {"lgbm": FakeMember(0, fail=True), "torch": FakeMember(5)}
    cfg = load_config({"ENSEMBLE_PREDICT_THREADS": threads}, out_dir=str(tmp_path))
    pred = ensemble.Predictor(cfg, _specs(tmp_path, members), bundle_root=tmp_path / "bundles")
    with caplog.at_level(logging.ERROR):
        assert pred.predict(make_sequence("SEQ_000009", 8), None) == GESTURES[5]
    assert "SEQ_000009" in caplog.text and pred.summary()["member_failures"] == {"lgbm": 1}
    strict_cfg = load_config({"STRICT": "1", "ENSEMBLE_PREDICT_THREADS": threads})
    strict = ensemble.Predictor(strict_cfg, _specs(tmp_path, members), tmp_path / "bundles")
    assert (strict._pool is None) == (threads == "1")
    with pytest.raises(RuntimeError, match="boom"):
        strict.predict(make_sequence("SEQ_000009", 8), None)
    every = {"lgbm": FakeMember(0, fail=True)}
    only = ensemble.Predictor(cfg, _specs(tmp_path, every), bundle_root=tmp_path / "bundles")
    with pytest.raises(ensemble.PredictorError, match="every member failed"):
        only.predict_proba_table(build_frame_table(make_sequence("SEQ_000009", 8)))
    # serving: the fallback chain answers (no stored prior here: the uniform last resort), counted
    assert only.predict(make_sequence("SEQ_000009", 8), None) == GESTURES[0]
    assert only.summary()["answers"] == {"uniform_prior": 1}
    assert only.summary()["degraded"]["sequences"]["SEQ_000009"]["answer"] == "uniform_prior"


def test_predictor_refuses_to_start_without_members_and_bad_input(tmp_path):
    cfg = load_config({"USE_LGBM": "0"})
    with pytest.raises(ensemble.PredictorError, match="no member"):
        ensemble.Predictor(cfg, _specs(tmp_path, {"lgbm": FakeMember(0)}), bundle_root=tmp_path / "bundles")
    strict = load_config({"STRICT": "1"})  # serving (STRICT unset) answers these: test_serving_hostile.py
    pred = ensemble.Predictor(strict, _specs(tmp_path, {"lgbm": FakeMember(0)}), tmp_path / "bundles")
    with pytest.raises(ensemble.PredictorError, match="zero rows"):
        pred.predict(make_sequence("SEQ_1", 3).head(0), None)
    with pytest.raises(ensemble.PredictorError, match="2 sequences"):
        pred.predict(pl.concat([make_sequence("SEQ_1", 3), make_sequence("SEQ_2", 3)]), None)
    with pytest.raises(ValueError, match="acc_x"):
        pred.predict(make_sequence("SEQ_1", 3).drop("acc_x"), None)


def _oof_fixture(tmp_path, n=360, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 18, n)
    seq = np.array([f"SEQ_{i:06d}" for i in range(n)])
    fold = np.arange(n) % 5
    members = {}
    for name, noise in (("lgbm", 2.0), ("torch", 1.2), ("keras", 1.5)):
        logits = rng.normal(0, noise, (n, 18))
        logits[np.arange(n), y] += 2.0
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        members[name] = p
        cv.write_member_oof(tmp_path, name, seq, y, fold, p, p, "hash")
    return y, members


def test_fitted_blend_beats_members_and_random_search(tmp_path):
    y, members = _oof_fixture(tmp_path)
    cfg = load_config({"ENSEMBLE_RANDOM_SEARCH_DRAWS": "512"})
    out = ensemble.fit_ensemble(tmp_path, list(members), cfg, blend_oof_dir=tmp_path / "blend")
    full = out["views"]["full"]
    assert full["blend_score_in_sample"] >= max(full["member_scores"].values()) - 1e-12
    assert full["blend_score_in_sample"] >= full["random_search"]["score"] - 1e-9
    assert sum(full["fitted_weights"].values()) == pytest.approx(1.0)
    w = np.array([full["fitted_weights"][m] for m in members])
    assert score_proba(y, ensemble.blend(list(members.values()), w)) == pytest.approx(full["blend_score_in_sample"])
    assert 0 < full["blend_score_cross_fitted"] <= full["blend_score_in_sample"]
    # The headline is the shipped choice scored cross-fitted, and the written blend OOF scores exactly that.
    assert full["shipped"] == "blend" and full["weights"] == full["fitted_weights"]
    written = cv.read_member_oof(tmp_path / "blend", "blend")
    assert score_proba(y, written.proba_full) == pytest.approx(full["score"])
    assert out["test_like_score"] == pytest.approx(0.5 * (full["score"] + out["views"]["imu_only"]["score"]))


def test_a_blend_that_loses_to_its_best_member_on_unseen_folds_is_not_shipped(tmp_path):
    """Weights fitted on noise help in-sample and hurt on held-out folds: serve the best member alone."""
    rng = np.random.default_rng(1)
    n = 300
    y = rng.integers(0, 18, n)
    seq, fold = np.array([f"SEQ_{i:06d}" for i in range(n)]), np.arange(n) % 5
    logits = rng.normal(0, 1.0, (n, 18))
    logits[np.arange(n), y] += 3.0
    good = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cv.write_member_oof(tmp_path, "lgbm", seq, y, fold, good, good, "hash")
    for name in ("torch", "keras"):  # uninformative members: any weight on them is fitted noise
        noise = rng.dirichlet(np.ones(18), n)
        cv.write_member_oof(tmp_path, name, seq, y, fold, noise, noise, "hash")
    out = ensemble.fit_ensemble(tmp_path, ["lgbm", "torch", "keras"], load_config({}))
    for view in ("full", "imu_only"):
        v = out["views"][view]
        if v["blend_score_cross_fitted"] <= v["member_scores"]["lgbm"]:
            assert v["shipped"] == "lgbm" and v["weights"] == {"lgbm": 1.0, "torch": 0.0, "keras": 0.0}
            assert v["calibration"]["cross_fitted_without"] == pytest.approx(v["member_scores"]["lgbm"])
        else:
            assert v["shipped"] == "blend"
    assert "lgbm" in {out["views"][v]["shipped"] for v in ("full", "imu_only")}


def test_local_gateway_on_the_real_test_file(tmp_path):
    seen = []

    def predict(sequence: pl.DataFrame, demographics: pl.DataFrame) -> str:
        seen.append((sequence["sequence_id"][0], sequence.height, demographics.height, sequence.columns))
        return "Text on phone"

    res = inference_server.run_local_gateway(
        predict, SHARED_CMI / "test.csv", SHARED_CMI / "test_demographics.csv", tmp_path / "submission.parquet", seed=1
    )
    sub = pl.read_parquet(tmp_path / "submission.parquet")
    assert sub.columns == ["sequence_id", "gesture"] and sub.height == 2
    assert sorted((s, n, d) for s, n, d, _ in seen) == [("SEQ_000001", 56, 1), ("SEQ_000011", 51, 1)]
    assert seen[0][3] == list(TEST_COLUMNS)
    assert res.latency_summary()["calls"] == 2


def test_gateway_hands_over_string_typed_columns_and_checks_answers(tmp_path):
    # A test file that starts with IMU-only rows: polars infers thm/tof as String (or null) there.
    rows = pl.concat([make_sequence(f"SEQ_{i:06d}", 70, imu_only=(i < 2)) for i in range(3)])
    rows = rows.select(TEST_COLUMNS)
    rows.write_csv(tmp_path / "test.csv")
    demographics(["SUBJ_000001"]).write_csv(tmp_path / "test_demographics.csv")
    dtypes = []

    def predict(sequence, demographics):
        dtypes.append(sequence.schema[THM_COLS[0]])
        return "Glasses on/off"

    inference_server.run_local_gateway(
        predict, tmp_path / "test.csv", tmp_path / "test_demographics.csv", tmp_path / "submission.parquet"
    )
    assert any(d != pl.Float64 for d in dtypes)  # the trap is reproduced

    def predict(sequence, demographics):  # noqa: F811
        return "Hair pull" if sequence["sequence_id"][0] == "SEQ_000001" else "Wave hello"

    with pytest.raises(inference_server.GatewayError, match="1 of 3"):
        inference_server.run_local_gateway(
            predict, tmp_path / "test.csv", tmp_path / "test_demographics.csv", tmp_path / "sub2.parquet"
        )
    assert not (tmp_path / "sub2.parquet").exists()
    assert pl.read_parquet(tmp_path / "sub2_partial.parquet").height == 2
    with pytest.raises(inference_server.GatewayError, match="named 'predict'"):
        inference_server.run_local_gateway(
            lambda s, d: "Wave hello", tmp_path / "test.csv", tmp_path / "test_demographics.csv", tmp_path / "s.parquet"
        )
    _ = TOF_COLS


def test_a_member_that_cannot_predict_fails_at_start_up(tmp_path):
    class Broken(FakeMember):
        def predict_proba(self, table):
            raise ValueError("weights do not fit the input")

    specs = _specs(tmp_path, {"lgbm": Broken(0)})
    with pytest.raises(ValueError, match="do not fit"):  # STRICT=1: the member's own error
        ensemble.Predictor(load_config({"STRICT": "1"}), specs, bundle_root=tmp_path / "bundles")
    with pytest.raises(ensemble.PredictorError, match="no member could be loaded.*do not fit"):  # serving: left out
        ensemble.Predictor(load_config({}), specs, bundle_root=tmp_path / "bundles")


def test_class_bias_calibration_is_kept_only_when_it_helps_unseen_folds(tmp_path):
    rng = np.random.default_rng(3)
    n = 1800
    y = rng.integers(0, 18, n)
    fold = np.arange(n) % 5
    logits = rng.normal(0, 1.0, (n, 18))
    logits[np.arange(n), y] += 2.5
    logits[:, 0] -= 2.0  # a member that systematically under-predicts one target class
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cal, honest = ensemble.calibration_for_view(y, [p], fold, min_gain=0.002)
    assert all(cal["per_fold_used"].values())  # each fold's own decision (taken without it) keeps the bias too
    assert score_proba(y, honest) == pytest.approx(cal["cross_fitted_with"])
    assert cal["used"] and cal["cross_fitted_with"] > cal["cross_fitted_without"] + 0.002
    assert cal["class_bias"][0] > 0.5  # the under-predicted class is pushed back up
    # on a well-calibrated member the bias does not survive the cross-fitted check
    fair = np.exp(logits + 2.0 * (np.arange(18) == 0))
    fair /= fair.sum(1, keepdims=True)
    assert not ensemble.calibration_for_view(y, [fair], fold, min_gain=0.002)[0]["used"]


def test_predictor_applies_the_class_bias_of_the_view(tmp_path):
    members = {"lgbm": FakeMember(5)}  # 0.83 on class 5, 0.01 elsewhere
    bias = [0.0] * 18
    bias[3] = 5.0  # e^5 * 0.01 > 0.83: class 3 wins where the bias applies
    weights = {
        "views": {
            "full": {"weights": {"lgbm": 1.0}, "calibration": {"class_bias": bias}},
            "imu_only": {"weights": {"lgbm": 1.0}, "calibration": {"class_bias": None}},
        }
    }
    write_json(tmp_path / "ensemble" / "weights.json", weights)
    ensemble_seal.write_manifest(tmp_path / "ensemble", {})
    pred = ensemble.Predictor(load_config({}), _specs(tmp_path, members), bundle_root=tmp_path / "bundles")
    assert pred.predict(make_sequence("SEQ_000001", 8), None) == GESTURES[3]
    assert pred.predict(make_sequence("SEQ_000002", 8, imu_only=True), None) == GESTURES[5]


def test_malformed_weights_file_is_named(tmp_path):
    (tmp_path / "ensemble").mkdir()
    (tmp_path / "ensemble" / "weights.json").write_text('{"views": {"full": {}}}')
    import ensemble_seal

    ensemble_seal.write_manifest(tmp_path / "ensemble", {})  # sealed: the content itself is what is wrong
    specs = _specs(tmp_path, {"lgbm": FakeMember(0)})
    with pytest.raises(Exception, match="weights.json is not a weights file"):  # STRICT=1: an error naming it
        ensemble.Predictor(load_config({"STRICT": "1"}), specs, bundle_root=tmp_path / "bundles")
    pred = ensemble.Predictor(load_config({}), specs, bundle_root=tmp_path / "bundles")  # serving: the defaults
    assert pred.weights["full"] == {"lgbm": 1.0}
    assert "not a weights file" in pred.summary()["start_up"]["steps_left_out"]["weights"]


def test_member_bundle_path_low_memory_mode_and_fail_if_missing(tmp_path, caplog):
    """The original notebooks' switches: <M>_BUNDLE_PATH, LOAD_<M>_FOLDS_IN_MEMORY=0, FAIL_IF_<M>_MISSING=1."""
    loads: list[Path] = []

    def loader(cls):
        def load(bundle_dir, cfg):
            loads.append(Path(bundle_dir))
            return FakeMember(cls)

        return load

    elsewhere = tmp_path / "attached" / "torch_bundle"
    elsewhere.mkdir(parents=True)
    (tmp_path / "bundles" / "lgbm").mkdir(parents=True)
    specs = [ensemble.MemberSpec("lgbm", loader(0)), ensemble.MemberSpec("torch", loader(5))]
    cfg = load_config(
        {
            "TORCH_BUNDLE_PATH": str(elsewhere),
            "LOAD_TORCH_FOLDS_IN_MEMORY": "0",
            "ENSEMBLE_W_LGBM": "0.1",
            "ENSEMBLE_W_TORCH": "0.9",
        },
        out_dir=str(tmp_path),
    )
    with caplog.at_level(logging.WARNING):
        pred = ensemble.Predictor(cfg, specs, bundle_root=tmp_path / "bundles")
    assert "LOAD_TORCH_FOLDS_IN_MEMORY=0" in caplog.text
    assert loads[:2] == [tmp_path / "bundles" / "lgbm", elsewhere]  # checked once at start-up
    assert set(loads[2:]) == {elsewhere}  # then reloaded by each warm-up call
    assert isinstance(pred.members["torch"], ensemble.ReloadingMember)
    n_before = len(loads)
    assert pred.predict(make_sequence("SEQ_000001", 10), None) == GESTURES[5]
    assert loads[n_before:] == [elsewhere]  # the low-memory member reloaded its bundle inside the call
    missing = load_config({"FAIL_IF_KERAS_MISSING": "1"}, out_dir=str(tmp_path))
    specs.append(ensemble.MemberSpec("keras", loader(3)))
    with pytest.raises(ensemble.PredictorError, match="keras is required.*FAIL_IF_KERAS_MISSING.*no bundle"):
        ensemble.Predictor(missing, specs, bundle_root=tmp_path / "bundles")
    ensemble.Predictor(load_config({}, out_dir=str(tmp_path)), specs, bundle_root=tmp_path / "bundles")  # logged
