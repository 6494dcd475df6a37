"""The torch kit (torch_common): chunked prediction, batched softmax, checkpoint files and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import branchnet_model as bm
import branchnet_pipeline as bp
import bundle
import features
import metric
import torch_common as tc
import torch_pipeline as tp
from config import Config, load_config
from tests.factory import make_table

LENGTHS = [9, 3, 7, 3, 12, 5, 8]


@pytest.fixture(scope="module")
def table() -> features.FrameTable:
    return features.build_frame_table(make_table(LENGTHS))


def test_prediction_runs_in_length_ordered_chunks_and_returns_rows_in_table_order(table):
    chunks: list[np.ndarray] = []

    def chunk_proba(idx: np.ndarray) -> np.ndarray:
        assert torch.is_inference_mode_enabled()
        chunks.append(idx.copy())
        out = np.zeros((len(idx), metric.N_CLASSES))
        out[np.arange(len(idx)), idx] = 1.0  # row i says "I am sequence i"
        return out

    proba = tc.predict_in_length_order("kit", table.feature_names, table, chunk_proba, chunk=3)
    assert proba.dtype == np.float32 and proba.shape == (len(LENGTHS), metric.N_CLASSES)
    np.testing.assert_array_equal(proba.argmax(axis=1), np.arange(len(LENGTHS)))
    assert [len(c) for c in chunks] == [3, 3, 1]
    seen = np.concatenate(chunks)
    assert sorted(seen) == list(range(len(LENGTHS)))
    assert list(table.lengths[seen]) == sorted(LENGTHS)  # shortest first; ties in table order
    assert list(seen[:2]) == [1, 3]


def test_prediction_refuses_other_features_and_handles_an_empty_table(table):
    names = list(table.feature_names)
    names[0], names[1] = names[1], names[0]
    with pytest.raises(ValueError, match="kit member: frame features differ"):
        tc.predict_in_length_order("kit", tuple(names), table, lambda idx: 1 / 0)
    empty = table.select(np.array([], dtype=np.int64))
    out = tc.predict_in_length_order("kit", table.feature_names, empty, lambda idx: 1 / 0)
    assert out.shape == (0, metric.N_CLASSES) and out.dtype == np.float32


def test_softmax_batches_equal_one_pass_and_empty_input_gives_no_rows():
    torch.manual_seed(0)
    model = nn.Linear(4, metric.N_CLASSES).eval()
    x = torch.randn(7, 4)
    cpu = torch.device("cpu")
    got = tc.softmax_batches(7, 3, lambda rows: (x[rows],), model, cpu, amp=False)
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    assert got.dtype == np.float32
    empty = tc.softmax_batches(0, 3, lambda rows: (x[rows],), model, cpu, amp=False)
    assert empty.shape == (0, metric.N_CLASSES)


def test_checkpoint_files_keep_their_layout(tmp_path):
    """The on-disk layout both members have always written: older bundles and their digests keep loading."""
    args = tp.model_args_from_config(len(features.FRAME_FEATURES), Config())
    args.update(conv1=4, conv2=4, rnn_hidden=4, head_hidden=4)
    net = tp.TimeSeriesNet(**args)
    tp.save_checkpoint(tmp_path / "t.pt", args, nn.DataParallel(net).state_dict())
    obj = torch.load(tmp_path / "t.pt", weights_only=True)
    assert list(obj) == ["model_args", "state_dict"] and obj["model_args"] == args
    assert list(obj["state_dict"]) == list(net.state_dict())  # no "module." prefix
    loaded = tp.load_checkpoint(tmp_path / "t.pt", torch.device("cpu"), {})
    assert not loaded.training and torch.equal(loaded.conv1.weight, net.conv1.weight)

    s = bp.resolve_settings(Config())
    b_args = {**bp.model_args(s), "width": 8, "rnn_hidden": 4, "tof_channels": 2}
    states = [bm.build(b_args).state_dict() for _ in range(2)]
    bp.save_checkpoint(tmp_path / "b.pt", b_args, states)
    obj = torch.load(tmp_path / "b.pt", weights_only=True)
    assert list(obj) == ["format", "model_args", "n_seeds", "state_dict"]
    assert obj["format"] == bp.CHECKPOINT_FORMAT == 1 and obj["n_seeds"] == 2
    models = bp.load_checkpoint(tmp_path / "b.pt", torch.device("cpu"))
    assert len(models) == 2 and torch.equal(models[1].gru.weight_hh_l0, states[1]["gru.weight_hh_l0"])


def test_checkpoint_errors_name_the_file_and_the_problem(tmp_path):
    cpu = torch.device("cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(bundle.BundleError, match="junk.pt: not a readable torch checkpoint"):
        tc.read_checkpoint(tmp_path / "junk.pt", cpu)
    with pytest.raises(bundle.BundleError, match="do not build the network"):
        tc.build_model(tmp_path / "x.pt", lambda a: nn.Linear(**a), {"in_features": 2, "bogus": 1}, {}, cpu)
    with pytest.raises(bundle.BundleError, match="weights do not fit"):
        tc.build_model(tmp_path / "x.pt", lambda a: nn.Linear(**a), {"in_features": 2, "out_features": 3}, {}, cpu)

    s = bp.resolve_settings(Config())
    b_args = {**bp.model_args(s), "width": 8, "rnn_hidden": 4, "tof_channels": 2}
    bp.save_checkpoint(tmp_path / "b.pt", b_args, [bm.build(b_args).state_dict()])
    obj = torch.load(tmp_path / "b.pt", weights_only=True)
    obj["n_seeds"] = 3  # more seeds than the stacked weights hold
    torch.save(obj, tmp_path / "b3.pt")
    with pytest.raises(bundle.BundleError, match="b3.pt: weights do not fit .* n_seeds is 3"):
        bp.load_checkpoint(tmp_path / "b3.pt", cpu)


def test_kept_weights_say_what_is_saved():
    s = bp.resolve_settings(Config())
    assert not s.ema and bp.kept_weights(s) == "the last epoch's weights"
    ema = bp.resolve_settings(load_config({"BRANCHNET_EMA": "1"}))
    assert "EMA" in bp.kept_weights(ema) and f"{ema.ema_decay:g}" in bp.kept_weights(ema)
