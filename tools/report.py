"""The run report: one Markdown page with scores, weights, timings and plots, from an output folder.

Reads only files the stages wrote (OOF summaries, weights.json through ``blend.Blend``, the
cross-fitted blend OOF ``ensemble/oof/blend``, serve.json, timings.json, bench.json) and recomputes
nothing: the per-class F1 table, the confusion matrix and the per-class plot are those of the honest
blend OOF (each fold's rows from weights, bias and choices fitted without that fold), as the headline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

import cv
from blend import Blend, BlendError, honest_oof
from io_utils import write_text
from metric import GESTURES, N_CLASSES, TARGET_GESTURES, per_class_f1

log = logging.getLogger(__name__)


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


HONEST = "cross-fitted served blend OOF"  # what the per-class figures are computed on, in their titles


def _plots(out: Path, report_dir: Path, y: np.ndarray, proba: np.ndarray, summaries: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    pred = proba.argmax(1)
    cm = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(11, 9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(N_CLASSES), GESTURES, rotation=90, fontsize=7)
    ax.set_yticks(range(N_CLASSES), GESTURES, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.axhline(len(TARGET_GESTURES) - 0.5, color="red", lw=0.8)
    ax.axvline(len(TARGET_GESTURES) - 0.5, color="red", lw=0.8)
    ax.set_title(f"Confusion matrix, {HONEST}, full view\n(row-normalised; targets above/left of the red lines)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(report_dir / "confusion_matrix.png", dpi=110)
    plt.close(fig)
    files.append("confusion_matrix.png")

    f1 = per_class_f1([GESTURES[i] for i in y], [GESTURES[i] for i in pred])
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = ["tab:red" if g in TARGET_GESTURES else "tab:blue" for g in GESTURES]
    ax.barh(range(N_CLASSES), [f1[g] for g in GESTURES], color=colors)
    ax.set_yticks(range(N_CLASSES), GESTURES, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"F1 ({HONEST}, full view); red = target gestures")
    fig.tight_layout()
    fig.savefig(report_dir / "per_class_f1.png", dpi=110)
    plt.close(fig)
    files.append("per_class_f1.png")

    if summaries:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / (2 * len(summaries))
        for j, (name, s) in enumerate(summaries.items()):
            folds = sorted(s["per_fold"], key=int)
            x = np.arange(len(folds))
            ax.bar(x + (2 * j) * width, [s["per_fold"][f]["full"] for f in folds], width, label=f"{name} full")
            ax.bar(
                x + (2 * j + 1) * width,
                [s["per_fold"][f]["imu_only"] for f in folds],
                width,
                label=f"{name} IMU-only",
                alpha=0.6,
            )
        ax.set_xticks(np.arange(len(folds)) + 0.4 - width / 2, [f"fold {f}" for f in folds])
        ax.set_ylabel("competition score")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        fig.savefig(report_dir / "per_fold_scores.png", dpi=110)
        plt.close(fig)
        files.append("per_fold_scores.png")
    return files


def _subject_pp_lines(out: Path, serve: dict[str, Any]) -> list[str]:
    """Subject post-processing and upside-down wear: the OOF replay, the orientation model, the detector."""
    pp = _load(out / "oof" / "subject_pp_replay.json")
    wear_info = _load(out / "ensemble" / "wear.json")
    if not pp and not wear_info:
        return []
    lines = ["", "## Subject post-processing (online slot assignment)", ""]
    if pp:
        proto = pp["protocol"]
        if proto["kind"] == "none":
            lines.append(f"No protocol learned ({proto.get('reason', '')}): post-processing does nothing.")
        else:
            lines.append(
                f"Protocol learned from training labels: **{proto['kind']}** capacities, {proto['n_slots']} slots, "
                f"{proto['capacity_total']} sequences per subject at most; {100 * proto['share_within']:.0f}% "
                f"of {proto['n_subjects']} training subjects within it."
            )
        if pp.get("orientation_oof_accuracy") is not None:
            lines.append(
                f"Orientation model (LightGBM on gravity/acc aggregates, same folds): OOF accuracy "
                f"**{pp['orientation_oof_accuracy']:.4f}**."
            )
        sims = pp.get("simulation") or {}
        if sims:
            lines += [
                "",
                (
                    f"Gateway replayed on OOF: each subject's sequences in {next(iter(sims.values()))['orders']} "
                    "random orders, answered online:"
                ),
                "",
                "| view | no PP | PP mean | PP min | PP max | gain (mean) | gain min / max |",
                "|---|---|---|---|---|---|---|",
            ]
            for view, r in sims.items():
                lines.append(
                    f"| {view} | {r['no_pp']:.4f} | {r['mean']:.4f} | {r['min']:.4f} | {r['max']:.4f} | "
                    f"{r['gain_mean']:+.4f} | {r['gain_min']:+.4f} / {r['gain_max']:+.4f} |"
                )
            no_or = pp.get("simulation_mixed_without_orientation")
            if no_or:
                lines.append(
                    f"\nMixed view with slots scored by gesture only (no orientation model): mean "
                    f"{no_or['mean']:.4f} (gain {no_or['gain_mean']:+.4f})."
                )
    if wear_info:
        h = wear_info.get("held_out") or {}
        ev = wear_info.get("training_evidence") or {}
        rotated = ev.get("rotated") or [{"subject": s} for s in wear_info.get("rotated_training_subjects") or []]
        corrected = wear_info.get("training_corrected", bool(rotated))
        lines += [
            "",
            "## Upside-down wear",
            "",
            (
                "Detector (logistic, sign-odd features) per-sequence held-out accuracy "
                f"{_fmt(h.get('per_sequence_accuracy'))}; evidence threshold {_fmt(wear_info.get('threshold'))}. "
                "Held-out subjects: synthetic rotated copies detected in "
                f"{h.get('rotated_copy_orders_detected')}/{h.get('rotated_copy_orders')} orders (median after "
                f"{h.get('sequences_to_detect_median')} sequences); normal subjects flagged in "
                f"{h.get('normal_subject_orders_flagged')}/{h.get('normal_subject_orders')} orders."
            ),
            (
                f"Rotated training subjects (at least {wear_info.get('min_sequences')} sequences and summed log-odds "
                f"above the threshold, as at serving), "
                + ("corrected before training" if corrected else "not corrected (ENSEMBLE_WEAR_CORRECT_TRAINING=0)")
                + ": "
                + (
                    ", ".join(
                        f"{d['subject']}"
                        + (f" ({d['sequences']} sequences, log-odds {d['log_odds']:.1f})" if "log_odds" in d else "")
                        for d in rotated
                    )
                    or "none"
                )
                + "."
            ),
        ]
        if ev.get("refused_by_cap"):
            lines.append(
                f"**{len(ev.get('refused') or [])} training subjects looked rotated, more than the "
                f"{ev.get('max_subjects')} that ENSEMBLE_WEAR_MAX_TRAIN_SHARE={ev.get('max_share')} allows: "
                "none was rotated.**"
            )
        if ev.get("below_threshold"):
            lines.append(
                f"Candidates below the evidence threshold, not rotated: {len(ev['below_threshold'])}; subjects "
                f"with fewer than {wear_info.get('min_sequences')} sequences (never rotated): "
                f"{ev.get('subjects_below_min_sequences')}."
            )
    truth = serve.get("wear_truth") or {}
    if truth:
        lines.append(
            f"Serving: detected {truth['detected'] or 'none'}; generator truth {truth['true_rotated'] or 'none'} "
            f"(precision {_fmt(truth['precision'])}, recall {_fmt(truth['recall'])})."
        )
        for key, label in (
            ("holdout_rotated_subjects", "rotated test subjects"),
            ("holdout_normal_subjects", "other test subjects"),
        ):
            if key in truth:
                lines.append(f"- hold-out, {label}: {truth[key]['score']:.4f}")
    return lines


def _degraded_lines(predictor: dict[str, Any], max_listed: int = 20) -> list[str]:
    """The serving answers that came from the fallback chain or from repaired input (serve.json)."""
    degraded = predictor.get("degraded")
    if not degraded:
        return []
    answers = predictor.get("answers") or {}
    lines = [
        "",
        "## Degraded answers",
        "",
        f"{degraded['count']} of {predictor.get('calls', 0)} answer(s) degraded; answered by: "
        + (", ".join(f"{k} {v}" for k, v in sorted(answers.items())) or "none")
        + f". Fallback prior: `{degraded.get('fallback_prior')}`.",
    ]
    seqs = degraded.get("sequences") or {}
    if seqs:
        lines += ["", "| sequence | answered by | gesture | problems |", "|---|---|---|---|"]
        for sid, d in list(seqs.items())[:max_listed]:
            problems = "; ".join(d.get("problems") or []).replace("|", "/")[:200]
            lines.append(f"| {sid} | {d.get('answer')} | {d.get('gesture')} | {problems} |")
        if len(seqs) > max_listed:
            lines.append(f"\n... and {len(seqs) - max_listed} more in serve.json.")
    return lines


def _optional_step_lines(out: Path) -> list[str]:
    """The optional training steps that were skipped or failed (``optional_steps.json``, written by training)."""
    steps = _load(out / "optional_steps.json") or {}
    rows = [(name, d) for name, d in steps.items() if isinstance(d, dict) and d.get("status") in ("skipped", "failed")]
    if not rows:
        return []
    lines = ["", "## Optional steps skipped", "", "| step | status | reason |", "|---|---|---|"]
    for name, d in rows:
        lines.append(f"| {name} | {d['status']} | {str(d.get('reason', '')).replace('|', '/')[:300]} |")
    return lines


def write_report(out: str | Path) -> Path:
    """Write ``<out>/report/report.md`` from whatever the stages left in ``out``.

    Sections whose inputs are missing are left out; the OOF-based parts (CV table, plots, per-class F1)
    need the members' OOF files: without them, or when they cannot be read, the report says so and the
    reason is logged at WARNING.
    """
    out = Path(out)
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    summaries = {m: _load(out / "oof" / f"{m}_summary.json") for m in cv.available_members(out / "oof")}
    notes: list[str] = []
    if not summaries:
        notes.append(f"no member OOF in {out / 'oof'}: the cross-validation table, plots and per-class F1 are skipped")
        log.warning("report: %s", notes[-1])
    try:
        fitted = Blend.read(out / "ensemble")
    except BlendError as e:
        notes.append(f"the blend cannot be read ({e}): its tables are skipped")
        log.warning("report: %s", notes[-1])
        fitted = None
    weights = dict(fitted.record) if fitted is not None else None
    serve = _load(out / "serve.json") or {}
    timings = _load(out / "timings.json") or {}
    bench = _load(out / "bench" / "bench.json")
    lines = ["# CMI gesture recognition — run report", ""]
    data_note = "generated (synthetic) data" if (out / "data" / "test_solution.csv").exists() else "the given data"
    lines += [f"Output folder `{out}`; scores below are measured on {data_note}.", ""]
    lines += [f"*{n[0].upper() + n[1:]}.*" for n in notes] + ([""] if notes else [])

    lines += [
        "## Cross-validation (OOF, subject-grouped folds)",
        "",
        "| member | full | IMU-only | mean (test-like) | train s |",
        "|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        o = s["overall"]
        lines.append(
            f"| {name} | {o['full']:.4f} | {o['imu_only']:.4f} | {o['mean']:.4f} | "
            f"{s.get('train_seconds', float('nan')):.0f} |"
        )
    if weights:
        v = weights["views"]
        lines.append(
            f"| **served (cross-fitted)** | **{v['full']['score']:.4f}** | **{v['imu_only']['score']:.4f}** | "
            f"**{weights['test_like_score']:.4f}** | |"
        )
        lines += [
            "",
            "The served row is the headline: per view, each fold's OOF rows come from the choice (the blend, "
            "or the best member where the blend does not beat it on folds its weights never saw; with or "
            "without the class bias) taken on the other folds only, with weights and class bias fitted there.",
            "",
            "## Blend weights (fitted on OOF for the competition metric)",
            "",
            "| view | shipped | fitted weights | cross-fitted blend | best member (OOF) | equal weights | "
            "in-sample blend (optimistic) | random search (draws, in-sample) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for view, d in v.items():
            w = ", ".join(f"{m} {x:.2f}" for m, x in d["fitted_weights"].items())
            rs, best = d["random_search"], d["best_member"]
            lines.append(
                f"| {view} | {d['shipped']} | {w} | {d['blend_score_cross_fitted']:.4f} | "
                f"{best} {d['member_scores'][best]:.4f} | {d['equal_weights_score']:.4f} | "
                f"{d['blend_score_in_sample']:.4f} | {rs['score']:.4f} ({rs['draws']}) |"
            )
        for view, d in v.items():
            if d["shipped"] != "blend":
                lines.append(
                    f"- {view}: the fitted blend ({d['blend_score_cross_fitted']:.4f} cross-fitted) does not beat "
                    f"{d['shipped']} alone ({d['member_scores'][d['shipped']]:.4f}): "
                    f"**{d['shipped']} is served alone**."
                )
        lines.append(
            f"- in-sample blend (weights scored on the rows they were fitted on), test-like: "
            f"{weights.get('test_like_score_in_sample', float('nan')):.4f} — shown only as such."
        )
        for view, d in v.items():
            cal = d.get("calibration")
            if cal and cal.get("cross_fitted_with") is None:
                lines.append(f"- class-bias calibration, {view}: not judged (too few folds to cross-fit it), not used")
            elif cal:
                lines.append(
                    f"- class-bias calibration, {view} (nested cross-fit): {cal['cross_fitted_without']:.4f} -> "
                    f"{cal['cross_fitted_with']:.4f} (in-sample {cal['in_sample_with']:.4f}): "
                    + ("**used**" if cal["used"] else f"not used (needs > +{cal['min_gain']})")
                )
        for view, d in v.items():
            if "n_folds" in d:  # weights.json of older code has no per-fold decisions
                lines.append(
                    f"- served OOF, {view}, decided per fold on the other folds: the blend in {d['folds_blend']} of "
                    f"{d['n_folds']} folds, the class bias in {d['folds_bias']} of {d['n_folds']}; serving ships "
                    f"{'the blend' if d['shipped'] == 'blend' else d['shipped']}"
                    + (" with the class bias" if (d.get("calibration") or {}).get("used") else "")
                    + " (decided on every fold)."
                )

    if serve.get("holdout"):
        h = serve["holdout"]
        lines += [
            "",
            "## Hold-out test through the gateway",
            "",
            f"`submission.parquet` scored against `test_solution.csv`: **{h['score']:.4f}** "
            f"(binary F1 {h['binary_f1']:.4f}, macro F1 {h['macro_f1']:.4f}).",
        ]
        for key, label in (("holdout_full", "full-sensor sequences"), ("holdout_imu_only", "IMU-only sequences")):
            if key in serve:
                lines.append(f"- {label}: {serve[key]['score']:.4f}")
        lines.append(
            "A hold-out score far below the CV score would mean serving computes something other than training did."
        )
    lines += _optional_step_lines(out)
    lines += _subject_pp_lines(out, serve)
    if serve.get("latency"):
        lat = serve["latency"]
        lines += [
            "",
            "## Serving",
            "",
            f"Predictor start-up {serve.get('startup_s', float('nan')):.2f} s; members "
            f"{serve['predictor']['members']} (missing: {serve['predictor']['missing'] or 'none'}).",
            f"Per-call latency p50 {lat['p50_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms, max {lat['max_ms']:.1f} ms "
            f"over {lat['calls']} calls; the hidden test (3,257 sequences) at p95 would take "
            f"{lat['projected_hidden_test_s']:.0f} s of the 32,400 s budget.",
            f"Member failures: {serve['predictor']['member_failures'] or 'none'}.",
        ]
    lines += _degraded_lines(serve.get("predictor") or {})
    if timings:
        lines += ["", "## Stage timings (s)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    if bench:
        lines += ["", "## Benchmarks", "", "```", json.dumps(bench, indent=1)[:6000], "```"]

    served = None
    try:
        served = honest_oof(out / "ensemble") if summaries else None
        if summaries and served is None:
            why = f"no {HONEST} in {out / 'ensemble' / 'oof'} (no blend fitted; `main.py train` writes it)"
            log.warning("report: %s: plots and per-class F1 skipped", why)
            lines += ["", f"*Plots and per-class F1 skipped: {why}.*"]
    except (OSError, ValueError, KeyError) as e:  # FoldsError is a ValueError: OOF files of another run or missing
        log.warning(
            "report: the blend OOF in %s cannot be read (%s: %s): plots skipped",
            out / "ensemble" / "oof",
            type(e).__name__,
            e,
        )
        lines += ["", f"*Plots and per-class F1 skipped: the OOF files cannot be read ({type(e).__name__}: {e}).*"]
    if served is not None:
        y, proba = served.y_true, served.proba_full
        try:
            files = _plots(out, report_dir, y, proba, summaries)
        except ImportError as e:
            log.warning("report: plots skipped (%s)", e)
            files = []
            lines += ["", f"*Plots skipped: {e}.*"]
        if files:
            lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in files]
            lines.append(
                f"\nConfusion matrix and per-class F1: the {HONEST} (each fold's rows blended with weights, class "
                "bias and choices fitted without that fold: what the served score measures), full view."
            )
        f1 = {
            view: per_class_f1([GESTURES[i] for i in y], [GESTURES[i] for i in p.argmax(1)])
            for view, p in (("full", served.proba_full), ("imu_only", served.proba_imu))
        }
        lines += [
            "",
            f"## Per-class F1 ({HONEST})",
            "",
            "Each fold's rows come from the blend decided and fitted on the other folds, as in the served score.",
            "",
            "| gesture | type | F1 full | F1 IMU-only |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {g} | {'target' if g in TARGET_GESTURES else 'non-target'} | {f1['full'][g]:.3f} | "
            f"{f1['imu_only'][g]:.3f} |"
            for g in GESTURES
        ]
    path = report_dir / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path
