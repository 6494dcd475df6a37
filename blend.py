"""The shipped blend: per view, member weights and a class bias, stored as ``ensemble/weights.json``.

``Blend`` is the one reader and writer of that file. Training fits it (``ensemble.fit_ensemble`` returns
the record, ``Blend.from_dict(...).write`` stores it), serving reads it through the seal
(``Blend.load_sealed``: the bytes are parsed only once their digest matched ``manifest.json``) and
blends the loaded members with ``ServedBlend.combine``; the subject post-processing replay and the report
read the file the training run just wrote (``Blend.read``; the manifest is written last, after them)
and the honest blend OOF beside it (``honest_oof``: ``ensemble/oof/blend``, fold k's rows decided and
fitted without fold k).

The file (JSON, an object): ``format_version`` (this code writes and reads ``FORMAT_VERSION``; a file
without the field was written before it existed and is read as version 1; any other version is a
``BlendError`` naming it), ``members`` (the blended members, in blend order), ``views`` with one record
per view in ``VIEWS`` — ``weights`` (member -> finite weight >= 0: what serving uses) and
``calibration.class_bias`` (18 finite log-prior shifts, or null) plus training's diagnostics (scores,
per-fold decisions, random search), kept as written for the report — and ``class_prior`` (18
non-negative numbers: the serving fallback's prior, or absent). Imports ``bundle``, ``cv``,
``ensemble_seal``, ``io_utils`` and ``metric`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import ensemble_seal
from bundle import BundleError
from cv import MemberOOF, read_member_oof
from io_utils import read_json, write_json
from metric import N_CLASSES

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.json"
FORMAT_VERSION = 1
VIEWS: tuple[str, ...] = ("full", "imu_only")
BLEND = "blend"  # the candidate that blends every member of a view, and the honest OOF's "member" name
HONEST_OOF_DIR = "oof"  # <ensemble>/oof: the served OOF that ``ensemble.fit_ensemble`` writes


class BlendError(BundleError):
    """A weights.json that cannot be used; the message names the file and the field."""


class PriorError(ValueError):
    """A stored class prior that cannot be used; names the file."""


# --------------------------------------------------------------------------- arithmetic


def mix(probas: Sequence[np.ndarray], weights: np.ndarray | Sequence[float]) -> np.ndarray:
    """The weighted mean of the members' (n, 18) probabilities; ``weights`` are normalised to sum 1 first."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return sum(wi * p for wi, p in zip(w, probas))


def apply_class_bias(proba: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Shift each class's log-probability by ``bias`` and renormalise (a learned class prior)."""
    if bias is None:
        return proba
    p = np.asarray(proba, dtype=np.float64) * np.exp(np.asarray(bias, dtype=np.float64))
    return p / p.sum(axis=1, keepdims=True)


def check_class_prior(values: Any, where: str | Path) -> np.ndarray:
    """``values`` as 18 class probabilities summing to 1; ``PriorError`` naming ``where`` when they are not."""
    try:
        p = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        p = np.zeros(0)
    if p.shape != (N_CLASSES,) or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise PriorError(f"{where}: class_prior must be {N_CLASSES} non-negative finite numbers, got {values!r:.200}")
    return p / p.sum()


def stored_class_prior(path: str | Path) -> Any:
    """The ``class_prior`` value of the weights.json at ``path`` as stored (None: absent, or no file).

    For tools and tests that hold a file rather than a loaded ``Blend`` (serving takes the prior of the
    blend it loaded through the seal); ``check_class_prior`` checks the value.
    """
    path = Path(path)
    if not path.exists():
        return None
    stored = read_json(path)
    if not isinstance(stored, dict):
        raise PriorError(f"{path}: not a JSON object")
    return stored.get("class_prior")


# --------------------------------------------------------------------------- the stored blend


@dataclass(frozen=True)
class ViewBlend:
    """One view's shipped blend: member -> weight (as stored) and the class bias (None: not used)."""

    weights: Mapping[str, float]
    class_bias: np.ndarray | None = None


@dataclass(frozen=True)
class Blend:
    """The content of weights.json, checked: ``from_dict`` is the one parser, ``to_dict`` the one writer's input.

    ``record`` is the file's content as written (training's diagnostics included; the report reads them);
    the typed fields are what serving and the replays use. ``source`` says where it came from.
    """

    members: tuple[str, ...]
    views: Mapping[str, ViewBlend]
    class_prior: np.ndarray | None = None
    record: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: Any, where: str | Path = WEIGHTS_FILE) -> Blend:
        """Check and type a weights.json record; ``BlendError`` names ``where`` and the field that is wrong."""
        if not isinstance(d, dict):
            raise BlendError(f"{where} is not a weights file of this project (not a JSON object)")
        version = d.get("format_version", 1)  # written before the field existed: version 1
        if version != FORMAT_VERSION:
            raise BlendError(
                f"{where}: format version {version!r}; this code reads version {FORMAT_VERSION} (a file without "
                "format_version is read as version 1): refit it with `python main.py train`"
            )
        try:
            views = {v: {str(m): float(x) for m, x in d["views"][v]["weights"].items()} for v in VIEWS}
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise BlendError(
                f"{where} is not a weights file of this project ({type(e).__name__}: {e}); "
                "delete it to use the ENSEMBLE_W_* defaults, or refit"
            ) from None
        bad = [f"{m} in view {v}: {x}" for v in VIEWS for m, x in views[v].items() if not np.isfinite(x) or x < 0]
        if bad:
            raise BlendError(f"{where}: weights must be finite and >= 0; found " + ", ".join(bad))
        typed = {}
        for v in VIEWS:
            calibration = d["views"][v].get("calibration") or {}
            if not isinstance(calibration, dict):
                raise BlendError(f"{where}: calibration of view {v} is not an object: {calibration!r:.80}")
            bias = calibration.get("class_bias")
            values = None
            if bias is not None:
                try:
                    values = np.asarray(bias, dtype=np.float64)
                except (TypeError, ValueError):
                    values = np.zeros(0)
                if values.shape != (N_CLASSES,) or not np.isfinite(values).all():
                    raise BlendError(
                        f"{where}: class_bias of view {v} must be {N_CLASSES} finite numbers, found {bias!r:.80}"
                    )
            typed[v] = ViewBlend(views[v], values)
        members = d.get("members")
        if members is None:  # files of older tests and tools: the members the views name, in order
            members = list(dict.fromkeys(m for v in VIEWS for m in views[v]))
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise BlendError(f"{where}: members must be a list of member names, found {members!r:.80}")
        prior = d.get("class_prior")
        try:
            prior = None if prior is None else check_class_prior(prior, where)
        except PriorError as e:
            raise BlendError(str(e)) from None
        return cls(tuple(members), typed, prior, dict(d), str(where), FORMAT_VERSION)

    @classmethod
    def defaults(cls, weights: Mapping[str, float], source: str = "ENSEMBLE_W_* defaults") -> Blend:
        """The blend without a fitted weights.json: the same ``weights`` in both views, no class bias, no prior."""
        w = {str(m): float(x) for m, x in weights.items()}
        return cls(tuple(w), {v: ViewBlend(dict(w)) for v in VIEWS}, None, {}, source)

    def to_dict(self) -> dict[str, Any]:
        return {**self.record, "format_version": FORMAT_VERSION}

    def write(self, ensemble_dir: str | Path) -> Path:
        """Write ``<ensemble_dir>/weights.json`` (atomic); returns its path."""
        path = Path(ensemble_dir) / WEIGHTS_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load_sealed(cls, ensemble_dir: str | Path, name: str = WEIGHTS_FILE) -> Blend | None:
        """Serving: the blend in ``ensemble_dir``, parsed only from bytes whose digest matches the manifest.

        None when there is no file (not fitted: the caller uses the ``ENSEMBLE_W_*`` defaults); a damaged,
        unsealed or malformed one raises a ``BundleError`` naming it.
        """
        path = Path(ensemble_dir) / name
        raw = ensemble_seal.read_sealed(ensemble_dir, name)
        if raw is None:
            return None
        return cls.from_dict(ensemble_seal.parse_json(raw, path), path)

    @classmethod
    def read(cls, ensemble_dir: str | Path) -> Blend | None:
        """Training and tools: the blend a training run wrote in ``ensemble_dir`` (None when there is none).

        Not through the seal: the subject post-processing replay runs before the manifest is written.
        Serving uses ``load_sealed``.
        """
        path = Path(ensemble_dir) / WEIGHTS_FILE
        if not path.exists():
            return None
        try:
            d = read_json(path)
        except ValueError as e:
            raise BlendError(str(e)) from None
        return cls.from_dict(d, path)

    def apply(self, view: str, probas: Sequence[np.ndarray]) -> np.ndarray:
        """The view's blend of ``probas`` (one per member, in ``members`` order) with its class bias.

        Weights of members not in ``members`` count 0; all 0: equal weights (what serving does).
        """
        v = self.views[view]
        w = np.array([float(v.weights.get(m, 0.0)) for m in self.members])
        w = np.ones(len(self.members)) if w.sum() <= 0 else w
        return apply_class_bias(mix(probas, w).astype(np.float64), v.class_bias)

    def in_sample_oof(self, oof_dir: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(y, {view: blended OOF}) with the shipped weights and bias, fitted on these very rows: optimistic."""
        oofs = [read_member_oof(oof_dir, m) for m in self.members]
        out = {
            view: self.apply(view, [o.proba_full if view == "full" else o.proba_imu for o in oofs]) for view in VIEWS
        }
        return oofs[0].y_true, out

    def served_by(self, members: Sequence[str]) -> ServedBlend:
        """This blend over the members that loaded: per view their weights renormalised (all 0: equal)."""
        weights = {}
        for view in VIEWS:
            w = self.views[view].weights
            present = {m: float(w.get(m, 0.0)) for m in members}
            if sum(present.values()) <= 0:  # the fitted blend gave all weight to absent members
                present = {m: 1.0 for m in members}
            total = sum(present.values())
            weights[view] = {m: x / total for m, x in present.items()}
        bias = {v: self.views[v].class_bias for v in VIEWS if self.views[v].class_bias is not None}
        return ServedBlend(tuple(members), weights, bias)


class Uncovered(ValueError):
    """No answering member has weight for some rows; ``rows`` marks them."""

    def __init__(self, rows: np.ndarray) -> None:
        super().__init__(f"no answering member has weight for {int(rows.sum())} row(s)")
        self.rows = rows


@dataclass(frozen=True)
class ServedBlend:
    """What serving blends with: per view, member -> weight over the loaded members (summing to 1), and the
    class bias of the views that use one."""

    members: tuple[str, ...]
    weights: Mapping[str, Mapping[str, float]]
    class_bias: Mapping[str, np.ndarray]

    def row_weights(self, has_tof_thm: np.ndarray) -> np.ndarray:
        """(n, n_members): each sequence's weights, from the full view or (no thm/tof value) the IMU-only view."""
        n = len(has_tof_thm)
        return np.array(
            [[self.weights["full" if h else "imu_only"].get(m, 0.0) for m in self.members] for h in has_tof_thm]
        ).reshape(n, len(self.members))

    def combine(self, has_tof_thm: np.ndarray, answers: Mapping[str, np.ndarray]) -> np.ndarray:
        """(n, 18) blended probabilities from the members that answered (a missing one counts weight 0 and the
        others are renormalised per row), then each view's class bias on its rows. ``Uncovered`` when some row
        has no weight left."""
        has_tof_thm = np.asarray(has_tof_thm, dtype=bool)
        n = len(has_tof_thm)
        view_w = self.row_weights(has_tof_thm)
        acc = np.zeros((n, N_CLASSES))
        wsum = np.zeros(n)
        for j, name in enumerate(self.members):
            if name not in answers:
                continue
            acc += view_w[:, j : j + 1] * answers[name]
            wsum += view_w[:, j]
        if (wsum <= 0).any():
            raise Uncovered(wsum <= 0)
        proba = acc / wsum[:, None]
        for view, bias in self.class_bias.items():
            rows = has_tof_thm if view == "full" else ~has_tof_thm
            if rows.any():
                proba[rows] = apply_class_bias(proba[rows], bias)
        return proba


# --------------------------------------------------------------------------- the honest blend OOF


def honest_oof_exists(ensemble_dir: str | Path) -> bool:
    return (Path(ensemble_dir) / HONEST_OOF_DIR / f"{BLEND}_summary.json").exists()


def honest_oof(ensemble_dir: str | Path) -> MemberOOF | None:
    """The served blend's cross-fitted OOF (``<ensemble>/oof/blend``), None when training wrote none."""
    if not honest_oof_exists(ensemble_dir):
        return None
    return read_member_oof(Path(ensemble_dir) / HONEST_OOF_DIR, BLEND)


def shipped_oof(ensemble_dir: str | Path, oof_dir: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray], bool]:
    """(y, {view: OOF probabilities of the shipped blend}, honest).

    The cross-fitted blend OOF when it exists (honest: no fold's rows depend on its labels); else the
    shipped weights and bias applied to the members' OOF in ``oof_dir`` (fitted on those rows: optimistic,
    logged). ``BlendError`` when neither exists.
    """
    b = honest_oof(ensemble_dir)
    if b is not None:
        return b.y_true, {"full": b.proba_full.astype(np.float64), "imu_only": b.proba_imu.astype(np.float64)}, True
    fitted = Blend.read(ensemble_dir)
    if fitted is None:
        raise BlendError(f"no {Path(ensemble_dir) / WEIGHTS_FILE} and no blend OOF beside it")
    log.info(
        "no cross-fitted blend OOF in %s: the shipped weights are applied to the members' OOF (optimistic)",
        Path(ensemble_dir) / HONEST_OOF_DIR,
    )
    y, out = fitted.in_sample_oof(oof_dir)
    return y, out, False
