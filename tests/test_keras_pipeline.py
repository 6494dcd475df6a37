"""Keras member: real training on tiny models, save/load, resume, IMU-only routing, attention layer, no-TF path.

Tiny settings (filters 16/16/16, rnn 8, 1 epoch, pad_len 32, 2 folds) keep the file
well under a minute and a half on one CPU core.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import features
import keras_model as km
import keras_pipeline as kp
from config import Config
from member_base import TrainingData
from metric import GESTURES, N_CLASSES
from tests.factory import labelled_rows, labels_of

pytestmark = pytest.mark.slow  # TensorFlow start-up and graph building: seconds per test
ROOT = Path(__file__).resolve().parents[1]
N_FOLDS = 2


def tiny_cfg(out_dir: Path) -> Config:
    cfg = Config()
    cfg.run.out_dir = str(out_dir)
    cfg.run.n_threads = 1
    cfg.run.n_folds = N_FOLDS
    cfg.run.seed = 7
    cfg.run.debug = True
    cfg.features.pad_len = 32
    k = cfg.keras
    k.imu_filters, k.imu_kernels, k.tof_filters, k.rnn_units = (16, 16, 16), (7, 5, 3), (8, 8), 8
    k.debug_epochs, k.batch_size = 1, 16
    return cfg


@pytest.fixture(scope="module")
def data() -> dict:
    raw = labelled_rows(n_subjects=4, classes=(0, 3, 9), reps=3, seed=0, imu_only_every=4, min_len=20, max_len=50)
    table = features.build_frame_table(raw)
    imu_table = features.build_frame_table(features.drop_tof_thm(raw))
    y = labels_of(raw, table.sequence_ids)
    subj = table.subjects
    fold_ids = (np.searchsorted(np.unique(subj), subj) % N_FOLDS).astype(np.int64)  # grouped by subject
    return {"raw": raw, "table": table, "imu_table": imu_table, "y": y, "fold_ids": fold_ids}


@pytest.fixture(scope="module")
def trained(data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("tensorflow")
    out = tmp_path_factory.mktemp("keras_full")
    cfg = tiny_cfg(out)
    td = TrainingData(data["table"], data["imu_table"], data["y"], data["fold_ids"], "fh_a")
    summary = kp.KerasPipeline().train(td, cfg, out)
    return {"out": out, "cfg": cfg, "summary": summary}


@pytest.fixture(scope="module")
def member(trained: dict):  # type: ignore[no-untyped-def]
    return kp.load_member(trained["out"] / "bundles" / "keras", trained["cfg"])


# --------------------------------------------------------------------------- training + bundle


def test_train_writes_bundle_and_oof(trained: dict, data: dict) -> None:
    out = trained["out"]
    b = out / "bundles" / "keras"
    names = sorted(p.name for p in b.iterdir())
    assert names == sorted(
        ["config.json", "metadata.json"] + [f"fold{k}_{v}.keras" for k in range(N_FOLDS) for v in ("full", "imu")]
    )
    meta = json.loads((b / "metadata.json").read_text())
    assert meta["pad_len"] == 32 and meta["pad_side"] == "left" and meta["folds_hash"] == "fh_a"
    assert meta["feature_names"] == list(features.FRAME_FEATURES) and meta["classes"] == list(GESTURES)
    assert set(meta["scalers"]) == {str(k) for k in range(N_FOLDS)}
    # The stored scaler is the training-fold one, not refitted on everything.
    sc0 = features.fit_scaler(data["table"], np.flatnonzero(data["fold_ids"] != 0))
    np.testing.assert_allclose(meta["scalers"]["0"]["mean"], sc0.mean, rtol=1e-6)
    full = np.load(out / "oof" / "oof_keras_proba.npy")
    imu = np.load(out / "oof" / "oof_keras_imu_proba.npy")
    assert full.shape == imu.shape == (data["table"].n_sequences, N_CLASSES)
    np.testing.assert_allclose(full.sum(1), 1.0, atol=1e-4)
    assert not (out / "bundles" / f".{kp.MEMBER}_work").exists()  # work folder removed once bundle + OOF exist
    assert trained["summary"]["member"] == "keras"


def test_save_load_round_trip_identical(trained: dict, data: dict, member) -> None:  # type: ignore[no-untyped-def]
    """Each loaded fold model reproduces the OOF rows its in-memory twin wrote before saving."""
    tf = pytest.importorskip("tensorflow")
    assert member.classes_ == tuple(GESTURES) and member.feature_names_ == tuple(features.FRAME_FEATURES)
    table, fold_ids = data["table"], data["fold_ids"]
    oof = np.load(trained["out"] / "oof" / "oof_keras_proba.npy")
    # OOF files are in sorted sequence-id order; the table is sorted too.
    imu_idx, tof_idx = kp._channel_index()
    for k in range(N_FOLDS):
        va = np.flatnonzero(fold_ids == k)
        x, m = features.pad_batch(table, va, member.pad_len, member.scalers[k])
        fn = kp._make_infer_fn(
            tf,
            [member.full_models[k]],
            [member.imu_models[k]],
            member.pad_len,
            len(imu_idx),
            len(tof_idx),
            compiled=False,
        )  # as in training
        p = fn.route(x[None], m, table.has_tof_thm[va], imu_idx, tof_idx)
        np.testing.assert_allclose(p, oof[va], rtol=0, atol=1e-6)
    # Whole-member predictions: deterministic, and equal to the slow reload-per-call path.
    p1 = member.predict_proba(table)
    p2 = member.predict_proba(table)
    np.testing.assert_array_equal(p1, p2)
    p3 = kp.KerasPipeline().predict_proba_reload_per_call(trained["out"] / "bundles" / "keras", table, trained["cfg"])
    np.testing.assert_allclose(p1, p3, atol=1e-5)
    assert p1.shape == (table.n_sequences, N_CLASSES)
    # One sequence at a time (the serving path) gives the batch answer.
    one = member.predict_proba(table.select([3]))
    np.testing.assert_allclose(one[0], p1[3], atol=1e-5)


def test_imu_only_sequences_use_light_models(data: dict, member) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorflow")
    table, imu_table = data["table"], data["imu_table"]
    assert (~table.has_tof_thm).any() and table.has_tof_thm.any() and not imu_table.has_tof_thm.any()
    p = member.predict_proba(table)
    imu_idx = features.feature_index(features.IMU_FEATURES)
    direct = np.zeros_like(p)
    for k, sc in enumerate(member.scalers):  # call every fold's light model directly and average
        x, m = features.pad_batch(table, None, member.pad_len, sc)
        direct += np.asarray(member.imu_models[k]([x[..., imu_idx], m.astype(np.float32)], training=False))
    direct /= member.n_folds
    no_tof = ~table.has_tof_thm
    np.testing.assert_allclose(p[no_tof], direct[no_tof], atol=1e-5)
    assert np.abs(p[~no_tof] - direct[~no_tof]).max() > 1e-4  # full-sensor rows went to the full models
    # Removing thm/tof from a full-sensor sequence sends it to the light models.
    p_imu = member.predict_proba(imu_table)
    np.testing.assert_allclose(p_imu, direct, atol=1e-5)


def test_bundle_mismatch_is_refused(trained: dict, tmp_path: Path) -> None:
    import shutil

    import bundle

    b = tmp_path / "keras"
    shutil.copytree(trained["out"] / "bundles" / "keras", b)
    meta = json.loads((b / "metadata.json").read_text())
    meta["keras_format"] = 999
    (b / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(bundle.BundleError, match="format"):
        kp.load_member(b, trained["cfg"])


def test_fit_runs_as_graph_above_the_eager_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Real training runs compile a graph (only tiny runs go eager); one tiny epoch checks that path."""
    pytest.importorskip("tensorflow")
    cfg = tiny_cfg(tmp_path)
    keras, tf = kp._keras(cfg), kp._tf()
    monkeypatch.setattr(kp, "EAGER_MAX_STEPS", 0)
    args = kp.model_args(cfg, len(features.IMU_FEATURES), len(features.TOFTHM_FEATURES), 32)
    keras.utils.set_random_seed(0)
    model = kp.build_imu_model(args)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 32, len(features.IMU_FEATURES))).astype(np.float32)
    m = np.ones((20, 32), np.float32)
    y = np.arange(20) % N_CLASSES
    with caplog.at_level(logging.INFO, logger="keras_pipeline"):
        rec = kp._fit(keras, tf, model, (x, m), y, (x[:8], m[:8]), y[:8], cfg, 0, "graph test")
    assert rec["eager"] is False and rec["epochs_run"] == 1 and np.isfinite(rec["final_val_loss"])
    line = next(r.getMessage() for r in caplog.records if "graph test epoch 1" in r.getMessage())
    assert np.isfinite(float(line.rsplit("lr ", 1)[1]))  # the schedule's rate, not a missing log key


# --------------------------------------------------------------------------- custom layers


def test_attention_layer_serialisation_and_mask(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    kp._tf(tmp_path, 1)
    import keras

    layers = km._custom_layers()
    Att = layers["MaskedTemporalAttention"]
    att = Att(units=5, name="att")
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 10, 6)).astype(np.float32)
    mask = np.zeros((2, 10), dtype=bool)
    mask[0, 4:] = True  # 6 real steps, front-padded
    mask[1, 7:] = True
    out = np.asarray(att([h, mask]))
    # Garbage in padded steps changes nothing.
    h2 = h.copy()
    h2[~mask] = 1e3
    np.testing.assert_allclose(np.asarray(att([h2, mask])), out, atol=1e-5)
    # Same as attending over the real steps alone; a float (B, T, 1) mask (after pooling) works too.
    np.testing.assert_allclose(np.asarray(att([h[:1, 4:], np.ones((1, 6), bool)])), out[:1], atol=1e-5)
    np.testing.assert_allclose(np.asarray(att([h, mask[..., None].astype(np.float32)])), out, atol=1e-6)
    # Config round trip, and the registered name survives Keras serialisation.
    cfg = att.get_config()
    assert cfg["units"] == 5 and cfg["name"] == "att"
    clone = Att.from_config(cfg)
    clone.build([(None, 10, 6), (None, 10)])
    clone.set_weights(att.get_weights())
    np.testing.assert_allclose(np.asarray(clone([h, mask])), out, atol=1e-6)
    assert keras.saving.get_registered_name(Att) == "cmi>MaskedTemporalAttention"
    ser = keras.saving.serialize_keras_object(att)
    again = keras.saving.deserialize_keras_object(ser)
    assert isinstance(again, Att) and again.units == 5
    # MaskedMean averages real steps only.
    mm = layers["MaskedMean"]()
    np.testing.assert_allclose(np.asarray(mm([h, mask]))[0], h[0, 4:].mean(0), atol=1e-5)


def test_models_build_with_pooled_mask(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    cfg = tiny_cfg(tmp_path)
    kp._keras(cfg)
    imu_n, tof_n = len(features.IMU_FEATURES), len(features.TOFTHM_FEATURES)
    args = kp.model_args(cfg, imu_n, tof_n, 32)
    full, light = kp.build_full_model(args), kp.build_imu_model(args)
    assert [tuple(i.shape) for i in full.inputs] == [(None, 32, imu_n), (None, 32, tof_n), (None, 32)]
    assert [tuple(i.shape) for i in light.inputs] == [(None, 32, imu_n), (None, 32)]
    assert full.count_params() > light.count_params()
    # Output ignores what sits in padded steps (the mask follows the pooling).
    rng = np.random.default_rng(1)
    xi = rng.normal(size=(2, 32, imu_n)).astype(np.float32)
    m = np.zeros((2, 32), np.float32)
    m[:, 16:] = 1.0
    xi[:, :16] = 0.0
    p = np.asarray(light([xi, m], training=False))
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- without TensorFlow


def test_is_available_false_without_tensorflow(data: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    monkeypatch.setattr(km, "_TF", None)
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` raise ImportError
    for out_dir in (None, tmp_path):  # the cheap check, and the real import
        ok, why = kp.is_available(out_dir)
        assert ok is False and "tensorflow" in why.lower(), why
    td = TrainingData(data["table"], data["imu_table"], data["y"], data["fold_ids"], "h")
    with pytest.raises(RuntimeError, match="cannot be trained.*TensorFlow"):
        kp.KerasPipeline().train(td, Config(), tmp_path)


def test_module_imports_without_tensorflow(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
        "import keras_pipeline as kp\n"
        "ok, why = kp.is_available()\n"
        "assert ok is False, why\n"
        "ok, why = kp.is_available('unused_out')\n"
        "assert ok is False, why\n"
        "assert 'tensorflow' not in sys.modules or sys.modules['tensorflow'] is None\n"
        "print('OK', why)\n"
    )
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "kh")}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK")


def test_keras_home_inside_output_folder(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    code = (
        "import os, sys\n"
        "import keras_pipeline as kp\n"
        f"ok, why = kp.is_available({str(tmp_path / 'out')!r})\n"
        "assert ok, why\n"
        "print(os.environ['KERAS_HOME'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_HOME"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    home = Path(res.stdout.strip().splitlines()[-1])
    assert home == (tmp_path / "out" / ".keras_home").resolve()
    assert (home / "keras.json").exists()  # Keras wrote its settings there, not in ~/.keras
