"""Torch member: masking through pooling, the input path, training, bundle round trip, device helpers."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

import bundle
import features
import metric
import torch_pipeline as tp
from config import Config
from member_base import TrainingData
from tests.factory import imu_separable_rows, labels_of

pytestmark = pytest.mark.slow  # trains networks for tens of epochs; the member contract runs quickly in test_members

torch.set_num_threads(1)

CLASSES = (0, 1, 8)  # two target gestures and one non-target: the metric sees both kinds


def tiny_cfg(tmp: Path | None = None, epochs: int = 30) -> Config:
    cfg = Config()
    cfg.run.n_threads = 1
    cfg.run.seed = 7
    t = cfg.torch
    t.conv1_channels, t.conv2_channels, t.rnn_hidden, t.head_hidden = 16, 32, 16, 32
    t.epochs, t.batch_size, t.lr, t.dropout = epochs, 8, 5e-3, 0.1
    t.modality_dropout, t.time_mask_prob, t.channel_dropout_prob = 0.5, 0.2, 0.05
    if tmp is not None:
        cfg.run.out_dir = str(tmp)
    return cfg


def left_padded(lengths: list[int], length: int, n_channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), length, n_channels, generator=g)
    mask = torch.zeros(len(lengths), length, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, length - n :] = True
    return x * mask[:, :, None], mask


def small_net(n_channels: int = 6, seed: int = 0) -> tp.TimeSeriesNet:
    torch.manual_seed(seed)
    net = tp.TimeSeriesNet(n_channels, conv1=8, conv2=16, rnn_hidden=8, head_hidden=16, dropout=0.0)
    # Non-trivial BatchNorm statistics so that padding handled wrongly would show.
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


LENGTHS = [37, 36, 33, 9, 5, 2, 1]  # odd and even, down to one step


# ----------------------------------------------------------------------------- mask through pooling


def test_padded_steps_get_no_attention_weight():
    net = small_net()
    x, mask = left_padded(LENGTHS, 37, 6)
    with torch.no_grad():
        _, weights, pooled = net.forward_with_attention(x, mask)
    # two max-pools of 2 with ceil: a pooled step is real if any of its inputs was
    expected = torch.tensor([math.ceil(math.ceil(n / 2) / 2) for n in LENGTHS])
    assert torch.equal(pooled.sum(dim=1), expected)
    assert torch.all(weights[~pooled] == 0)
    assert torch.allclose(weights.sum(dim=1), torch.ones(len(LENGTHS)))
    assert torch.all(weights[pooled] > 0)


def test_output_ignores_pad_contents():
    net = small_net()
    x, mask = left_padded(LENGTHS, 40, 6)
    garbage = x.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), 6) * 100 + 50
    with torch.no_grad():
        assert torch.allclose(net(x, mask), net(garbage, mask), atol=1e-6)


def test_left_and_right_padding_give_same_logits():
    net = small_net()
    x, mask = left_padded(LENGTHS, 40, 6)
    x_right, mask_right = torch.zeros_like(x), torch.zeros_like(mask)
    for i, n in enumerate(LENGTHS):
        x_right[i, :n] = x[i, 40 - n :]
        mask_right[i, :n] = True
    with torch.no_grad():
        assert torch.allclose(net(x, mask), net(x_right, mask_right), atol=1e-5)


def test_pad_length_does_not_change_logits():
    """The predictor trims padding no sequence of a chunk uses; that must not change the output."""
    net = small_net()
    x, mask = left_padded([13, 8], 50, 6)
    with torch.no_grad():
        full = net(x, mask)
        trimmed = net(x[:, -13:], mask[:, -13:])
        single = net(x[1:, -8:], mask[1:, -8:])
    assert torch.allclose(full, trimmed, atol=1e-5)
    assert torch.allclose(full[1:], single, atol=1e-5)


def test_real_values_do_change_logits():
    """Guard against a network that ignores its input altogether (would pass the invariance tests)."""
    net = small_net()
    x, mask = left_padded([20, 20], 24, 6)
    with torch.no_grad():
        out = net(x, mask)
    assert not torch.allclose(out[0], out[1], atol=1e-4)


# ----------------------------------------------------------------------------- input path


@pytest.fixture(scope="module")
def tables() -> tuple[features.FrameTable, features.FrameTable, np.ndarray, pl.DataFrame]:
    raw = imu_separable_rows(CLASSES, n_per_class=30, n_subjects=4, seed=1)
    table = features.build_frame_table(raw)
    imu_table = features.build_frame_table(features.drop_tof_thm(raw))
    return table, imu_table, labels_of(raw, table.sequence_ids), raw


def test_fold_arrays_keep_the_tail_and_scale_both_views(tables):
    table, imu_table, y, _ = tables
    idx = np.array([0, 1, 2])
    scaler = features.fit_scaler(table, np.arange(10))
    pad_len = int(table.lengths[idx].min()) - 3  # every chosen sequence is longer: the start is cut
    arr = tp.build_fold_arrays(table, imu_table, idx, y, pad_len, scaler)
    assert arr.x_full.shape == (3, pad_len, len(features.FRAME_FEATURES))
    assert bool(arr.mask.all())
    for row, i in enumerate(idx):
        tail = table.sequence(int(i))[-pad_len:]
        np.testing.assert_allclose(arr.x_full[row].numpy(), scaler.transform(tail), rtol=1e-6, atol=1e-6)
        imu_tail = imu_table.sequence(int(i))[-pad_len:]
        np.testing.assert_allclose(arr.x_imu[row].numpy(), scaler.transform(imu_tail), rtol=1e-6, atol=1e-6)
    assert torch.equal(arr.y, torch.from_numpy(y[idx]))
    imu_cols = features.feature_index(features.IMU_FEATURES)
    tof_cols = features.feature_index(features.TOFTHM_FEATURES)
    assert torch.allclose(arr.x_full[:, :, imu_cols], arr.x_imu[:, :, imu_cols])
    assert not torch.allclose(arr.x_full[:, :, tof_cols], arr.x_imu[:, :, tof_cols])

    long = tp.build_fold_arrays(table, imu_table, idx, y, 100, scaler)  # shorter than pad: front padding
    n0 = int(table.lengths[0])
    assert not long.mask[0, : 100 - n0].any() and long.mask[0, 100 - n0 :].all()
    assert torch.all(long.x_full[0, : 100 - n0] == 0)


def test_augment_batch_modality_dropout_and_masks(tables):
    table, imu_table, y, _ = tables
    scaler = features.fit_scaler(table)
    arr = tp.build_fold_arrays(table, imu_table, np.arange(8), y, 64, scaler)
    cfg = tiny_cfg()
    t = cfg.torch
    t.modality_dropout, t.time_mask_prob, t.channel_dropout_prob = 1.0, 0.0, 0.0
    assert torch.equal(tp.augment_batch(arr.x_full, arr.x_imu, arr.mask, cfg), arr.x_imu)
    t.modality_dropout = 0.0
    assert torch.equal(tp.augment_batch(arr.x_full, arr.x_imu, arr.mask, cfg), arr.x_full)
    t.time_mask_prob = 1.0
    out = tp.augment_batch(arr.x_full, arr.x_imu, arr.mask, cfg, torch.Generator().manual_seed(0))
    changed = (out != arr.x_full).any(dim=2)
    assert changed.any(dim=1).all()  # every sample got a span
    assert not (changed & ~arr.mask).any()  # never on padding
    t.modality_dropout = 0.5
    t.time_mask_prob = 0.0
    swapped = tp.augment_batch(arr.x_full, arr.x_imu, arr.mask, cfg, torch.Generator().manual_seed(3))
    per_sample = [torch.equal(swapped[i], arr.x_imu[i]) for i in range(8)]
    assert any(per_sample) and not all(per_sample)


# ----------------------------------------------------------------------------- training, OOF, bundle


@pytest.fixture(scope="module")
def trained(tables, tmp_path_factory):
    table, imu_table, y, raw = tables
    out = tmp_path_factory.mktemp("torch_out")
    cfg = tiny_cfg(out)
    fold_ids = np.array([int(s[-1]) % 2 for s in table.subjects])  # subject-grouped, 2 folds
    summary = tp.TorchPipeline().train(TrainingData(table, imu_table, y, fold_ids, "hash123"), cfg, out)
    return {
        "summary": summary,
        "out": out,
        "cfg": cfg,
        "fold_ids": fold_ids,
        "table": table,
        "imu_table": imu_table,
        "y": y,
        "raw": raw,
    }


def test_tiny_model_learns_a_separable_task(trained):
    overall = trained["summary"]["overall"]
    # 3 balanced classes: chance is ~0.35 on this metric; the classes are plain in the accelerometer
    assert overall["full"] > 0.85, overall
    assert overall["imu_only"] > 0.85, overall


def test_oof_files_have_the_right_shapes(trained):
    oof = trained["out"] / "oof"
    n = trained["table"].n_sequences
    full = np.load(oof / "oof_torch_proba.npy")
    imu = np.load(oof / "oof_torch_imu_proba.npy")
    assert full.shape == imu.shape == (n, metric.N_CLASSES)
    np.testing.assert_allclose(full.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(imu.sum(axis=1), 1.0, atol=1e-5)
    assert np.load(oof / "y_true.npy").shape == (n,)
    summary = json.loads((oof / "torch_summary.json").read_text())
    assert summary["folds_hash"] == "hash123" and set(summary["per_fold"]) == {"0", "1"}


def test_bundle_layout_and_metadata(trained):
    bdir = trained["out"] / "bundles" / "torch"
    assert {p.name for p in bdir.iterdir()} == {"fold0.pt", "fold1.pt", "metadata.json", "config.json"}
    checkpoint = torch.load(bdir / "fold0.pt", weights_only=True)
    assert checkpoint["model_args"]["conv1"] == 16  # the checkpoint carries its constructor arguments
    assert not any(k.startswith("module.") for k in checkpoint["state_dict"])
    meta = json.loads((bdir / "metadata.json").read_text())
    assert meta["feature_names"] == list(features.FRAME_FEATURES)
    assert meta["classes"] == list(metric.GESTURES)
    assert meta["pad_side"] == "left" and meta["folds_hash"] == "hash123"
    assert meta["epochs"] == {"0": tp.epochs_for(trained["cfg"]), "1": tp.epochs_for(trained["cfg"])}
    assert meta["model_args"]["conv1"] == 16 and meta["torch_version"] == torch.__version__
    table, train_idx = trained["table"], np.flatnonzero(trained["fold_ids"] != 0)
    expected = features.fit_scaler(table, train_idx).to_dict()  # fold 0's scaler: its training rows only
    np.testing.assert_allclose(meta["scalers"]["0"]["mean"], expected["mean"], rtol=1e-6)
    assert json.loads((bdir / "config.json").read_text())["torch"]["epochs"] == 30


def test_bundle_round_trip_reproduces_oof(trained):
    """Fold k reloaded from disk gives exactly its OOF probabilities on fold k (both views)."""
    member = tp.load_member(trained["out"] / "bundles" / "torch", trained["cfg"])
    assert member.classes_ == metric.GESTURES and member.feature_names_ == features.FRAME_FEATURES
    full = np.load(trained["out"] / "oof" / "oof_torch_proba.npy")  # rows sorted by sequence id, as the table
    imu = np.load(trained["out"] / "oof" / "oof_torch_imu_proba.npy")
    for k in (0, 1):
        single = tp.TorchMember(
            [member.models[k]],
            [member.scalers[k]],
            [member.pad_lens[k]],
            member.feature_names_,
            member.device,
            False,
            member.metadata,
        )
        val = np.flatnonzero(trained["fold_ids"] == k)
        np.testing.assert_allclose(single.predict_proba(trained["table"].select(val)), full[val], atol=1e-5)
        np.testing.assert_allclose(single.predict_proba(trained["imu_table"].select(val)), imu[val], atol=1e-5)


def test_predict_one_sequence_equals_batch_and_reload(trained):
    bdir = trained["out"] / "bundles" / "torch"
    member = tp.load_member(bdir, trained["cfg"])
    table = trained["table"]
    batch = member.predict_proba(table)
    assert batch.shape == (table.n_sequences, metric.N_CLASSES)
    np.testing.assert_allclose(batch.sum(axis=1), 1.0, atol=1e-5)
    for i in (0, 5, table.n_sequences - 1):
        np.testing.assert_allclose(member.predict_proba(table.select([i]))[0], batch[i], atol=1e-5)
    reloaded = tp.TorchPipeline().predict_proba_reload_per_call(bdir, table, trained["cfg"])
    np.testing.assert_allclose(reloaded, batch, atol=1e-6)


def test_imu_only_test_sequences_take_the_imu_only_view(trained):
    """A test sequence without thm/tof gives the same as the IMU-only view of training (not the full view)."""
    raw = trained["raw"]
    first = raw.filter(pl.col("sequence_id") == trained["table"].sequence_ids[0])
    member = tp.load_member(trained["out"] / "bundles" / "torch", trained["cfg"])
    t_imu = features.build_frame_table(features.drop_tof_thm(first))
    assert not t_imu.has_tof_thm[0]
    np.testing.assert_allclose(
        member.predict_proba(t_imu), member.predict_proba(trained["imu_table"].select([0])), atol=1e-6
    )
    assert not np.allclose(member.predict_proba(t_imu), member.predict_proba(trained["table"].select([0])), atol=1e-6)


def test_checkpoint_that_does_not_fit_its_arguments_is_a_bundle_error(trained, tmp_path):
    src = trained["out"] / "bundles" / "torch"
    checkpoint = torch.load(src / "fold0.pt", weights_only=True)
    checkpoint["model_args"]["rnn_hidden"] = 24
    torch.save(checkpoint, tmp_path / "fold0.pt")
    with pytest.raises(bundle.BundleError, match="do not fit"):
        tp.load_checkpoint(tmp_path / "fold0.pt", torch.device("cpu"), {})


def test_bare_state_dict_of_older_bundles_loads_with_metadata_arguments(trained, tmp_path):
    src = trained["out"] / "bundles" / "torch"
    checkpoint = torch.load(src / "fold0.pt", weights_only=True)
    torch.save(checkpoint["state_dict"], tmp_path / "old.pt")  # the layout before checkpoints carried arguments
    model = tp.load_checkpoint(tmp_path / "old.pt", torch.device("cpu"), checkpoint["model_args"])
    assert model.lstm.hidden_size == checkpoint["model_args"]["rnn_hidden"]


def test_predict_rejects_a_table_with_other_features(trained):
    member = tp.load_member(trained["out"] / "bundles" / "torch", trained["cfg"])
    table = trained["table"].select([0])
    names = list(table.feature_names)
    names[2], names[3] = names[3], names[2]
    other = features.FrameTable(**{**table.__dict__, "feature_names": tuple(names)})
    with pytest.raises(ValueError, match="position 2"):
        member.predict_proba(other)


# ----------------------------------------------------------------------------- device helpers


def test_strip_module_prefix_and_unwrap_data_parallel():
    sd = {"module.conv1.weight": torch.ones(1), "module.head.0.bias": torch.zeros(1), "plain": torch.ones(2)}
    assert list(tp.strip_module_prefix(sd)) == ["conv1.weight", "head.0.bias", "plain"]
    net = small_net()
    wrapped = nn.DataParallel(net)
    assert all(k.startswith("module.") for k in wrapped.state_dict())
    unwrapped = tp.unwrap_state_dict(wrapped)
    assert list(unwrapped) == list(net.state_dict())
    fresh = tp.TimeSeriesNet(6, conv1=8, conv2=16, rnn_hidden=8, head_hidden=16)
    fresh.load_state_dict(unwrapped)  # strict: every key fits a bare model
    assert torch.equal(fresh.bn1.running_mean, net.bn1.running_mean)


def test_select_device_on_cpu_sets_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = Config()
    cfg.run.n_threads = 1
    try:
        assert tp.select_device(cfg) == torch.device("cpu")
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert tp.select_device(cfg).type == "cuda"
    finally:
        torch.set_num_threads(before)


def test_autocast_is_off_on_cpu():
    cfg = Config()
    cpu = torch.device("cpu")
    assert cfg.torch.amp and not tp.amp_enabled(cpu, cfg)
    assert tp.amp_enabled(torch.device("cuda"), cfg)
    a = torch.randn(4, 4)
    with tp.autocast_context(cpu, True):
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ a).dtype == torch.float32
    with warnings.catch_warnings():  # building a CUDA autocast object on a CPU-only machine warns
        warnings.simplefilter("ignore", UserWarning)
        assert isinstance(tp.autocast_context(torch.device("cuda"), True), torch.autocast)
    assert not isinstance(tp.autocast_context(torch.device("cuda"), False), torch.autocast)


def test_is_available():
    ok, why = tp.TorchPipeline().is_available()
    assert ok and torch.__version__ in why


def test_training_is_seeded_and_debug_uses_debug_epochs(tables, tmp_path):
    table, imu_table, y, _ = tables
    idx = np.arange(0, table.n_sequences, 3)  # a small subset: two short runs
    sub, sub_imu, sub_y = table.select(idx), imu_table.select(idx), y[idx]
    fold_ids = np.array([int(s[-1]) % 2 for s in sub.subjects])
    runs = []
    for name in ("a", "b"):
        cfg = tiny_cfg(tmp_path / name, epochs=50)
        cfg.run.debug, cfg.torch.debug_epochs = True, 2
        summary = tp.TorchPipeline().train(TrainingData(sub, sub_imu, sub_y, fold_ids, "h"), cfg, tmp_path / name)
        assert summary["epochs"] == 2
        runs.append(np.load(tmp_path / name / "oof" / "oof_torch_proba.npy"))
        meta = json.loads((tmp_path / name / "bundles" / "torch" / "metadata.json").read_text())
        assert meta["epochs"] == {"0": 2, "1": 2}  # the fixed schedule, final weights kept
    np.testing.assert_array_equal(runs[0], runs[1])
