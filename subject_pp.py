"""Subject-level post-processing: each subject performs a fixed protocol, so its answers are assigned jointly.

Three parts, all learned from training labels and stored as data in the ensemble folder:

* ``learn_protocol``: per subject, count sequences per (orientation, gesture) pair and per
  gesture; when enough training subjects stay within one per-pair (else per-gesture) count
  table, that table is the protocol: slots with capacities (``protocol.json``). Without such
  a regularity the kind is "none" and post-processing does nothing.
* an orientation model (test.csv has no orientation): LightGBM on the gravity/acc aggregates
  of the IMU view, OOF on the shared folds, stored as LightGBM text (``orientation_model.txt``).
* ``SubjectAssigner``: per-subject state across ``predict`` calls. For each new sequence the
  subject's sequences so far are assigned to the slots (``linear_sum_assignment`` on
  -log P(slot), capacities expanded into columns) and the current sequence gets its slot's
  gesture. Earlier answers are never revised (the gateway keeps them), but their
  probabilities still shape every later assignment: re-solving with all rows is what lets a
  confident later sequence push an earlier, uncertain one out of a slot it would double-book.

``simulate_online`` replays the OOF probabilities of each fold's validation subjects in random
orders through the same assigner and scores them: the measurement without the hidden test. The
probabilities are the shipped blend's (``blend.shipped_oof``: the cross-fitted blend OOF).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy.optimize import linear_sum_assignment

import ensemble_seal
import serving_guard
from blend import WEIGHTS_FILE, Blend, BlendError, honest_oof_exists, shipped_oof
from config import Config, EnsembleConfig
from features import FrameTable, sequence_aggregates
from io_utils import atomic_path, write_json
from metric import GESTURES, score_indices

log = logging.getLogger(__name__)

PROTOCOL_FILE = "protocol.json"
ORIENTATION_MODEL_FILE = "orientation_model.txt"
FORMAT_VERSION = 1
ANY_ORIENTATION = "*"  # slot of a per-gesture protocol: the orientation is not constrained
ORIENTATION_CHANNELS: tuple[str, ...] = ("gravity_x", "gravity_y", "gravity_z", "acc_x", "acc_y", "acc_z")
_EPS = 1e-6  # probability floor inside the log: a zero from one member must not forbid a slot outright


class ProtocolError(ValueError):
    """A protocol or orientation file that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------- protocol learning


@dataclass(frozen=True)
class Protocol:
    kind: str  # "pair" (per (orientation, gesture) capacities), "gesture" (per gesture), or "none"
    slots: tuple[tuple[str, str, int], ...] = ()  # (orientation or "*", gesture, capacity)
    orientations: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.kind != "none" and bool(self.slots)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "orientations": list(self.orientations),
            "slots": [{"orientation": o, "gesture": g, "capacity": c} for o, g, c in self.slots],
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "protocol") -> Protocol:
        try:
            if d["format_version"] != FORMAT_VERSION:
                raise ProtocolError(f"{where}: format version {d['format_version']}, this code reads {FORMAT_VERSION}")
            slots = tuple((str(s["orientation"]), str(s["gesture"]), int(s["capacity"])) for s in d["slots"])
            kind, orients = str(d["kind"]), tuple(str(o) for o in d["orientations"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ProtocolError):
                raise
            raise ProtocolError(f"{where} is not a protocol file of this project ({type(e).__name__}: {e})") from None
        bad = sorted({g for _, g, _ in slots} - set(GESTURES))
        if bad:
            raise ProtocolError(f"{where}: unknown gesture(s) in slots: {bad[:3]}")
        if kind not in ("pair", "gesture", "none") or any(c < 1 for _, _, c in slots):
            raise ProtocolError(f"{where}: kind {kind!r} or a capacity below 1")
        return cls(kind, slots, orients, dict(d.get("info") or {}))


def _at_most_table(counts: dict[str, Counter], min_share: float) -> tuple[dict[Any, int], float] | None:
    """Per key, the most common count over subjects (missing = 0); and the share of subjects within it."""
    keys = sorted({k for c in counts.values() for k in c})
    if not keys or not counts:
        return None
    table = {}
    for k in keys:
        values = Counter(c.get(k, 0) for c in counts.values())
        table[k] = max(values.items(), key=lambda kv: (kv[1], kv[0]))[0]  # the mode; ties to the larger count
    within = [all(c.get(k, 0) <= table[k] for k in keys) and not (set(c) - set(keys)) for c in counts.values()]
    share = float(np.mean(within))
    table = {k: v for k, v in table.items() if v > 0}
    return (table, share) if share >= min_share and table else None


def learn_protocol(
    subjects: list[str] | np.ndarray,
    orientations: list[str] | np.ndarray,
    gestures: list[str] | np.ndarray,
    min_share: float = 0.8,
) -> Protocol:
    """The constraint the training subjects consistently follow, from their labels.

    First tried: each (orientation, gesture) pair at most c times per subject, c the most
    common count of the pair; kept when at least ``min_share`` of the subjects stay within
    every pair's c. Else the same per gesture. Else no protocol (kind "none").
    """
    subjects, orientations, gestures = (np.asarray(a).astype(str) for a in (subjects, orientations, gestures))
    if not (len(subjects) == len(orientations) == len(gestures)):
        raise ValueError("subjects, orientations and gestures differ in length")
    pair_counts: dict[str, Counter] = {}
    gesture_counts: dict[str, Counter] = {}
    for s, o, g in zip(subjects, orientations, gestures):
        pair_counts.setdefault(s, Counter())[(o, g)] += 1
        gesture_counts.setdefault(s, Counter())[g] += 1
    n_subj = len(pair_counts)
    per_subject = sorted(sum(c.values()) for c in pair_counts.values())
    info: dict[str, Any] = {
        "n_subjects": n_subj,
        "min_share": min_share,
        "sequences_per_subject": {
            "min": per_subject[0] if per_subject else 0,
            "max": per_subject[-1] if per_subject else 0,
        },
    }
    if n_subj < 2:
        info["reason"] = f"{n_subj} training subject(s): no regularity can be established"
        log.info("subject post-processing: %s; it will do nothing", info["reason"])
        return Protocol("none", info=info)
    pair = _at_most_table(pair_counts, min_share)
    if pair is not None and len({o for o, _ in pair[0]}) < 2:
        # one orientation: nothing for an orientation model to tell apart (LightGBM refuses one class); the
        # pair capacities summed per gesture are the same constraint, scored by gesture only as serving would
        table, share = pair
        (only,) = {o for o, _ in table}
        slots = tuple((o, g, c) for (o, g), c in sorted(table.items()))
        info |= {"share_within": share, "capacity_total": sum(c for *_, c in slots)}
        protocol = _per_gesture(
            Protocol("pair", slots, (only,), info),
            f"one orientation ({only!r}) in the protocol: per-gesture slots, no orientation model",
        )
        log.warning(
            "protocol learned with one orientation (%r): %d per-gesture slots, %d sequences per subject at most; "
            "the orientation model is skipped (nothing to tell apart)",
            only,
            len(protocol.slots),
            info["capacity_total"],
        )
        return protocol
    if pair is not None:
        table, share = pair
        orients = tuple(sorted({o for o, _ in table}))
        slots = tuple((o, g, c) for (o, g), c in sorted(table.items()))
        info |= {
            "share_within": share,
            "n_slots": len(slots),
            "capacity_total": sum(c for *_, c in slots),
            "capacities": dict(Counter(c for *_, c in slots)),
        }
        log.info(
            "protocol learned: %d (orientation, gesture) pairs, %d sequences per subject at most; "
            "%.0f%% of %d training subjects within it",
            len(slots),
            info["capacity_total"],
            100 * share,
            n_subj,
        )
        return Protocol("pair", slots, orients, info)
    ges = _at_most_table(gesture_counts, min_share)
    if ges is not None:
        table, share = ges
        slots = tuple((ANY_ORIENTATION, g, c) for g, c in sorted(table.items()))
        info |= {"share_within": share, "n_slots": len(slots), "capacity_total": sum(c for *_, c in slots)}
        log.info(
            "protocol learned per gesture only (pairs irregular): %d gestures; %.0f%% of subjects within it",
            len(slots),
            100 * share,
        )
        return Protocol("gesture", slots, (), info)
    info["reason"] = f"fewer than {min_share:.0%} of the subjects share one per-pair or per-gesture count table"
    log.info("subject post-processing: no protocol (%s); it will do nothing", info["reason"])
    return Protocol("none", info=info)


# --------------------------------------------------------------------------- orientation model


def orientation_features(table: FrameTable, cfg: Config) -> tuple[np.ndarray, list[str]]:
    """Posture aggregates of the IMU view: gravity direction and raw acc, whole sequence and final part."""
    X, names = sequence_aggregates(table, cfg.features, imu_only=True)
    keep = [i for i, n in enumerate(names) if n.split("__")[0] in ORIENTATION_CHANNELS]
    return X[:, keep], [names[i] for i in keep]


def _orientation_params(cfg: Config, n_class: int) -> dict[str, Any]:
    return {
        "objective": "multiclass",
        "num_class": n_class,
        "learning_rate": 0.08,
        "num_leaves": 15,
        "min_data_in_leaf": 10,
        "feature_fraction": 0.8,
        "lambda_l2": 1.0,
        "num_threads": cfg.run.n_threads,
        "deterministic": True,
        "force_col_wise": True,
        "verbosity": -1,
        "seed": cfg.run.seed,
    }


def orientation_model_problem(orient_idx: np.ndarray, n_class: int, fold_ids: np.ndarray) -> str:
    """Why an orientation model cannot be fitted on these labels and folds ("" when it can)."""
    orient_idx, fold_ids = np.asarray(orient_idx), np.asarray(fold_ids)
    present = np.unique(orient_idx)
    if n_class < 2 or len(present) < 2:
        return f"{len(present)} orientation class(es) among the sequences: nothing to tell apart"
    folds = np.unique(fold_ids)
    if len(folds) < 2:
        return f"the sequences lie in {len(folds)} fold(s): no out-of-fold estimate"
    return ""


def fit_orientation_model(
    X: np.ndarray,
    orient_idx: np.ndarray,
    n_class: int,
    fold_ids: np.ndarray,
    cfg: Config,
    feature_names: list[str],
    rounds: int = 150,
) -> tuple[Any, np.ndarray]:
    """OOF probabilities on the shared folds, and one booster trained on every sequence for serving.

    Raises ``ProtocolError`` on inputs it cannot fit (fewer than 2 classes, a fold with no training rows);
    ``orientation_model_problem`` says so up front, which is how ``fit_and_evaluate`` skips it.
    """
    import lightgbm as lgb

    problem = orientation_model_problem(orient_idx, n_class, fold_ids)
    if problem:
        raise ProtocolError(f"orientation model cannot be fitted: {problem}")
    oof = np.zeros((len(X), n_class))
    params = _orientation_params(cfg, n_class)
    for k in np.unique(fold_ids):
        tr, va = fold_ids != k, fold_ids == k
        booster = lgb.train(
            params, lgb.Dataset(X[tr], label=orient_idx[tr], feature_name=feature_names), num_boost_round=rounds
        )
        oof[va] = booster.predict(X[va])
    final = lgb.train(params, lgb.Dataset(X, label=orient_idx, feature_name=feature_names), num_boost_round=rounds)
    return final, oof


class OrientationModel:
    """The stored orientation booster: P(orientation) per sequence, in ``classes`` order."""

    def __init__(self, booster: Any, classes: tuple[str, ...], feature_names: list[str], cfg: Config) -> None:
        self.booster, self.classes, self.feature_names, self.cfg = booster, classes, feature_names, cfg

    def predict_proba(self, table: FrameTable) -> np.ndarray:
        X, names = orientation_features(table, self.cfg)
        if names != self.feature_names:
            raise ProtocolError("orientation features differ from the stored model's: retrain")
        return np.asarray(self.booster.predict(X, num_threads=self.cfg.run.n_threads)).reshape(len(X), -1)


# --------------------------------------------------------------------------- online assignment


def slot_log_proba(protocol: Protocol, gesture_proba: np.ndarray, orient_proba: np.ndarray | None) -> np.ndarray:
    """(n, n_slots) log P(slot) with P(slot=(o, g)) proportional to P(g) P(o); per-gesture slots use P(g)."""
    gp = np.log(np.clip(np.asarray(gesture_proba, np.float64), _EPS, None))
    g_idx = np.array([GESTURES.index(g) for _, g, _ in protocol.slots])
    out = gp[:, g_idx]
    if protocol.kind == "pair" and orient_proba is not None:
        op = np.log(np.clip(np.asarray(orient_proba, np.float64), _EPS, None))
        o_idx = np.array([protocol.orientations.index(o) for o, _, _ in protocol.slots])
        out = out + op[:, o_idx]
    return out


@dataclass
class _SubjectState:
    # log P(slot) of the subject's sequences by sequence id, in arrival order; a repeated id replaces its row
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    calls: int = 0
    warned_over: bool = False
    warned_history: bool = False


class SubjectAssigner:
    """Per-subject online assignment to protocol slots; one instance per Predictor (no global state).

    Bounded: at most ``max_history`` sequences per subject and ``max_subjects`` subjects
    (``ENSEMBLE_SERVE_MAX_SUBJECTS``): beyond it the least recently seen subject is forgotten (counted in
    ``n_evicted``, logged now and then); should it come back, its assignment starts afresh. Not
    thread-safe on its own: the Predictor calls it under its lock.
    """

    def __init__(
        self, protocol: Protocol, max_history: int = 400, max_subjects: int = EnsembleConfig.serve_max_subjects
    ) -> None:
        self.protocol = protocol
        self.max_history = int(max_history)
        self.max_subjects = int(max_subjects)
        caps = np.array([c for *_, c in protocol.slots], dtype=np.int64)
        self.col_slot = np.repeat(np.arange(len(caps)), caps)  # capacity expanded into columns
        self.slot_gesture = np.array([GESTURES.index(g) for _, g, _ in protocol.slots], dtype=np.int64)
        self.state: OrderedDict[str, _SubjectState] = OrderedDict()  # least recently seen first
        self.n_over_capacity = 0
        self.n_evicted = 0

    def _subject(self, subject: str) -> _SubjectState:
        """The subject's state, now the most recently seen; a new subject may evict the least recent one."""
        st, evicted = serving_guard.subject_state(self.state, subject, _SubjectState, self.max_subjects)
        for gone, old in evicted:
            self.n_evicted += 1
            if self.n_evicted == 1 or self.n_evicted % self.max_subjects == 0:  # now and then, not per call
                log.warning(
                    "subject post-processing: state is kept for at most %d subjects (ENSEMBLE_SERVE_MAX_SUBJECTS): "
                    "%d least recently seen forgotten so far (latest %s, %d sequence(s))",
                    self.max_subjects,
                    self.n_evicted,
                    gone,
                    len(old.rows),
                )
        return st

    def answer(self, subject: str, slot_logp: np.ndarray, sequence_id: str | None = None) -> int:
        """Gesture index for the subject's newest sequence, given its (n_slots,) log P(slot).

        A ``sequence_id`` seen before (a retried call) replaces that sequence's row instead of
        taking a second slot; without an id every call is a new sequence.
        """
        st = self._subject(subject)
        st.calls += 1
        key = sequence_id if sequence_id is not None else f"#call{st.calls}"
        st.rows.pop(key, None)  # the current sequence is always the last row
        st.rows[key] = np.asarray(slot_logp, np.float64)
        if len(st.rows) > self.max_history:  # bounded memory and cost: the oldest sequence is forgotten
            st.rows.pop(next(iter(st.rows)))
            if not st.warned_history:
                st.warned_history = True
                log.warning(
                    "subject %s: more than %d sequences; the oldest are forgotten by the assignment",
                    subject,
                    self.max_history,
                )
        L = np.stack(list(st.rows.values()))
        cols = self.col_slot
        if len(L) > len(cols):  # more sequences than slots: relax every capacity by the same factor
            k = -(-len(L) // len(cols))
            cols = np.tile(cols, k)
            if not st.warned_over:
                st.warned_over = True
                self.n_over_capacity += 1
                log.warning(
                    "subject %s: %d sequences for %d protocol slots; capacities relaxed x%d",
                    subject,
                    len(L),
                    len(self.col_slot),
                    k,
                )
        rows, assigned = linear_sum_assignment(-L[:, cols])
        slot = int(cols[assigned[np.flatnonzero(rows == len(L) - 1)[0]]])
        return int(self.slot_gesture[slot])

    def summary(self) -> dict[str, Any]:
        return {
            "subjects": len(self.state),
            "sequences": sum(len(s.rows) for s in self.state.values()),
            "subjects_over_capacity": self.n_over_capacity,
            "subjects_evicted": self.n_evicted,
            "max_subjects": self.max_subjects,
        }


class SubjectPostProcessor:
    """What the Predictor holds: protocol + orientation model + assigner; ``answer`` is the whole hook."""

    def __init__(self, protocol: Protocol | None, orientation: OrientationModel | None, cfg: Config) -> None:
        self.protocol, self.orientation, self.cfg = protocol, orientation, cfg
        self.enabled = bool(cfg.ensemble.subject_pp and protocol is not None and protocol.active)
        self.assigner = (
            SubjectAssigner(protocol, cfg.ensemble.subject_pp_max_history, cfg.ensemble.serve_max_subjects)
            if self.enabled
            else None
        )
        self.calls_without_subject = 0
        self.seconds = 0.0

    @classmethod
    def load(cls, ensemble_dir: str | Path, cfg: Config) -> SubjectPostProcessor:
        path = Path(ensemble_dir) / PROTOCOL_FILE
        if not cfg.ensemble.subject_pp:
            log.info("subject post-processing switched off (ENSEMBLE_SUBJECT_PP=0): plain argmax")
            return cls(None, None, cfg)
        raw = ensemble_seal.read_sealed(ensemble_dir, PROTOCOL_FILE)  # digest checked against manifest.json
        if raw is None:
            log.info("no %s: no subject post-processing", path)
            return cls(None, None, cfg)
        d = ensemble_seal.parse_json(raw, path)
        protocol = Protocol.from_dict(d, str(path))
        if not protocol.active:
            log.info(
                "%s: training showed no protocol (%s): no subject post-processing",
                path,
                protocol.info.get("reason", "kind none"),
            )
            return cls(protocol, None, cfg)
        orientation = None
        model_path = Path(ensemble_dir) / ORIENTATION_MODEL_FILE
        if protocol.kind == "pair":
            # LightGBM's parser can crash the interpreter on a truncated file: it sees only the sealed bytes.
            model_raw = ensemble_seal.read_sealed(ensemble_dir, ORIENTATION_MODEL_FILE)
            if model_raw is None:
                log.warning("%s missing: slots scored by gesture only (orientation uniform)", model_path)
            else:
                import lightgbm as lgb

                try:
                    booster = lgb.Booster(model_str=model_raw.decode("utf-8"))
                except (lgb.basic.LightGBMError, UnicodeDecodeError) as e:
                    raise ProtocolError(f"{model_path}: not a readable LightGBM model file: {e}") from None
                names = list(d.get("orientation_features") or [])
                if list(booster.feature_name()) != names or int(booster.num_model_per_iteration()) != len(
                    protocol.orientations
                ):
                    raise ProtocolError(f"{model_path} does not match {path} (features or orientation classes)")
                orientation = OrientationModel(booster, protocol.orientations, names, cfg)
        log.info("subject post-processing from %s: %s protocol, %d slots", path, protocol.kind, len(protocol.slots))
        return cls(protocol, orientation, cfg)

    def answer(self, subject: str, table: FrameTable, proba: np.ndarray) -> int:
        """Gesture index for the table's one sequence: the assigned slot's, or the argmax without a subject/protocol."""
        plain = int(np.argmax(proba))
        if not self.enabled:
            return plain
        if not subject:
            self.calls_without_subject += 1
            if self.calls_without_subject == 1:
                log.warning(
                    "sequence %s has no subject: answered without subject post-processing "
                    "(further cases are only counted)",
                    table.sequence_ids[0],
                )
            return plain
        t0 = time.perf_counter()
        op = self.orientation.predict_proba(table) if self.orientation is not None else None
        out = self.assigner.answer(
            subject, slot_log_proba(self.protocol, np.asarray(proba)[None, :], op)[0], str(table.sequence_ids[0])
        )
        self.seconds += time.perf_counter() - t0
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "kind": self.protocol.kind if self.protocol else None,
            "calls_without_subject": self.calls_without_subject,
            "seconds": self.seconds,
            **(self.assigner.summary() if self.assigner else {}),
        }


# --------------------------------------------------------------------------- OOF simulation


def simulate_online(
    protocol: Protocol,
    y: np.ndarray,
    gesture_proba: np.ndarray,
    orient_proba: np.ndarray | None,
    subjects: np.ndarray,
    n_orders: int,
    seed: int,
    max_history: int = 400,
    fold_ids: np.ndarray | None = None,
) -> dict[str, Any]:
    """Feed each subject's sequences in ``n_orders`` random orders through a fresh assigner; score each order.

    Subjects are independent (state is per subject), so interleaving them changes nothing and
    each order is a permutation within every subject. With ``fold_ids`` the same replays are
    also scored per fold (each fold's validation subjects).
    """
    rng = np.random.default_rng(seed)
    logp = slot_log_proba(protocol, gesture_proba, orient_proba)
    plain = gesture_proba.argmax(1)
    base = score_indices(y, plain)
    groups = {s: np.flatnonzero(subjects == s) for s in sorted(set(subjects.tolist()))}
    scores, fold_scores = [], {}
    folds = [] if fold_ids is None else sorted(int(k) for k in np.unique(fold_ids))
    for _ in range(n_orders):
        assigner = SubjectAssigner(protocol, max_history, max_subjects=max(1, len(groups)))  # a replay evicts none
        pred = np.empty(len(y), dtype=np.int64)
        for s, idx in groups.items():
            for i in idx[rng.permutation(len(idx))]:
                pred[i] = assigner.answer(s, logp[i])
        scores.append(score_indices(y, pred))
        for k in folds:
            m = fold_ids == k
            fold_scores.setdefault(k, []).append(score_indices(y[m], pred[m]))
    sc = np.asarray(scores)
    out: dict[str, Any] = {
        "no_pp": base,
        "mean": float(sc.mean()),
        "min": float(sc.min()),
        "max": float(sc.max()),
        "std": float(sc.std()),
        "gain_mean": float(sc.mean() - base),
        "gain_min": float(sc.min() - base),
        "gain_max": float(sc.max() - base),
        "orders": int(n_orders),
        "scores": sc.tolist(),
    }
    if folds:
        out["per_fold"] = {}
        for k in folds:
            m = fold_ids == k
            b, f = score_indices(y[m], plain[m]), np.asarray(fold_scores[k])
            out["per_fold"][k] = {
                "no_pp": b,
                "mean": float(f.mean()),
                "min": float(f.min()),
                "max": float(f.max()),
                "gain_mean": float(f.mean() - b),
            }
    return out


def _replay_problem(out_dir: Path, ens_dir: Path) -> str:
    """Why the OOF replay cannot run ("" when it can): it needs the blend and its OOF (the honest one in
    ``ensemble/oof``, else every blended member's OOF to apply the shipped weights to)."""
    weights_path = ens_dir / WEIGHTS_FILE
    if not weights_path.exists():
        return f"no {weights_path} (no member was blended)"
    if honest_oof_exists(ens_dir):
        return ""
    try:
        fitted = Blend.read(ens_dir)
    except BlendError as e:
        return f"{weights_path} cannot be read ({e})"
    blended = list(fitted.members) if fitted is not None else []
    missing = [m for m in blended if not (out_dir / "oof" / f"{m}_summary.json").exists()]
    if not blended or missing:
        return f"no OOF in {out_dir / 'oof'} for blended member(s) {missing or blended}"
    return ""


def fit_and_evaluate(
    out_dir: str | Path, table: FrameTable, labels: pl.DataFrame, y: np.ndarray, fold_ids: np.ndarray, cfg: Config
) -> dict[str, Any]:
    """Learn the protocol and the orientation model, write them beside weights.json, and simulate the gateway on OOF.

    Writes ``ensemble/protocol.json``, ``ensemble/orientation_model.txt`` (pair protocols only) and
    ``oof/subject_pp_replay.json``. Parts the data cannot support are skipped, logged at WARNING and listed
    under ``skipped`` in the replay file (and the returned summary): no protocol with fewer than 2 subjects,
    no orientation model with one orientation value (or no orientation column) or with every sequence in one
    fold, no replay without blend weights or without the blended members' OOF. An earlier run's protocol and
    orientation model are removed first, so a failure here never leaves them beside these bundles.
    """
    out_dir = Path(out_dir)
    ens_dir = out_dir / "ensemble"
    t0 = time.perf_counter()
    for name in (PROTOCOL_FILE, ORIENTATION_MODEL_FILE):
        stale = ens_dir / name
        if stale.exists():
            stale.unlink()
            log.info("removed the earlier run's %s", stale)
    missing = [c for c in ("sequence_id", "subject", "gesture") if c not in labels.columns]
    if missing:
        raise ProtocolError(f"training labels lack column(s) {missing}")
    if labels["sequence_id"].to_list() != [str(s) for s in table.sequence_ids] or len(y) != labels.height:
        raise ProtocolError("training labels, table and y hold different sequences (or another order)")
    skipped: dict[str, str] = {}

    def skip(step: str, reason: str) -> None:
        skipped[step] = reason
        log.warning("subject post-processing: %s skipped: %s", step, reason)

    subjects = labels["subject"].to_numpy().astype(str)
    if "orientation" in labels.columns:
        orients = labels["orientation"].to_numpy().astype(str)
    else:
        orients = np.full(len(subjects), "unknown")
        skip("orientation model", "the training labels have no orientation column")
    n_subjects = len(set(subjects.tolist()))
    protocol = learn_protocol(
        subjects, orients, labels["gesture"].to_numpy().astype(str), cfg.ensemble.subject_pp_min_share
    )
    if n_subjects < 2:
        skip("protocol", protocol.info.get("reason", f"{n_subjects} training subject(s)"))
    if "orientation_note" in protocol.info and "orientation model" not in skipped:
        skip("orientation model", protocol.info["orientation_note"])
    summary: dict[str, Any] = {"protocol": {"kind": protocol.kind, **protocol.info}}
    orient_oof = None
    if protocol.kind == "pair":
        o_idx = np.array([protocol.orientations.index(o) if o in protocol.orientations else -1 for o in orients])
        known = o_idx >= 0  # an orientation of no slot: not a class of the model
        problem = orientation_model_problem(o_idx[known], len(protocol.orientations), fold_ids[known])
        if problem:  # scored by gesture only: the pair capacities summed per gesture are what serving would use
            skip("orientation model", problem)
            protocol = _per_gesture(protocol, f"orientation model skipped: {problem}")
            summary["protocol"] = {"kind": protocol.kind, **protocol.info}
    pdict = protocol.to_dict()
    if protocol.kind == "pair":
        X, names = orientation_features(table, cfg)
        booster, oof_k = fit_orientation_model(
            X[known], o_idx[known], len(protocol.orientations), fold_ids[known], cfg, names
        )
        orient_oof = np.full((len(X), len(protocol.orientations)), 1.0 / len(protocol.orientations))
        orient_oof[known] = oof_k
        acc = float((oof_k.argmax(1) == o_idx[known]).mean())
        summary["orientation_oof_accuracy"] = acc
        summary["orientation_oof_accuracy_per_fold"] = {
            int(k): float((oof_k.argmax(1) == o_idx[known])[fold_ids[known] == k].mean())
            for k in np.unique(fold_ids[known])
        }
        log.info("orientation model: OOF accuracy %.4f over %d classes", acc, len(protocol.orientations))
        pdict["orientation_features"] = names
        with atomic_path(ens_dir / ORIENTATION_MODEL_FILE) as tmp:
            booster.save_model(str(tmp))
    write_json(ens_dir / PROTOCOL_FILE, pdict)
    problem = _replay_problem(out_dir, ens_dir) if protocol.active else ""
    if problem:
        skip("OOF replay", problem)
        summary["simulation"] = None
    elif protocol.active:
        # the shipped blend's OOF: cross-fitted (ensemble/oof) when training wrote it, else in-sample (logged)
        y_oof, blended, _ = shipped_oof(ens_dir, out_dir / "oof")
        if not np.array_equal(y_oof, y):
            raise ProtocolError(f"{out_dir / 'oof'} holds other sequences than the training table")
        n_orders, seed = cfg.ensemble.subject_pp_orders, cfg.run.seed
        rng = np.random.default_rng(seed)
        imu_mask = rng.random(len(y)) < 0.5  # test-like: half the sequences IMU-only, as in the hidden test
        views = {
            "full": blended["full"],
            "imu_only": blended["imu_only"],
            "mixed": np.where(imu_mask[:, None], blended["imu_only"], blended["full"]),
        }
        sims: dict[str, Any] = {}
        for name, p in views.items():
            sims[name] = simulate_online(
                protocol, y, p, orient_oof, subjects, n_orders, seed, cfg.ensemble.subject_pp_max_history, fold_ids
            )
            log.info(
                "subject PP OOF simulation (%s view, %d orders): %.4f -> mean %.4f (min %.4f, max %.4f; gain %+.4f)",
                name,
                n_orders,
                sims[name]["no_pp"],
                sims[name]["mean"],
                sims[name]["min"],
                sims[name]["max"],
                sims[name]["gain_mean"],
            )
        summary["simulation"] = sims
        if orient_oof is not None:  # what the orientation model adds: the same replays, slots scored by gesture only
            r = simulate_online(
                protocol, y, views["mixed"], None, subjects, n_orders, seed, cfg.ensemble.subject_pp_max_history
            )
            summary["simulation_mixed_without_orientation"] = {k: v for k, v in r.items() if k != "scores"}
    else:
        summary["simulation"] = None
    summary["skipped"] = skipped
    summary["seconds"] = time.perf_counter() - t0
    write_json(out_dir / "oof" / "subject_pp_replay.json", summary)  # not *_summary.json: that pattern means a member
    return summary


def _per_gesture(protocol: Protocol, note: str) -> Protocol:
    """A pair protocol scored without orientation: its capacities summed per gesture (what serving would do)."""
    caps: Counter = Counter()
    for _, g, c in protocol.slots:
        caps[g] += c
    slots = tuple((ANY_ORIENTATION, g, c) for g, c in sorted(caps.items()))
    info = {
        **protocol.info,
        "n_slots": len(slots),
        "capacities": dict(Counter(c for *_, c in slots)),
        "orientation_note": note,
    }
    return Protocol("gesture", slots, (), info)
