import numpy as np
import polars as pl
import pytest

import cv
from bundle import BundleError, bundle_metadata, read_metadata, write_metadata
from data import DataError, load_train, read_demographics, read_test, read_train
from io_utils import atomic_path, read_npy, write_npy
from metric import GESTURES
from schema import TRAIN_COLUMNS
from tests.factory import SHARED_CMI, demographics, make_sequence


def _write_train(tmp_path, frames, demo):
    pl.concat(frames).select(TRAIN_COLUMNS).write_csv(tmp_path / "train.csv")
    demo.write_csv(tmp_path / "train_demographics.csv")


def test_real_files_read_with_explicit_dtypes():
    test = read_test(SHARED_CMI)
    assert test.schema["thm_1"] == pl.Float32 and test.schema["tof_5_v63"] == pl.Float32
    assert test.schema["sequence_counter"] == pl.Int64
    assert read_demographics(SHARED_CMI / "train_demographics.csv").height == 81


def test_train_validation_errors_name_the_problem(tmp_path):
    demo = demographics(["SUBJ_000001"])
    seq = make_sequence("SEQ_000001", 5)
    _write_train(tmp_path, [seq], demo)
    assert load_train(tmp_path).labels.height == 1
    _write_train(tmp_path, [seq.with_columns(pl.lit("Hair pull").alias("gesture"))], demo)
    with pytest.raises(DataError, match="Hair pull"):
        read_train(tmp_path)
    _write_train(tmp_path, [seq], demographics(["SUBJ_OTHER"]))
    with pytest.raises(DataError, match="SUBJ_000001"):
        load_train(tmp_path)
    seq.drop(["acc_y", "thm_2"]).write_csv(tmp_path / "train.csv")
    with pytest.raises(DataError, match="acc_y, thm_2"):
        read_train(tmp_path)
    with pytest.raises(DataError, match="not found"):
        read_train(tmp_path / "nowhere")


def test_folds_grouped_stratified_and_reused(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    seq = np.array([f"SEQ_{i:06d}" for i in range(n)])
    subj = np.array([f"SUBJ_{i % 15:06d}" for i in range(n)])
    gest = np.array([GESTURES[i] for i in rng.integers(0, 18, n)])
    folds = cv.load_or_make_folds(tmp_path / "folds.csv", seq, subj, gest, 5, 42)
    assert folds.group_by("subject").agg(pl.col("fold").n_unique()).get_column("fold").max() == 1
    assert folds["fold"].n_unique() == 5
    again = cv.load_or_make_folds(tmp_path / "folds.csv", seq, subj, gest, 5, 999)  # reused: seed ignored
    assert cv.folds_hash(again) == cv.folds_hash(folds)
    with pytest.raises(cv.FoldsError, match="without a fold"):
        cv.load_or_make_folds(
            tmp_path / "folds.csv", np.append(seq, "SEQ_X"), np.append(subj, "S"), np.append(gest, GESTURES[0]), 5, 42
        )
    # fewer subjects than folds cannot be split by subject
    with pytest.raises(cv.FoldsError, match="cannot fill"):
        cv.make_folds(seq[:4], np.array(["A", "A", "B", "B"]), gest[:4], 5, 0)


def test_member_oof_round_trip_and_mismatch(tmp_path):
    n = 40
    seq = np.array([f"SEQ_{i:06d}" for i in range(n)])
    y = np.arange(n) % 18
    fold = np.arange(n) % 4
    p = np.eye(18)[y] * 0.9 + 0.1 / 18
    summary = cv.write_member_oof(tmp_path, "lgbm", seq, y, fold, p, p[::-1].copy(), "abc")
    assert summary["overall"]["full"] == pytest.approx(1.0)
    assert set(summary["per_fold"]) == {0, 1, 2, 3}
    oof = cv.read_member_oof(tmp_path, "lgbm")
    np.testing.assert_allclose(oof.proba_full, p, rtol=1e-6)
    assert cv.available_members(tmp_path) == ["lgbm"]
    # a second member on other folds is refused when read
    cv.write_member_oof(tmp_path, "torch", seq, y, fold, p, p, "abc")
    import json

    s = json.loads((tmp_path / "torch_summary.json").read_text())
    s["folds_hash"] = "other"
    (tmp_path / "torch_summary.json").write_text(json.dumps(s))
    with pytest.raises(cv.FoldsError, match="retrain torch"):
        cv.read_member_oof(tmp_path, "torch")
    with pytest.raises(cv.FoldsError, match="shape"):
        cv.write_member_oof(tmp_path, "keras", seq, y, fold, p[:, :17], p, "abc")


def test_bundle_metadata_checks(tmp_path):
    meta = bundle_metadata("lgbm", ["a", "b", "c"], "h1", {"cv": 0.5})
    (tmp_path / "model.txt").write_text("weights")  # a bundle without a sealed file is refused
    write_metadata(tmp_path, meta)
    assert read_metadata(tmp_path, "lgbm", ["a", "b", "c"])["cv"] == 0.5
    with pytest.raises(BundleError, match="position 1: bundle 'b' vs code 'x'"):
        read_metadata(tmp_path, "lgbm", ["a", "x", "c"])
    with pytest.raises(BundleError, match="member"):
        read_metadata(tmp_path, "torch", ["a", "b", "c"])
    with pytest.raises(BundleError, match="fold0.txt"):
        read_metadata(tmp_path, "lgbm", required_files=["fold0.txt"])
    meta["classes"] = meta["classes"][::-1]
    write_metadata(tmp_path, meta)
    with pytest.raises(BundleError, match="classes"):
        read_metadata(tmp_path, "lgbm")
    (tmp_path / "metadata.json").write_text('{"member": "lg')  # truncated
    with pytest.raises(BundleError, match="corrupt"):
        read_metadata(tmp_path, "lgbm")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.npy"
    write_npy(target, np.arange(3))
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    np.testing.assert_array_equal(read_npy(target), np.arange(3))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]
    target.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="corrupt"):
        read_npy(target)
