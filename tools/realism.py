"""How far a data set (and a finished run on it) is from the real competition data: ``main.py realism``.

Every figure of ``../shared/docs/REAL_DATA_FACTS.md`` §1–4 that can be computed from a folder in the
competition layout (``train.csv``, ``train_demographics.csv``, and the generator's ``synth_info.json``
when present) or from a run's OOF files (``<run>/oof``) is computed here and printed beside the real
figure, its source and — where the project has set one — the range a realistic generated set must fall
in (issue "Development data that behave like the real competition data"). The table is the yardstick
of the generator: ``docs/SYNTH.md`` carries the one this command writes.

Nothing here trains or serves; it only reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from io_utils import read_json, write_json, write_text
from metric import GESTURES, TARGET_GESTURES, per_class_f1, score_components

log = logging.getLogger(__name__)

INITIAL_BEHAVIOURS = ("Moves hand to target location", "Relaxes and moves hand to target location")
GESTURE_BEHAVIOUR = "Performs gesture"
PAUSE_BEHAVIOUR = "Hand at target location"
NETWORKS = ("torch", "keras", "branchnet")  # members that read the temporal shape (the rest: aggregates)


@dataclass(frozen=True)
class Fact:
    """One real-data figure: what it is, the real value (as the source states it), its source and grade."""

    key: str
    what: str
    real: str
    source: str
    lo: float | None = None  # the range a realistic generated set should fall in (None: compare by eye)
    hi: float | None = None


# Sources as named in REAL_DATA_FACTS.md (A = computed on the real data, B = reported from real CV).
FACTS: tuple[Fact, ...] = (
    Fact("pairs", "(orientation, gesture) pairs present", "51", "§1 A", 51, 51),
    Fact(
        "slots_once",
        "share of a subject's (pair, initial behaviour) slots used exactly once",
        "1.00",
        "§1 A/B",
        0.97,
        1.0,
    ),
    Fact("seq_per_subject", "sequences per subject", "~100.6 (8,151 / 81)", "§1 A", 95, 102),
    Fact("behaviour_values", "distinct `behavior` values", "4", "§1 A", 4, 4),
    Fact("gesture_rows_mean", "rows of the gesture segment, mean", "31.4 (sd 3.6)", "§1 A", 27, 36),
    Fact("gesture_rows_sd", "rows of the gesture segment, sd", "3.6", "§1 A", 2, 6),
    Fact("pause_rows_median", "rows of the pause (hand at target), median", "8 (mean 11.7)", "§1 A", 5, 12),
    Fact("relax_rows_median", "rows of 'Relaxes and moves', median", "15 (mean 16.7)", "§1 A", 10, 20),
    Fact("move_rows_median", "rows of 'Moves hand to target', median", "28 (mean 38.1, long tail)", "§1 A", 20, 36),
    Fact("gesture_row_share", "share of rows in the gesture segment", "0.445", "§1 A", 0.38, 0.52),
    Fact("len_min", "sequence length, min", "29", "§1 A"),
    Fact("len_median", "sequence length, median", "59", "§1 A", 50, 70),
    Fact("len_p95", "sequence length, p95", "127", "§1 A", 100, 160),
    Fact("len_max", "sequence length, max", "700", "§1 A"),
    Fact("acc_norm_mean", "acc norm mean (m/s², gravity included)", "10.01", "§2 A", 9.6, 10.4),
    Fact("acc_norm_sd", "acc norm sd", "1.21", "§2 A", 0.8, 1.6),
    Fact("mad_target", "per-sequence MAD of the acc norm, targets (mean)", "0.47", "§2 A"),
    Fact("mad_non_target", "per-sequence MAD of the acc norm, non-targets (mean)", "0.87", "§2 A"),
    Fact("rot_missing_seq", "share of sequences without rotation", "0.0061 (~50 of 8,151)", "§2 B", 0.002, 0.012),
    Fact("thm_median", "thermopile median (°C)", "27.8", "§2 A", 26.5, 29.5),
    Fact("thm_p5", "thermopile p5 (°C)", "24.0", "§2 A"),
    Fact("thm_p95", "thermopile p95 (°C)", "32.2", "§2 A"),
    Fact("tof_minus1_share", "share of ToF pixels at −1 (nothing in range)", "0.575", "§2 A", 0.45, 0.65),
    Fact("tof_valid_median", "median of valid ToF readings", "~106", "§2 A"),
    Fact("tof5_only_missing", "share of sequences lacking exactly tof_5", "0.041", "§2 A", 0.025, 0.06),
    Fact("no_tof", "share of sequences with no ToF at all", "0.0118", "§2 A", 0.005, 0.02),
    Fact("left_handed", "share of left-handed subjects", "0.123 (10 of 81)", "§2 A", 0.08, 0.17),
    Fact("rotated_wearers", "share of subjects wearing the device rotated 180° about z", "0.025 (2 of 81)", "§2 A"),
    # §3-4: a finished run's OOF (IMU-only view unless said otherwise)
    Fact("lgbm_imu_score", "LightGBM IMU-only score", "0.704 ± 0.008", "§3 A/B", 0.66, 0.75),
    Fact("lgbm_imu_binary", "LightGBM IMU-only binary F1", "0.963", "§3 A/B", 0.95, 0.98),
    Fact("lgbm_imu_macro", "LightGBM IMU-only macro F1", "0.457", "§3 A/B"),
    Fact("net_imu_score", "best network IMU-only score", "0.81–0.83", "§3 A"),
    Fact("net_minus_lgbm_imu", "best network minus LightGBM, IMU-only", "+0.08 to +0.13", "§3 A", 0.06, 0.20),
    Fact("net_full_score", "best network all-sensor score", "0.855–0.891", "§3 A"),
    Fact("net_tof_gain", "best network: all sensors minus IMU-only", "+0.045 to +0.07", "§3 A", 0.04, 0.10),
    Fact(
        "nt_as_target",
        "share of non-targets predicted as a target (best network, IMU-only)",
        "0.016",
        "§4 A",
        0.0,
        0.03,
    ),
    Fact("target_as_nt", "share of targets predicted as a non-target (best network, IMU-only)", "~0.02", "§4 A"),
    Fact("top_confusion", "most confused target pair (best network, IMU-only)", "Eyebrow ↔ Eyelash", "§4 A"),
    Fact("neck_pair_rank", "rank of Neck-pinch ↔ Neck-scratch among target confusions", "2", "§4 A", 1, 3),
    Fact("easiest_target", "easiest target (highest per-class F1, best network IMU-only)", "Forehead-scratch", "§4 A"),
    Fact("hardest_target", "hardest target (lowest per-class F1)", "Eyebrow", "§4 A"),
)
_BY_KEY = {f.key: f for f in FACTS}

# Short names for the confusion pairs (the gesture strings are long).
_SHORT = {
    "Above ear - pull hair": "Above ear",
    "Forehead - pull hairline": "Forehead-pull",
    "Forehead - scratch": "Forehead-scratch",
    "Eyebrow - pull hair": "Eyebrow",
    "Eyelash - pull hair": "Eyelash",
    "Neck - pinch skin": "Neck-pinch",
    "Neck - scratch": "Neck-scratch",
    "Cheek - pinch skin": "Cheek",
}


def short(gesture: str) -> str:
    return _SHORT.get(gesture, gesture)


# --------------------------------------------------------------------------- data facts


def _scan(path: Path) -> pl.LazyFrame:
    # sensor columns can be inferred as String when a file starts with many empty values: cast them
    return pl.scan_csv(path, infer_schema_length=10_000)


def data_facts(data_dir: str | Path) -> dict[str, Any]:
    """The §1–2 figures of the training data in ``data_dir`` (``train.csv``, ``train_demographics.csv``)."""
    data_dir = Path(data_dir)
    train = data_dir / "train.csv"
    if not train.is_file():
        raise FileNotFoundError(f"{train} not found: realism needs a folder in the competition layout")
    lf = _scan(train)
    cols = lf.collect_schema().names()
    tof_cols = [c for c in cols if c.startswith("tof_")]
    thm_cols = [c for c in cols if c.startswith("thm_")]
    rot_cols = [c for c in cols if c.startswith("rot_")]
    num = [
        pl.col(c).cast(pl.Float64, strict=False) for c in (*thm_cols, *tof_cols, *rot_cols, "acc_x", "acc_y", "acc_z")
    ]
    keep = ["sequence_id", "sequence_counter", "subject"] + [
        c for c in ("orientation", "behavior", "gesture") if c in cols
    ]
    df = lf.select(*keep, *num).collect()
    out: dict[str, Any] = {}

    seq = df.group_by("sequence_id", maintain_order=True).agg(
        pl.len().alias("n"),
        pl.col("subject").first(),
        *[pl.col(c).first() for c in ("orientation", "gesture") if c in cols],
        *([pl.col("behavior").sort_by("sequence_counter").first().alias("initial")] if "behavior" in cols else []),
        pl.all_horizontal([pl.col(c).is_null().all() for c in rot_cols]).alias("no_rot") if rot_cols else pl.lit(False),
        *[pl.col(f"tof_{k}_v0").is_null().all().alias(f"no_tof{k}") for k in range(1, 6) if f"tof_{k}_v0" in cols],
    )
    lengths = seq["n"].to_numpy()
    out.update(
        len_min=int(lengths.min()),
        len_median=float(np.median(lengths)),
        len_p95=float(np.percentile(lengths, 95)),
        len_max=int(lengths.max()),
        seq_per_subject=float(seq.height / seq["subject"].n_unique()),
        rot_missing_seq=float(seq["no_rot"].mean()),
    )
    if {"orientation", "gesture"} <= set(seq.columns):
        out["pairs"] = int(seq.select("orientation", "gesture").unique().height)
        if "initial" in seq.columns:
            slots = seq.group_by("subject", "orientation", "gesture", "initial").len()
            out["slots_once"] = float((slots["len"] == 1).mean())
    if all(f"no_tof{k}" in seq.columns for k in range(1, 6)):
        others = pl.all_horizontal([~pl.col(f"no_tof{k}") for k in range(1, 5)])
        out["tof5_only_missing"] = float(seq.select(others & pl.col("no_tof5")).to_series().mean())
        out["no_tof"] = float(
            seq.select(pl.all_horizontal([pl.col(f"no_tof{k}") for k in range(1, 6)])).to_series().mean()
        )

    if "behavior" in cols:
        out["behaviour_values"] = int(df["behavior"].n_unique())
        # segments: runs of one behaviour value inside a sequence
        runs = (
            df.select("sequence_id", "sequence_counter", "behavior")
            .sort("sequence_id", "sequence_counter")
            .with_columns(
                (pl.col("behavior") != pl.col("behavior").shift(1).over("sequence_id")).fill_null(True).alias("new")
            )
            .with_columns(pl.col("new").cum_sum().over("sequence_id").alias("run"))
            .group_by("sequence_id", "run")
            .agg(pl.col("behavior").first(), pl.len().alias("rows"))
        )

        def seg(value: str) -> np.ndarray:
            return runs.filter(pl.col("behavior") == value)["rows"].to_numpy()

        g = seg(GESTURE_BEHAVIOUR)
        if g.size:
            out.update(gesture_rows_mean=float(g.mean()), gesture_rows_sd=float(g.std()))
        for key, value in (
            ("pause_rows_median", PAUSE_BEHAVIOUR),
            ("relax_rows_median", INITIAL_BEHAVIOURS[1]),
            ("move_rows_median", INITIAL_BEHAVIOURS[0]),
        ):
            rows = seg(value)
            if rows.size:
                out[key] = float(np.median(rows))
        out["gesture_row_share"] = float((df["behavior"] == GESTURE_BEHAVIOUR).mean())

    acc = df.select((pl.col("acc_x") ** 2 + pl.col("acc_y") ** 2 + pl.col("acc_z") ** 2).sqrt().alias("a"))["a"]
    out.update(acc_norm_mean=float(acc.mean()), acc_norm_sd=float(acc.std()))
    if "gesture" in cols:
        mad = (
            df.with_columns(acc.alias("a"))
            .group_by("sequence_id")
            .agg(pl.col("gesture").first(), ((pl.col("a") - pl.col("a").median()).abs().median()).alias("mad"))
        )
        is_t = mad["gesture"].is_in(list(TARGET_GESTURES))
        for key, part in (("mad_target", mad.filter(is_t)), ("mad_non_target", mad.filter(~is_t))):
            if part.height:
                out[key] = float(part["mad"].mean())
    if thm_cols:
        thm = pl.concat([df[c] for c in thm_cols]).drop_nulls().to_numpy()
        if thm.size:
            out.update(
                thm_median=float(np.median(thm)),
                thm_p5=float(np.percentile(thm, 5)),
                thm_p95=float(np.percentile(thm, 95)),
            )
    if tof_cols:
        tof = df.select(tof_cols).to_numpy().ravel()
        present = tof[~np.isnan(tof)]
        if present.size:
            out["tof_minus1_share"] = float((present == -1).mean())
            valid = present[present >= 0]
            out["tof_valid_median"] = float(np.median(valid)) if valid.size else float("nan")

    demo = data_dir / "train_demographics.csv"
    if demo.is_file():
        d = pl.read_csv(demo)
        if "handedness" in d.columns:
            out["left_handed"] = float((d["handedness"] == 0).mean())
    info = data_dir / "synth_info.json"
    if info.is_file():
        rotated = (read_json(info).get("rotated_subjects") or {}).get("train")
        if isinstance(rotated, list):
            out["rotated_wearers"] = len(rotated) / max(int(seq["subject"].n_unique()), 1)
    return out


# --------------------------------------------------------------------------- run facts


def _confusions(y_true: np.ndarray, y_pred: np.ndarray) -> list[tuple[str, int]]:
    """Symmetric confusion counts between pairs of targets, most confused first."""
    idx = {g: i for i, g in enumerate(GESTURES)}
    targets = [idx[g] for g in TARGET_GESTURES]
    pairs = []
    for a_pos, a in enumerate(targets):
        for b in targets[a_pos + 1 :]:
            n = int(((y_true == a) & (y_pred == b)).sum() + ((y_true == b) & (y_pred == a)).sum())
            pairs.append((f"{short(GESTURES[a])} ↔ {short(GESTURES[b])}", n))
    return sorted(pairs, key=lambda p: -p[1])


def run_facts(run_dir: str | Path) -> dict[str, Any]:
    """The §3–4 figures of a finished run's member OOF files (``<run_dir>/oof``)."""
    import cv

    oof_dir = Path(run_dir) / "oof"
    names = cv.available_members(oof_dir)
    if not names:
        raise FileNotFoundError(f"{oof_dir} holds no member OOF (*_summary.json): train first")
    oofs = {m: cv.read_member_oof(oof_dir, m) for m in names}
    out: dict[str, Any] = {"members": {}}
    for m, o in oofs.items():
        y = [GESTURES[i] for i in o.y_true]
        views = {}
        for view, p in (("imu", o.proba_imu), ("full", o.proba_full)):
            views[view] = score_components(y, [GESTURES[i] for i in p.argmax(1)])
        out["members"][m] = views
    if "lgbm" in oofs:
        c = out["members"]["lgbm"]["imu"]
        out.update(lgbm_imu_score=c["score"], lgbm_imu_binary=c["binary_f1"], lgbm_imu_macro=c["macro_f1"])
    nets = [m for m in oofs if m in NETWORKS]
    if not nets:
        return out
    best = max(nets, key=lambda m: out["members"][m]["imu"]["score"])
    o = oofs[best]
    out["best_network"] = best
    out["net_imu_score"] = out["members"][best]["imu"]["score"]
    out["net_full_score"] = out["members"][best]["full"]["score"]
    out["net_tof_gain"] = out["net_full_score"] - out["net_imu_score"]
    if "lgbm_imu_score" in out:
        out["net_minus_lgbm_imu"] = out["net_imu_score"] - out["lgbm_imu_score"]
    pred = o.proba_imu.argmax(1)
    target_idx = np.array([g in TARGET_GESTURES for g in GESTURES])
    t_true, t_pred = target_idx[o.y_true], target_idx[pred]
    out["nt_as_target"] = float(t_pred[~t_true].mean()) if (~t_true).any() else float("nan")
    out["target_as_nt"] = float((~t_pred[t_true]).mean()) if t_true.any() else float("nan")
    pairs = _confusions(o.y_true, pred)
    out["confusions"] = pairs[:6]
    out["top_confusion"] = pairs[0][0] if pairs and pairs[0][1] else "none"
    ranks = {name: r + 1 for r, (name, _) in enumerate(pairs)}
    out["neck_pair_rank"] = ranks.get("Neck-pinch ↔ Neck-scratch")
    f1 = per_class_f1([GESTURES[i] for i in o.y_true], [GESTURES[i] for i in pred])
    target_f1 = {short(g): f1[g] for g in TARGET_GESTURES if g in f1}
    out["per_class_f1"] = target_f1
    if target_f1:
        out["easiest_target"] = max(target_f1, key=target_f1.get)
        out["hardest_target"] = min(target_f1, key=target_f1.get)
    return out


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    fact: Fact
    ours: Any

    @property
    def verdict(self) -> str:
        f, v = self.fact, self.ours
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "n/a"
        if f.lo is None or not isinstance(v, (int, float)):
            return ""
        return "in range" if f.lo <= v <= f.hi else "MISS"

    def ours_text(self) -> str:
        v = self.ours
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    def range_text(self) -> str:
        f = self.fact
        return "" if f.lo is None else (f"{f.lo:g}" if f.lo == f.hi else f"{f.lo:g} – {f.hi:g}")


def realism_rows(data: dict[str, Any], run: dict[str, Any] | None = None) -> list[Row]:
    values = {**data, **(run or {})}
    return [Row(f, values.get(f.key)) for f in FACTS]


def format_markdown(rows: list[Row], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += ["| figure | generated | real | target range | verdict | source |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.fact.what} | {r.ours_text()} | {r.fact.real} | {r.range_text()} | {r.verdict} | {r.fact.source} |"
        )
    miss = sum(r.verdict == "MISS" for r in rows)
    checked = sum(r.verdict in ("MISS", "in range") for r in rows)
    lines += ["", f"{checked - miss} of {checked} figures with a target range are in range; {miss} miss."]
    return "\n".join(lines) + "\n"


def run(
    data_dir: str | Path, run_dir: str | Path | None, out_path: str | Path, facts: Callable = data_facts
) -> tuple[list[Row], Path]:
    """Compute the table for ``data_dir`` (and ``run_dir``'s OOF when given); write JSON and Markdown."""
    data = facts(data_dir)
    runf = run_facts(run_dir) if run_dir else None
    rows = realism_rows(data, runf)
    out_path = Path(out_path)
    write_json(
        out_path.with_suffix(".json"),
        {"data_dir": str(data_dir), "run_dir": str(run_dir or ""), "data": data, "run": runf},
    )
    text = format_markdown(
        rows, f"Realism of {Path(data_dir).name}" + (f" and run {Path(run_dir).name}" if run_dir else "")
    )
    if runf and runf.get("confusions"):
        text += "\nTarget confusions of the best network (" + str(runf.get("best_network")) + ", IMU-only view, OOF): "
        text += "; ".join(f"{name} {n}" for name, n in runf["confusions"]) + "\n"
    write_text(out_path.with_suffix(".md"), text)
    return rows, out_path.with_suffix(".md")
