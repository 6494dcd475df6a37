"""LightGBM member: classifier contract, CV training, bundle round trip and checks, IMU-only routing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import bundle
import cv
import features
import lgbm_pipeline as lp
from config import Config
from member_base import TrainingData
from metric import GESTURES, N_CLASSES, score_proba
from tests.factory import SHARED_CMI, labels_of

pytestmark = pytest.mark.slow  # trains on generated subjects; the member contract runs quickly in test_members

pytest.importorskip("lightgbm")

N_FOLDS = 3
# The competition score of random guesses over 18 balanced classes is ~0.28 (max 0.33 over 50 draws).
CHANCE = 0.33


def small_cfg() -> Config:
    cfg = Config()
    cfg.run.n_threads = 1  # the test machine is shared
    cfg.run.debug = True
    cfg.run.n_folds = N_FOLDS
    cfg.lgbm.debug_n_estimators = 40
    cfg.lgbm.num_leaves = 7
    cfg.lgbm.min_child_samples = 3
    cfg.lgbm.early_stopping_rounds = 10
    cfg.lgbm.learning_rate = 0.2
    return cfg


def _source() -> tuple[pl.DataFrame, pl.DataFrame | None, pl.DataFrame | None, pl.DataFrame | None]:
    """(train rows, train demographics, test rows, test demographics) of three generated subjects."""
    from tools import synth

    ds = synth.generate(n_subjects=3, seed=0)
    return ds.train, ds.train_demographics, ds.test, ds.test_demographics


@pytest.fixture(scope="module")
def data() -> dict:
    raw, demo, test_raw, test_demo = _source()
    cfg = small_cfg()
    table = features.build_frame_table(raw, demo, cfg.features)
    imu_table = features.build_frame_table(features.drop_tof_thm(raw), demo, cfg.features)
    y = labels_of(raw, table.sequence_ids)
    folds = cv.make_folds(table.sequence_ids, table.subjects, y, N_FOLDS, cfg.run.seed)
    return {
        "raw": raw,
        "demo": demo,
        "test_raw": test_raw,
        "test_demo": test_demo,
        "cfg": cfg,
        "table": table,
        "imu_table": imu_table,
        "y": y,
        "fold_ids": cv.fold_array(folds, table.sequence_ids),
        "folds_hash": cv.folds_hash(folds),
    }


@pytest.fixture(scope="module")
def trained(data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("lgbm_out")
    td = TrainingData(data["table"], data["imu_table"], data["y"], data["fold_ids"], data["folds_hash"])
    summary = lp.LGBMPipeline().train(td, data["cfg"], out)
    return {"out": out, "summary": summary, "bundle": out / "bundles" / lp.MEMBER}


# ---- the classifier ---------------------------------------------------------------------------


def test_is_available() -> None:
    ok, why = lp.is_available()
    assert ok and "lightgbm" in why


def test_classifier_global_columns_and_absent_classes_zero(data: dict) -> None:
    cfg = data["cfg"]
    X, names = features.sequence_aggregates(data["table"], cfg.features)
    y = data["y"]
    # keep three classes only, with gaps in the global order
    keep = np.isin(y, [1, 3, 4])
    model = lp.LGBMSequenceClassifier(lp.params_from_config(cfg), 7).fit(X[keep], y[keep], feature_names=names)
    proba = model.predict_proba(X)
    assert proba.shape == (len(X), N_CLASSES)
    assert model.classes_ == GESTURES
    assert model.feature_names_ == names
    assert model.booster_ is not None
    absent = [i for i in range(N_CLASSES) if i not in (1, 3, 4)]
    assert np.all(proba[:, absent] == 0.0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert set(np.unique(model.predict(X))) <= {1, 3, 4}
    # the remap puts each class in its own global column: it learns them where they are
    assert (model.predict(X[keep]) == y[keep]).mean() > 0.9


def test_classifier_learns_separable_task_and_early_stops(data: dict) -> None:
    cfg = data["cfg"]
    X, names = features.sequence_aggregates(data["table"], cfg.features)
    y, folds = data["y"], data["fold_ids"]
    tr, va = folds != 0, folds == 0
    params = lp.params_from_config(cfg) | {"n_estimators": 500}
    model = lp.LGBMSequenceClassifier(params, 1).fit(X[tr], y[tr], X[va], y[va], feature_names=names)
    assert model.best_iteration_ < 500  # early stopping on the validation fold ended it
    score = score_proba(y[va], model.predict_proba(X[va]))
    # "learns" = clearly above the same model trained on shuffled labels (one validation subject: a fixed bar
    # above chance would be a property of the generated draw, not of the model)
    shuffled = np.random.default_rng(0).permutation(y[tr])
    blind = lp.LGBMSequenceClassifier(params, 1).fit(X[tr], shuffled, X[va], y[va], feature_names=names)
    blind_score = score_proba(y[va], blind.predict_proba(X[va]))
    assert score > CHANCE + 0.15 and score > blind_score + 0.15, (score, blind_score)


def test_classifier_is_deterministic(data: dict) -> None:
    cfg = data["cfg"]
    X, names = features.sequence_aggregates(data["table"], cfg.features)
    a = lp.LGBMSequenceClassifier(lp.params_from_config(cfg), 3).fit(X, data["y"], feature_names=names)
    b = lp.LGBMSequenceClassifier(lp.params_from_config(cfg), 3).fit(X, data["y"], feature_names=names)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


def test_classifier_rejects_bad_input(data: dict) -> None:
    cfg = data["cfg"]
    X, _ = features.sequence_aggregates(data["table"], cfg.features)
    model = lp.LGBMSequenceClassifier(lp.params_from_config(cfg), 0)
    with pytest.raises(ValueError, match="at least 2"):
        model.fit(X, np.zeros(len(X), dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):
        model.fit(X, np.full(len(X), 18))
    model.fit(X, data["y"])
    with pytest.raises(ValueError, match="columns"):
        model.predict_proba(X[:, :-1])


def test_params_follow_config() -> None:
    cfg = small_cfg()
    p = lp.params_from_config(cfg)
    assert p["n_estimators"] == cfg.lgbm.debug_n_estimators
    assert p["num_threads"] == 1 and p["deterministic"] is True
    cfg.run.debug = False
    assert lp.params_from_config(cfg)["n_estimators"] == cfg.lgbm.n_estimators


# ---- CV training, OOF and bundle ------------------------------------------------------------


def test_train_member_writes_oof_and_bundle(data: dict, trained: dict) -> None:
    out, table = trained["out"], data["table"]
    oof = cv.read_member_oof(out / "oof", lp.MEMBER)
    n = table.n_sequences
    assert oof.proba_full.shape == (n, N_CLASSES) and oof.proba_imu.shape == (n, N_CLASSES)
    order = np.argsort(table.sequence_ids)
    np.testing.assert_array_equal(oof.sequence_ids, table.sequence_ids[order])
    np.testing.assert_array_equal(oof.y_true, data["y"][order])
    np.testing.assert_allclose(oof.proba_full.sum(axis=1), 1.0, atol=1e-5)
    # generated data, one held-out subject per fold: both views clearly above chance
    assert trained["summary"]["overall"]["full"] > CHANCE + 0.2
    assert trained["summary"]["overall"]["imu_only"] > CHANCE + 0.15
    b = trained["bundle"]
    for k in range(N_FOLDS):
        assert (b / f"fold{k}_full.txt").is_file() and (b / f"fold{k}_imu.txt").is_file()
    assert not list(b.glob("*.pkl")) and not list(b.glob("*.pickle"))
    meta = json.loads((b / "metadata.json").read_text())
    assert meta["classes"] == list(GESTURES)
    assert meta["feature_names"] == features.aggregate_feature_names(False)
    assert meta["feature_names_imu"] == features.aggregate_feature_names(True)
    assert meta["folds_hash"] == data["folds_hash"]
    assert len(meta["models"]) == 2 * N_FOLDS
    assert all(m["present_classes"] == sorted(set(data["y"].tolist())) for m in meta["models"])
    assert (b / "config.json").is_file()
    imp = pl.read_csv(b / "importance_full.csv")
    assert imp.columns[:2] == ["feature", "gain_mean"]
    assert sorted(imp["feature"].to_list()) == sorted(meta["feature_names"])
    assert imp["gain_mean"].to_list() == sorted(imp["gain_mean"].to_list(), reverse=True)


def test_bundle_round_trip_reproduces_oof(data: dict, trained: dict) -> None:
    """Each loaded fold answers its validation rows exactly as during training (OOF)."""
    member = lp.load_member(trained["bundle"], data["cfg"])
    assert member.classes_ == GESTURES
    assert member.feature_names_ == features.aggregate_feature_names(False)
    assert member.n_folds == N_FOLDS
    oof = cv.read_member_oof(trained["out"] / "oof", lp.MEMBER)
    pos = {s: i for i, s in enumerate(oof.sequence_ids)}
    for view, table, stored in (("full", data["table"], oof.proba_full), ("imu", data["imu_table"], oof.proba_imu)):
        for k in range(N_FOLDS):
            va = np.flatnonzero(data["fold_ids"] == k)
            got = member.predict_proba(table.select(va), folds=[k])
            want = stored[[pos[s] for s in table.sequence_ids[va]]]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{view} fold {k}")
    # all folds averaged; loading twice gives identical answers
    p1 = member.predict_proba(data["table"])
    p2 = lp.load_member(trained["bundle"], data["cfg"]).predict_proba(data["table"])
    assert p1.shape == (data["table"].n_sequences, N_CLASSES)
    np.testing.assert_array_equal(p1, p2)


def test_classifier_save_load_identical(data: dict, tmp_path: Path) -> None:
    import lightgbm

    cfg = data["cfg"]
    X, names = features.sequence_aggregates(data["table"], cfg.features)
    y, folds = data["y"], data["fold_ids"]
    model = lp.LGBMSequenceClassifier(lp.params_from_config(cfg), 5).fit(
        X[folds != 1], y[folds != 1], X[folds == 1], y[folds == 1], feature_names=names
    )
    model.save_model(tmp_path / "m.txt")
    loaded = lp.LGBMSequenceClassifier.from_booster(
        lightgbm.Booster(model_file=str(tmp_path / "m.txt")), model.present_classes_
    )
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))


# ---- mismatch errors ------------------------------------------------------------------------


def _tampered_copy(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    meta = json.loads((dst / "metadata.json").read_text())
    edit(meta)
    (dst / "metadata.json").write_text(json.dumps(meta))
    return dst


def test_load_rejects_tampered_imu_feature_list(data: dict, trained: dict, tmp_path: Path) -> None:
    b = _tampered_copy(trained["bundle"], tmp_path / "b", lambda m: m["feature_names_imu"].pop())
    with pytest.raises(bundle.BundleError, match="feature_names_imu"):
        lp.load_member(b, data["cfg"])


def test_load_rejects_booster_with_other_features(data: dict, trained: dict, tmp_path: Path) -> None:
    import shutil

    b = tmp_path / "b"
    shutil.copytree(trained["bundle"], b)
    # a booster trained on the IMU view dropped where the full one belongs
    shutil.copy(b / "fold1_imu.txt", b / "fold1_full.txt")
    with pytest.raises(bundle.BundleError, match=r"fold1_full\.txt is corrupt"):  # caught by the file digests
        lp.load_member(b, data["cfg"])
    meta = json.loads((b / "metadata.json").read_text())
    meta.pop("files")
    bundle.write_metadata(b, meta)  # resealed: the booster's own feature check must still catch it
    with pytest.raises(bundle.BundleError, match=r"fold1_full\.txt.*feature"):
        lp.load_member(b, data["cfg"])


def test_load_rejects_corrupt_model_file(data: dict, trained: dict, tmp_path: Path) -> None:
    import shutil

    b = tmp_path / "b"
    shutil.copytree(trained["bundle"], b)
    (b / "fold0_full.txt").write_text("not a model\n")
    with pytest.raises(bundle.BundleError, match=r"fold0_full\.txt"):
        lp.load_member(b, data["cfg"])


# ---- routing --------------------------------------------------------------------------------


def test_imu_only_sequences_get_the_imu_models_answer(data: dict, trained: dict) -> None:
    cfg, raw = data["cfg"], data["raw"]
    member = lp.load_member(trained["bundle"], cfg)
    seq = sorted(raw["sequence_id"].unique().to_list())[:4]
    one = raw.filter(pl.col("sequence_id").is_in(seq))
    # two sequences keep their thm/tof, two lose them: one mixed table, as in the hidden test
    imu_ids = seq[:2]
    mixed = pl.concat(
        [
            features.drop_tof_thm(one.filter(pl.col("sequence_id").is_in(imu_ids))),
            one.filter(~pl.col("sequence_id").is_in(imu_ids)),
        ]
    )
    table = features.build_frame_table(mixed, data["demo"], cfg.features)
    assert table.has_tof_thm.tolist() == [s not in imu_ids for s in table.sequence_ids]
    got = member.predict_proba(table)

    X_imu, _ = features.sequence_aggregates(table, cfg.features, imu_only=True)
    X_full, _ = features.sequence_aggregates(table, cfg.features)
    imu_answer = np.mean([m.predict_proba(X_imu) for m in member.imu_models], axis=0)
    full_answer = np.mean([m.predict_proba(X_full) for m in member.full_models], axis=0)
    route = ~table.has_tof_thm
    np.testing.assert_allclose(got[route], imu_answer[route], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[~route], full_answer[~route], rtol=0, atol=1e-12)
    assert not np.allclose(imu_answer[route], full_answer[route])  # the routing matters

    # one sequence at a time (as predict() calls it) gives the same answer as the batch
    single = member.predict_proba(
        features.build_frame_table(mixed.filter(pl.col("sequence_id") == imu_ids[0]), data["demo"], cfg.features)
    )
    np.testing.assert_allclose(single[0], got[list(table.sequence_ids).index(imu_ids[0])], rtol=0, atol=1e-12)


def test_load_rejects_other_feature_settings(data: dict, trained: dict) -> None:
    cfg = small_cfg()
    cfg.features.tail_fraction = 0.25  # same names, different values: must not load silently
    with pytest.raises(bundle.BundleError, match="tail_fraction"):
        lp.load_member(trained["bundle"], cfg)


# ---- the real file format -------------------------------------------------------------------

REAL = SHARED_CMI


@pytest.mark.skipif(not (REAL / "test.csv").is_file(), reason="real sample files not present")
def test_member_predicts_real_test_rows(data: dict, trained: dict) -> None:
    import data as data_io

    member = lp.load_member(trained["bundle"], data["cfg"])
    raw = data_io.read_test(REAL)
    demo = data_io.read_demographics(REAL / "test_demographics.csv")
    table = features.build_frame_table(raw, demo, data["cfg"].features)
    proba = member.predict_proba(table)
    assert proba.shape == (2, N_CLASSES)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    # the same rows with thm/tof removed go through the IMU models
    imu = features.build_frame_table(features.drop_tof_thm(raw), demo, data["cfg"].features)
    assert not imu.has_tof_thm.any()
    X_imu, _ = features.sequence_aggregates(imu, data["cfg"].features, imu_only=True)
    want = np.mean([m.predict_proba(X_imu) for m in member.imu_models], axis=0)
    np.testing.assert_allclose(member.predict_proba(imu), want, rtol=0, atol=1e-12)


def test_generated_test_set_half_imu_only(data: dict, trained: dict) -> None:
    """The generator's test set mixes full and IMU-only sequences, as the hidden test does."""
    if data["test_raw"] is None:
        pytest.skip("the generator made no test set")
    cfg = data["cfg"]
    member = lp.load_member(trained["bundle"], cfg)
    table = features.build_frame_table(data["test_raw"], data["test_demo"], cfg.features)
    assert 0 < table.has_tof_thm.sum() < table.n_sequences
    proba = member.predict_proba(table)
    assert proba.shape == (table.n_sequences, N_CLASSES)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    route = ~table.has_tof_thm
    X_imu, _ = features.sequence_aggregates(table.select(np.flatnonzero(route)), cfg.features, imu_only=True)
    want = np.mean([m.predict_proba(X_imu) for m in member.imu_models], axis=0)
    np.testing.assert_allclose(proba[route], want, rtol=0, atol=1e-12)
