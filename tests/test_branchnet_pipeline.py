"""BranchNet member: branch shapes, padding and gating, each augmentation, EMA, honest OOF, seeds, checkpoints."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import branchnet_augment as ba
import branchnet_model as bm
import branchnet_pipeline as bp
import features
import metric
from config import SWITCH_FIELDS, BranchNetConfig, ConfigError, load_config
from member_base import TrainingData
from tests.factory import labelled_rows, training_data

torch.set_num_threads(1)

TINY_ENV = {
    "CMI_N_THREADS": "1",
    "CMI_SEED": "5",
    "BRANCHNET_WIDTH": "8",
    "BRANCHNET_RNN_HIDDEN": "8",
    "BRANCHNET_TOF_CHANNELS": "2",
    "BRANCHNET_EPOCHS": "2",
    "BRANCHNET_BATCH_SIZE": "8",
    # every part on, including the two the defaults leave off
    "BRANCHNET_AUX_ORIENTATION": "0.2",
    "BRANCHNET_EMA": "1",
}
N_CH = len(features.FRAME_FEATURES)


def tiny_settings(**env: str) -> tuple[object, BranchNetConfig]:
    cfg = load_config({**TINY_ENV, **env})
    return cfg, bp.resolve_settings(cfg)


def small_net(seed: int = 0, **kw) -> bm.BranchNet:
    torch.manual_seed(seed)
    args = {**bp.model_args(tiny_settings()[1]), "dropout": 0.0, **kw}
    net = bm.build(args)
    for m in net.modules():  # non-trivial BatchNorm statistics, so padding handled wrongly would show
        if isinstance(m, bm.MaskedBatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def batch(lengths: list[int], length: int, seed: int = 0, left: bool = True):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    x = torch.randn(b, length, N_CH, generator=g)
    grids = torch.rand(b, length, bm.N_TOF_SENSORS, bm.GRID_WIDTH, generator=g)
    mask = torch.zeros(b, length, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if left:
            mask[i, length - n :] = True
        else:
            mask[i, :n] = True
    return x * mask[:, :, None], mask, grids * mask[:, :, None, None]


@pytest.fixture(scope="module")
def data() -> TrainingData:
    raw = labelled_rows(n_subjects=4, classes=(0, 3, 9), reps=3, seed=5, imu_only_every=4, min_len=24, max_len=44)
    return training_data(raw, n_folds=2)


# ----------------------------------------------------------------------------- shapes of each branch


def test_grid_conv_is_the_convolution_it_claims():
    conv = bm.GridConv(2, 5, 8)
    x = torch.randn(7, 2, 8, 8)
    ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=2, padding=1).flatten(1)
    torch.testing.assert_close(conv(x.flatten(1)), ref, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # serving caches the dense matrix...
        first = conv(x.flatten(1))
        torch.testing.assert_close(first, ref.detach(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # ...until the kernel changes (an optimiser step, load_state_dict)
        conv.weight.mul_(2.0)
    with torch.inference_mode():
        torch.testing.assert_close(
            conv(x.flatten(1)) - conv.bias.repeat_interleave(16), 2 * (first - conv.bias.repeat_interleave(16))
        )


def test_each_branch_has_its_shape():
    net = small_net()
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ("imu_in", "thm_in", "tof_in", "grid_cnn", "grid_mix", "fuse"):
        getattr(net, name).register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, out.shape))
    net.attn.register_forward_hook(lambda _m, inp, _o: shapes.__setitem__("gru", inp[0].shape))  # the GRU's output
    x, mask, grids = batch([20, 13, 7], 20)
    out = net(x, mask, grids, torch.tensor([True, True, False]))
    w = 8  # thermopiles get max(w // 4, 4) channels, ToF max(w // 2, 4)
    assert shapes["imu_in"] == (3, w, 20) and shapes["thm_in"] == (3, 4, 20) and shapes["tof_in"] == (3, 4, 20)
    n_frames = sum(math.ceil(n / 2) for n in (20, 13))  # every second real frame of the sequences with ToF
    assert shapes["grid_cnn"] == (n_frames * bm.N_TOF_SENSORS, 4)  # 2 * tof_channels
    assert shapes["grid_mix"] == (3, 4, 10) and shapes["fuse"] == (3, w, 10)
    assert shapes["gru"] == (3, 5, 16)  # a quarter of the rate, both directions
    assert out["gesture"].shape == (3, metric.N_CLASSES) and out["nine"].shape == (3, bm.N_NINE)
    assert out["binary"].shape == (3,) and out["orientation"].shape == (3, bm.N_ORIENTATIONS)


@pytest.mark.parametrize("kw", [{"tof_cnn": False}, {"branches": False}, {"heads": []}, {"norm": "scaler"}])
def test_ablations_build_and_run(kw):
    net = small_net(**kw)
    x, mask, grids = batch([9, 4], 12)
    out = net(x, mask, grids if net.tof_cnn else None, torch.tensor([True, False]))
    assert out["gesture"].shape == (2, metric.N_CLASSES) and torch.isfinite(out["gesture"]).all()
    assert ("nine" in out) == ("nine" in net.heads)


def test_output_depends_only_on_real_steps_not_pad_side_or_length():
    net = small_net()
    lengths = [17, 16, 9, 5, 2, 1]
    x, mask, grids = batch(lengths, 17, left=True)
    has = torch.tensor([True] * 6)
    with torch.no_grad():
        ref = net(x, mask, grids, has)["gesture"]
        mr, xr, gr = bm.compact(mask, x, grids)
        right = net(xr, mr, gr, has)["gesture"]
        pad = 9  # more padding in front, filled with garbage the mask hides
        xl = torch.cat([torch.randn(6, pad, N_CH), x], dim=1)
        gl = torch.cat([torch.rand(6, pad, bm.N_TOF_SENSORS, bm.GRID_WIDTH), grids], dim=1)
        ml = torch.cat([torch.zeros(6, pad, dtype=torch.bool), mask], dim=1)
        longer = net(xl, ml, gl, has)["gesture"]
        one = net(x[3:4, -5:], mask[3:4, -5:], grids[3:4, -5:], has[3:4])["gesture"]
    torch.testing.assert_close(right, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(longer, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(one, ref[3:4], atol=1e-5, rtol=1e-4)


def test_flag_off_ignores_thermopiles_and_tof_entirely():
    net = small_net()
    x, mask, grids = batch([14, 9], 14)
    off = torch.tensor([False, False])
    other = x.clone()
    other[:, :, ba.TOFTHM_IDX] = torch.randn(2, 14, len(ba.TOFTHM_IDX)) * mask[:, :, None]
    with torch.no_grad():
        a = net(x, mask, grids, off)["gesture"]
        b = net(other, mask, torch.rand_like(grids), off)["gesture"]
        on = net(x, mask, grids, ~off)["gesture"]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, on)


def test_masked_batchnorm_uses_real_steps_only():
    bn = bm.MaskedBatchNorm(3).train()
    x = torch.randn(4, 3, 10) * 2 + 5
    mask = torch.rand(4, 10) > 0.4
    y = bn(torch.where(mask[:, None], x, torch.full_like(x, 1e3)), mask)
    real = y.permute(0, 2, 1)[mask]
    torch.testing.assert_close(real.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(real.std(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    assert (y.permute(0, 2, 1)[~mask] == 0).all()
    before = bn.running_mean.clone()
    bn(x, torch.zeros(4, 10, dtype=torch.bool))  # no real step: statistics untouched
    torch.testing.assert_close(bn.running_mean, before)


def test_tof_encoding_far_missing_and_near():
    raw = np.full((1, 5, 64), np.nan, dtype=np.float16)
    raw[0, 0, :] = -1  # sensor 0 sees nothing in range
    raw[0, 1, 0], raw[0, 1, 1] = 0, 254  # sensor 1: touching, farthest
    codes = bm.encode_tof(raw)
    assert codes.shape == (1, 5, bm.GRID_WIDTH) and codes.dtype == np.uint8
    assert (codes[0, 0, :64] == 0).all() and codes[0, 0, 64] == 255  # far: proximity 0, but reported
    assert codes[0, 1, 0] == 255 and codes[0, 1, 1] == 1 and codes[0, 1, 64] == 255
    assert (codes[0, 2] == 0).all()  # missing: nothing, not reported
    g = bm.decode_tof(torch.from_numpy(codes))
    assert g.dtype == torch.float32 and float(g.max()) == 1.0


def test_frame_table_carries_raw_tof_aligned_with_pad_batch(data):
    t = data.table
    assert t.tof_pixels is not None and t.tof_pixels.shape == (len(t.values), 5, 64)
    assert data.imu_table.tof_pixels is None
    idx = np.array([1, 0])
    pix = features.pad_tof_pixels(t, idx, 30)
    _, mask = features.pad_batch(t, idx, 30)
    assert pix.shape == (2, 30, 5, 64) and np.isnan(pix[~mask]).all()
    n = t.lengths[1]
    tail = t.tof_pixels[t.offsets[2] - min(n, 30) : t.offsets[2]]
    np.testing.assert_array_equal(pix[0, 30 - len(tail) :], tail)  # the tail, as pad_batch keeps it
    sel = t.select(idx)
    np.testing.assert_array_equal(sel.tof_pixels[: sel.lengths[0]], t.tof_pixels[t.offsets[1] : t.offsets[2]])


# ----------------------------------------------------------------------------- augmentations


def test_z_rotation_turns_world_vectors_only_and_keeps_norms_and_z():
    x = torch.randn(3, 11, N_CH)
    angle = torch.tensor([0.3, -1.0, math.pi / 4])
    y = ba.rotate_z(x, angle)
    ix, iy, iz = ba.WORLD_VECTORS[0]
    torch.testing.assert_close(y[..., [ix, iy, iz]].norm(dim=-1), x[..., [ix, iy, iz]].norm(dim=-1))
    torch.testing.assert_close(y[..., iz], x[..., iz])
    others = [c for c in range(N_CH) if c not in (ix, iy)]
    torch.testing.assert_close(y[..., others], x[..., others])
    assert not torch.allclose(y[..., ix], x[..., ix])
    # the angle is the one asked: cos(angle) between the old and new horizontal parts
    cos = (y[..., [ix, iy]] * x[..., [ix, iy]]).sum(-1) / x[..., [ix, iy]].norm(dim=-1) ** 2
    torch.testing.assert_close(cos, torch.cos(angle)[:, None].expand_as(cos), atol=1e-5, rtol=0)
    assert features.FRAME_FEATURES[ix] == "linear_acc_x" and features.FRAME_FEATURES[iz] == "linear_acc_z"


def test_time_stretch_changes_length_as_asked_and_keeps_the_tail():
    x, mask, grids = batch([40, 40, 20, 30], 50)
    factor = torch.tensor([1.5, 0.5, 1.0, 1.0])
    crop = torch.tensor([0, 0, 0, 5])
    y, m, g = ba.time_stretch(x, mask, grids, factor, crop)
    assert m.sum(1).tolist() == [50, 20, 20, 25]  # 60 capped at the pad length (tail kept), 20, 20, 30 - 5
    assert m[:, :20].all()  # start aligned
    real = lambda i: x[i][mask[i]]  # noqa: E731
    torch.testing.assert_close(y[2, :20], real(2))  # factor 1: an exact copy
    torch.testing.assert_close(g[2, :20], grids[2][mask[2]])
    torch.testing.assert_close(y[3, :25], real(3)[5:])  # the first 5 steps dropped, the tail kept
    torch.testing.assert_close(y[0, 49], real(0)[-1])  # stretched: still ends on the last step
    torch.testing.assert_close(y[1, 19], real(1)[-1])
    torch.testing.assert_close(y[1, 0], real(1)[0])
    assert (y[~m] == 0).all() and (g[~m] == 0).all()


def test_mixup_targets_sum_to_one_and_inputs_mix_where_both_are_real():
    x, mask, grids = batch([10, 6, 8], 10)
    targets = ba.one_hot_targets(torch.tensor([0, 9, 3]), torch.tensor([1, -1, 2]))
    lam = torch.tensor([0.7, 0.2, 0.5])
    perm = torch.tensor([1, 2, 0])
    has = torch.tensor([True, True, False])
    xm, mm, gm, hm, tm = ba.mixup(x, mask, grids, has, targets, lam, perm)
    torch.testing.assert_close(tm["gesture"].sum(1), torch.ones(3))
    torch.testing.assert_close(tm["nine"].sum(1), torch.ones(3))
    assert tm["gesture"][0, 0] == pytest.approx(0.7) and tm["gesture"][0, 9] == pytest.approx(0.3)
    assert tm["binary"][0] == pytest.approx(0.7)  # target (0) with non-target (9)
    assert tm["orientation"][0].sum() == pytest.approx(0.7)  # the partner's orientation is unknown
    assert torch.equal(mm, mask | mask[perm]) and hm.tolist() == [True, False, False]
    torch.testing.assert_close(xm[0, -1], 0.7 * x[0, -1] + 0.3 * x[1, -1])  # tails aligned
    torch.testing.assert_close(xm[0, 0], x[0, 0])  # only the sample is real there
    torch.testing.assert_close(gm[0, -1], 0.7 * grids[0, -1] + 0.3 * grids[1, -1])


def test_sensor_dropout_zeros_thermopiles_and_tof_and_clears_the_flag():
    x, mask, grids = batch([8, 8], 8)
    drop = torch.tensor([True, False])
    y, g, has = ba.sensor_dropout(x, grids, torch.tensor([True, True]), drop)
    assert has.tolist() == [False, True]
    assert (y[0][:, ba.TOFTHM_IDX] == 0).all() and (g[0] == 0).all()
    torch.testing.assert_close(y[0][:, ba.IMU_IDX], x[0][:, ba.IMU_IDX])
    torch.testing.assert_close(y[1], x[1])
    torch.testing.assert_close(g[1], grids[1])


def test_augment_batch_is_reproducible_and_consistent(data):
    cfg, s = tiny_settings()
    arr = bp.build_arrays(data.table, np.arange(8), data.y, 40)
    outs = [ba.augment_batch(arr, s, torch.Generator().manual_seed(3), torch.device("cpu")) for _ in range(2)]
    (x, mask, grids, has, targets), (x2, *_rest) = outs
    torch.testing.assert_close(x, x2)
    assert x.shape[:2] == mask.shape == grids.shape[:2] and has.shape == (8,)
    torch.testing.assert_close(targets["gesture"].sum(1), torch.ones(8))
    assert "phase" not in targets  # no phase labels passed


def test_phase_rides_through_the_augmentations_and_trains_its_head(data):
    cfg, s = tiny_settings(BRANCHNET_MIXUP_PROB="1", BRANCHNET_STRETCH_PROB="1")
    arr = bp.build_arrays(data.table, np.arange(8), data.y, 40, phase=data.phase)
    x, mask, grids, has, targets = ba.augment_batch(arr, s, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert x.shape[2] == len(features.FRAME_FEATURES)  # the phase channel is split off again
    t4 = math.ceil(mask.shape[1] / 4)
    assert targets["phase"].shape == targets["phase_mask"].shape == (8, t4)
    assert ((targets["phase"] >= 0) & (targets["phase"] <= 1)).all() and targets["phase_weight"].gt(0).all()
    model = bm.build(bp.model_args(s))
    out = model(x, mask, grids, has)
    with_phase = bp.loss_fn(out, targets, s)
    without = bp.loss_fn(out, targets, dataclasses.replace(s, aux_phase=0.0))
    assert float(with_phase.detach()) > float(without.detach())
    with_phase.backward()
    assert model.out_phase.weight.grad.abs().sum() > 0


def test_length_batches_cover_every_sequence_once():
    lengths = torch.randint(5, 100, (37,))
    batches = bp.length_batches(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == list(range(37)) and max(len(b) for b in batches) == 8


# ----------------------------------------------------------------------------- settings


def test_presets_expand_and_explicit_settings_win():
    cfg = load_config({})
    s = bp.resolve_settings(cfg)
    assert (s.preset, s.epochs, s.seeds, s.width) == (
        "cpu",
        *(bp.PRESETS["cpu"][k] for k in ("epochs", "seeds", "width")),
    )
    record = bp.settings_record(s)  # what the bundle, effective_settings.json and the fingerprint keep
    assert record["preset"] == "cpu" and "debug_epochs" not in record and not set(record) & set(SWITCH_FIELDS)
    g = bp.resolve_settings(load_config({"BRANCHNET_PRESET": "gpu", "BRANCHNET_SEEDS": "2"}))
    assert g.epochs == bp.PRESETS["gpu"]["epochs"] and g.width == bp.PRESETS["gpu"]["width"] and g.seeds == 2
    assert g.epochs >= 60 and bp.PRESETS["gpu"]["seeds"] >= 3
    assert bp.resolve_settings(load_config({"CMI_DEBUG": "1"})).epochs == cfg.branchnet.debug_epochs
    with pytest.raises(ConfigError, match="BRANCHNET_PRESET"):
        bp.resolve_settings(load_config({"BRANCHNET_PRESET": "tpu"}))
    with pytest.raises(ConfigError, match="BRANCHNET_NORM"):
        bp.resolve_settings(load_config({"BRANCHNET_NORM": "layer"}))
    assert bp.model_args(bp.resolve_settings(load_config({"BRANCHNET_AUX_BINARY": "0"})))["heads"] == [
        "nine",
        "phase",
    ]
    assert not cfg.branchnet.ema and cfg.branchnet.aux_orientation == 0  # off by default (docs/RESULTS.md)


def test_orientation_targets_come_from_training_rows_only(data):
    split = data.split(0)
    assert data.orientation is not None  # the factory's rows carry train.csv's orientation column
    orient, source = bp.orientation_targets(data, split, 0)
    assert source == "labels" and (orient[split.valid] == -1).all()
    np.testing.assert_array_equal(orient[split.train], data.orientation[split.train])
    # data without the column: the posture is derived from the training fold's gravity, validation still -1
    unlabelled = dataclasses.replace(data, orientation=None)
    orient, source = bp.orientation_targets(unlabelled, split, 0)
    assert "derived" in source or "none" in source
    assert (orient[split.valid] == -1).all()


def test_phase_labels_line_up_with_the_padded_steps(data):
    """The phase target of every kept step is its row's phase; padding is 0 and unknown rows clear the flag."""
    idx = np.array([0, 3])
    pad = 30
    phase, known = bp.pad_row_labels(data.table, idx, pad, data.phase)
    x, mask = features.pad_batch(data.table, idx, pad, None)
    for i, k in enumerate(idx):
        start, stop = data.table.offsets[k], data.table.offsets[k + 1]
        rows = data.phase[max(start, stop - pad) : stop]
        np.testing.assert_array_equal(phase[i][mask[i]], rows)
        assert (phase[i][~mask[i]] == 0).all()
    assert known.tolist() == [1.0, 1.0]
    holes = data.phase.copy()
    holes[data.table.offsets[3 + 1] - 1] = -1  # the last row of sequence 3 has no label
    assert bp.pad_row_labels(data.table, idx, pad, holes)[1].tolist() == [1.0, 0.0]


def test_phase_target_is_the_gesture_fraction_per_quarter_rate_step():
    phase = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0]], dtype=torch.float32)
    mask = torch.tensor([[True] * 9 + [False] * 3])
    target, real = ba.phase_target(phase, mask)
    torch.testing.assert_close(target, torch.tensor([[0.5, 0.75, 1.0]]))
    assert real.tolist() == [[True, True, True]]
    model = bm.build(bp.model_args(tiny_settings()[1]))
    out = model.eval()(torch.randn(1, 12, len(features.FRAME_FEATURES)), mask)
    assert out["phase"].shape == target.shape  # the head's time grid is the target's


@pytest.mark.parametrize(
    "kw", [{}, {"branches": False}, {"tof_cnn": False}, {"norm": "scaler"}], ids=["default", "one", "no_cnn", "scaler"]
)
def test_stacked_models_give_each_models_own_logits(kw):
    """Several models in one pass (grouped convolutions, a block-diagonal GRU) = each model alone."""
    models = []
    for k in range(3):
        net = small_net(seed=k, **kw).eval()
        for m in net.modules():
            if isinstance(m, bm.InputNorm):  # a non-trivial fitted scaler too
                m.mean.uniform_(-1.0, 1.0)
                m.std.uniform_(0.5, 2.0)
        models.append(net)
    torch.manual_seed(5)
    b, length = 4, 37
    x = torch.randn(b, length, len(features.FRAME_FEATURES))
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, :10] = False  # front padded, as the member pads
    mask[2, :30] = False
    grids = torch.rand(b, length, bm.N_TOF_SENSORS, bm.GRID_WIDTH) if models[0].tof_cnn else None
    has_tof = torch.tensor([True, False, True, True])
    with torch.inference_mode():
        stacked = bm.StackedBranchNet(models)(x, mask, grids, has_tof)
        each = torch.stack([m(x, mask, grids, has_tof)["gesture"] for m in models], dim=1)
    assert stacked.shape == (b, 3, metric.N_CLASSES)
    torch.testing.assert_close(stacked, each, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="differ"):
        bm.StackedBranchNet([models[0], small_net(tof_cnn=not models[0].tof_cnn)])


# ----------------------------------------------------------------------------- training


@pytest.mark.slow  # trains tiny models (seconds)
def test_ema_weights_differ_from_raw_weights_after_training(data):
    cfg, s = tiny_settings(BRANCHNET_LOG_EVERY="0")
    split = data.split(0)
    arr = lambda t, i: bp.build_arrays(t, i, data.y, 40)  # noqa: E731
    r = bp.train_one(
        1,
        arr(data.table, split.train),
        arr(data.table, split.valid),
        arr(data.imu_table, split.valid),
        bp.model_args(s),
        s,
        torch.device("cpu"),
    )
    diffs = [
        not torch.equal(r.state_dict[k], r.raw_state_dict[k])
        for k in r.state_dict
        if r.state_dict[k].is_floating_point()
    ]
    assert any(diffs) and len(r.epoch_log) == s.epochs
    r0 = bp.train_one(
        1,
        arr(data.table, split.train),
        arr(data.table, split.valid),
        arr(data.imu_table, split.valid),
        bp.model_args(s),
        dataclasses.replace(s, ema=False),
        torch.device("cpu"),
    )
    assert all(torch.equal(r0.state_dict[k], r0.raw_state_dict[k]) for k in r0.state_dict)


@pytest.mark.slow  # trains tiny models (seconds)
def test_validation_labels_do_not_influence_the_oof(data):
    """Honest selection: the fold trained with its validation rows' labels permuted gives the same OOF, bit for bit."""
    cfg, s = tiny_settings(BRANCHNET_LOG_EVERY="1")  # the validation fold is even scored every epoch (log only)
    split = data.split(1)
    y = data.y.copy()
    rng = np.random.default_rng(0)
    y[split.valid] = rng.permutation(metric.N_CLASSES)[y[split.valid]]  # other labels on every validation row
    assert (y[split.valid] != data.y[split.valid]).any()
    orientation = data.orientation.copy()  # the validation rows' auxiliary labels change too
    orientation[split.valid] = (orientation[split.valid] + 1) % 4
    held_rows = np.repeat(data.fold_ids == split.fold, np.diff(data.table.offsets))
    phase = data.phase.copy()
    phase[held_rows] = 1 - phase[held_rows]
    permuted = TrainingData(data.table, data.imu_table, y, data.fold_ids, data.folds_hash, orientation, phase)
    device = torch.device("cpu")
    a = bp.train_fold(data, split, cfg, s, device)
    b = bp.train_fold(permuted, split, cfg, s, device)
    np.testing.assert_array_equal(a.proba_full, b.proba_full)
    np.testing.assert_array_equal(a.proba_imu, b.proba_imu)
    for k in a.state_dicts[0]:
        assert torch.equal(a.state_dicts[0][k], b.state_dicts[0][k])
    assert "val_full" in a.epoch_logs[0][0]  # scored for the log, never used


@pytest.mark.slow  # trains tiny models (seconds)
def test_seeds_per_fold_are_averaged_for_the_oof_and_at_serving(data, tmp_path):
    cfg, s = tiny_settings(BRANCHNET_SEEDS="2", BRANCHNET_EPOCHS="1", BRANCHNET_LOG_EVERY="0")
    split = data.split(0)
    device = torch.device("cpu")
    r = bp.train_fold(data, split, cfg, s, device)
    assert len(r.state_dicts) == 2
    pad = r.pad_len
    orient, _ = bp.orientation_targets(data, split, cfg.run.seed + split.fold)
    arrs = (
        bp.build_arrays(data.table, split.train, data.y, pad, orient, phase=data.phase),
        bp.build_arrays(data.table, split.valid, data.y, pad),
        bp.build_arrays(data.imu_table, split.valid, data.y, pad),
    )
    singles = [bp.train_one(bp.seed_of(cfg, 0, k), *arrs, bp.model_args(s), s, device) for k in range(2)]
    np.testing.assert_allclose(r.proba_full, np.mean([x.proba_full for x in singles], axis=0), atol=1e-6)
    np.testing.assert_allclose(r.proba_imu, np.mean([x.proba_imu for x in singles], axis=0), atol=1e-6)
    assert not np.allclose(singles[0].proba_full, singles[1].proba_full)  # two different models
    # served: the member averages the same models
    path = tmp_path / "fold0.pt"
    bp.save_checkpoint(path, bp.model_args(s), r.state_dicts)
    models = bp.load_checkpoint(path, device)
    member = bp.BranchNetMember([models], [pad], features.FRAME_FEATURES, device, False, True, {})
    assert member.n_models == 2
    served = member.predict_proba(data.table.select(split.valid))
    np.testing.assert_allclose(served, r.proba_full, atol=1e-5)
    # folds with other pad lengths (some sequences cut to their tail): stacked passes = one model at a time
    folds = [models, models[:1], models[1:]]
    pads = [pad, 20, pad + 5]
    stacked = bp.BranchNetMember(folds, pads, features.FRAME_FEATURES, device, False, True, {})
    loop = bp.BranchNetMember(folds, pads, features.FRAME_FEATURES, device, False, True, {}, stacked=False)
    valid = data.table.select(split.valid)
    assert int(valid.lengths.max()) > 20  # the 20-step fold really sees other inputs
    np.testing.assert_allclose(stacked.predict_proba(valid), loop.predict_proba(valid), atol=1e-6)
    assert len(stacked._stacked) >= 2  # the short fold ran in a pass of its own


def test_checkpoint_round_trip_with_weights_only(data, tmp_path):
    cfg, s = tiny_settings(BRANCHNET_NORM="scaler")
    net = small_net(norm="scaler")
    net.set_scaler(np.arange(N_CH, dtype=np.float32), np.full(N_CH, 2.0, dtype=np.float32))
    args = {**bp.model_args(s), "dropout": 0.0}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / "fold3.pt"
    bp.save_checkpoint(path, args, [state, state])
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"format", "model_args", "n_seeds", "state_dict"} and obj["n_seeds"] == 2
    assert obj["model_args"]["norm"] == "scaler"
    models = bp.load_checkpoint(path, torch.device("cpu"))
    x, mask, grids = batch([12, 5], 12)
    has = torch.tensor([True, False])
    with torch.no_grad():
        for m in models:
            torch.testing.assert_close(m(x, mask, grids, has)["gesture"], net(x, mask, grids, has)["gesture"])
    torch.testing.assert_close(models[0].imu_norm.mean, torch.arange(N_CH, dtype=torch.float32)[ba.IMU_IDX])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(Exception, match="not a readable torch checkpoint"):
        bp.load_checkpoint(path, torch.device("cpu"))
