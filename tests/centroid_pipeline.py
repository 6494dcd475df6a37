"""A test-only member: nearest centroid on per-sequence means of the frame features.

It exists to prove the member contract: one file like this plus one registry
line (``members.REGISTRY``) is a working member: trained on the shared folds,
resumable, skipped when complete, bundled, loaded and blended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import io_utils
from config import Config, MemberConfig
from features import FrameTable
from member_base import FoldResult, FoldSplit, MemberPipeline, TrainingData
from metric import GESTURES, N_CLASSES


@dataclass
class CentroidConfig(MemberConfig):
    weight: float = 0.5
    temperature: float = 1.0  # softmax temperature over negative distances


@dataclass
class ConfigWithCentroid(Config):
    """The config a project with this member would have: one more member section."""

    centroid: CentroidConfig = field(default_factory=CentroidConfig)


def _means(table: FrameTable) -> np.ndarray:
    sums = np.add.reduceat(table.values.astype(np.float64), table.offsets[:-1], axis=0)
    return sums / table.lengths[:, None]


class CentroidMember:
    classes_ = GESTURES

    def __init__(self, centroids: list[np.ndarray], temperature: float) -> None:
        self.centroids = centroids  # per fold (18, C); NaN rows for classes absent from training
        self.temperature = temperature

    def predict_proba(self, table: FrameTable) -> np.ndarray:
        x = _means(table)
        out = np.zeros((table.n_sequences, N_CLASSES))
        for c in self.centroids:
            d = np.sqrt(((x[:, None, :] - c[None]) ** 2).sum(-1))
            logits = np.where(np.isnan(d), -np.inf, -d / self.temperature)
            p = np.exp(logits - logits.max(1, keepdims=True))
            out += p / p.sum(1, keepdims=True)
        return out / len(self.centroids)


class CentroidPipeline(MemberPipeline):
    name = "centroid"

    def fold_files(self, fold: int) -> list[str]:
        return [f"fold{fold}_centroids.npy"]

    def fit_fold(self, ctx: Any, data: TrainingData, split: FoldSplit, cfg: Config, work: Path) -> FoldResult:
        x = _means(data.table)
        c = np.full((N_CLASSES, x.shape[1]), np.nan)
        for k in np.unique(data.y[split.train]):
            c[k] = x[split.train][data.y[split.train] == k].mean(0)
        io_utils.write_npy(work / f"fold{split.fold}_centroids.npy", c)
        member = CentroidMember([c], cfg.member(self.name).temperature)
        return FoldResult(
            member.predict_proba(data.table.select(split.valid)),
            member.predict_proba(data.imu_table.select(split.valid)),
            {"n_train": len(split.train)},
        )

    def load(self, bundle_dir: Path, cfg: Config) -> CentroidMember:
        meta = self.read_bundle(bundle_dir, self.feature_names(None, cfg))
        cents = [io_utils.read_npy(Path(bundle_dir) / f"fold{k}_centroids.npy") for k in meta["folds"]]
        return CentroidMember(cents, cfg.member(self.name).temperature)
