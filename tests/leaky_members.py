"""Deliberately leaking variants of every member: the positive controls of the leak test (tests only).

Each variant makes one decision with the labels of the fold it is scored on, the kinds of selection
the member contract forbids (issue 12) and ``tests/test_members.validation_labels_leak`` must catch:

- ``lgbm``: early stopping on the scored fold instead of the inner split of the training folds;
- ``torch``: the epoch whose scored-fold loss is lowest is kept (its predictions become the OOF);
- ``keras``: ``EarlyStopping(monitor="val_loss", restore_best_weights=True)`` on the scored fold;
- ``branchnet``: the best epoch by the log-only validation pass (``BRANCHNET_LOG_EVERY``) is kept;
- ``centroid``: a class prior (a calibration) fitted on the scored fold's labels.

Each reuses its member's own code and changes only the one decision: a subclass hook, or one
module function swapped for the duration of ``fit_fold`` (``unittest.mock.patch.object``).
Production code has no switch for any of this. The pipeline modules are imported when a variant
is asked for, so a missing framework skips only its member.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np

from member_base import FoldResult, MemberPipeline
from metric import N_CLASSES
from tests.centroid_pipeline import CentroidPipeline


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))


def _best_epoch(y: np.ndarray, calls: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``calls``: the member's validation predictions in order, full view then IMU view per pass.

    The (full, IMU) predictions of the pass with the lowest log loss on the scored fold's labels ``y``
    (both views' mean log loss summed: a continuous criterion, so ties cannot hide the choice).
    """
    assert calls and len(calls) % 2 == 0, f"expected (full, imu) pairs of validation predictions, got {len(calls)}"
    passes = [(calls[i], calls[i + 1]) for i in range(0, len(calls), 2)]
    losses = [_log_loss(y, pf) + _log_loss(y, pi) for pf, pi in passes]
    return passes[int(np.argmin(losses))]


def _recording(fn: Callable[..., np.ndarray], calls: list[np.ndarray]) -> Callable[..., np.ndarray]:
    def record(*args: Any, **kwargs: Any) -> np.ndarray:
        out = fn(*args, **kwargs)
        calls.append(np.array(out, copy=True))
        return out

    return record


def _keep_best_epoch(pipeline_module: str, pipeline_class: str) -> MemberPipeline:
    """The member, but its OOF is the validation pass (epoch) with the best scored-fold loss.

    Both PyTorch members (torch, branchnet) score the validation fold with their module's ``predict_arrays`` (every
    epoch for torch, every ``BRANCHNET_LOG_EVERY`` epochs and at the end for BranchNet, full view
    then IMU view); recording those calls gives each epoch's predictions, i.e. what restoring that
    epoch's weights would serve. One model per fold (BranchNet's cpu preset: one seed), so the
    passes are that model's epochs in order.
    """
    module = importlib.import_module(pipeline_module)

    class KeepBestEpoch(getattr(module, pipeline_class)):  # type: ignore[misc]
        def fit_fold(self, ctx, data, split, cfg, work):
            calls: list[np.ndarray] = []
            with mock.patch.object(module, "predict_arrays", _recording(module.predict_arrays, calls)):
                r = super().fit_fold(ctx, data, split, cfg, work)
            assert r.record.get("seeds", 1) == 1, "one seed per fold: the passes are its epochs"
            p_full, p_imu = _best_epoch(data.y[split.valid], calls)
            return FoldResult(p_full, p_imu, {**r.record, "validation_passes": len(calls) // 2})

    return KeepBestEpoch()


def _lgbm() -> MemberPipeline:
    lp = importlib.import_module("lgbm_pipeline")

    class EarlyStopOnScoredFold(lp.LGBMPipeline):
        def fit_fold(self, ctx, data, split, cfg, work):
            tr, va, y = split.train, split.valid, data.y

            def fit(X, names):  # early stopping watches the scored fold
                return lp.LGBMSequenceClassifier(ctx.params, cfg.run.seed).fit(X[tr], y[tr], X[va], y[va], names)

            full, imu = fit(ctx.X_full, ctx.names_full), fit(ctx.X_imu, ctx.names_imu)
            route = ctx.use_imu_full_view[va]
            p_full = lp._routed_proba(route, ctx.X_full[va][~route], ctx.X_imu[va][route], [full], [imu])
            rounds = {"full": full.best_iteration_, "imu": imu.best_iteration_}
            return FoldResult(p_full, imu.predict_proba(ctx.X_imu[va]), {"rounds": rounds})

    return EarlyStopOnScoredFold()


def _keras() -> MemberPipeline:
    kp = importlib.import_module("keras_pipeline")

    def early_stopping(keras: Any, tag: str, n_epochs: int) -> Any:  # in place of the log-only epoch callback
        return keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)

    class EarlyStopOnScoredFold(kp.KerasPipeline):
        def fit_fold(self, ctx, data, split, cfg, work):
            with mock.patch.object(kp._EpochLog, "make", staticmethod(early_stopping)):
                return super().fit_fold(ctx, data, split, cfg, work)

    return EarlyStopOnScoredFold()


class PriorFittedOnTheScoredFold(CentroidPipeline):
    """A class prior (a calibration) taken from the validation fold's labels."""

    def fit_fold(self, ctx, data, split, cfg, work):
        r = super().fit_fold(ctx, data, split, cfg, work)
        prior = np.bincount(data.y[split.valid], minlength=N_CLASSES) + 1.0

        def shift(p: np.ndarray) -> np.ndarray:
            return (p * prior) / (p * prior).sum(1, keepdims=True)

        return FoldResult(shift(r.proba_full), shift(r.proba_imu), r.record)


LEAKY: dict[str, Callable[[], MemberPipeline]] = {
    "lgbm": _lgbm,
    "torch": lambda: _keep_best_epoch("torch_pipeline", "TorchPipeline"),
    "keras": _keras,
    "branchnet": lambda: _keep_best_epoch("branchnet_pipeline", "BranchNetPipeline"),
    "centroid": PriorFittedOnTheScoredFold,
}


def leaky(name: str) -> MemberPipeline:
    """The leaking variant of member ``name`` (ImportError when its framework is missing)."""
    if name not in LEAKY:
        raise KeyError(f"no leaking variant of member {name!r}: add one to tests/leaky_members.py")
    return LEAKY[name]()
