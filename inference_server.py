"""Gateway glue: the competition's ``kaggle_evaluation`` server when importable, else our local gateway.

Takes a ``predict(sequence, demographics) -> str`` callable and knows nothing of
models. The local gateway behaves like the competition's: it reads the test
files with polars' own type inference (so thm/tof columns of IMU-only files can
arrive as String or all-null), calls ``predict`` once per sequence in a random
order, checks every answer, and writes ``submission.parquet`` atomically.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from io_utils import atomic_path
from metric import GESTURES

log = logging.getLogger(__name__)

PredictFn = Callable[[pl.DataFrame, pl.DataFrame], str]
# Optional: which sequences got a degraded answer (sequence_id -> how), e.g. ``Predictor.degraded_sequences``.
DegradedFn = Callable[[], Mapping[str, Any]]
# What a serving run writes into its output folder; an earlier run's copy is renamed to <name>.stale first.
SERVING_OUTPUTS = ("submission.parquet", "submission_partial.parquet", "serve.json")
STALE_SUFFIX = ".stale"
# The competition's limits.
STARTUP_LIMIT_S = 15 * 60
PER_CALL_LIMIT_S = 30 * 60
TOTAL_LIMIT_S = 9 * 3600
HIDDEN_TEST_SEQUENCES = 3257
_GESTURE_SET = frozenset(GESTURES)


class GatewayError(RuntimeError):
    pass


def kaggle_server_module() -> Any | None:
    """The competition's server module on Kaggle, else None."""
    try:
        return importlib.import_module("kaggle_evaluation.cmi_inference_server")
    except ImportError:
        return None


def check_predict_callable(predict: PredictFn) -> None:
    # The real server finds the endpoint by the callable's __name__: a lambda or partial is never called.
    if getattr(predict, "__name__", None) != "predict":
        raise GatewayError(f"the gateway needs a function or bound method named 'predict', got {predict!r}")


def retire_stale_outputs(out_dir: str | Path, names: Iterable[str] = SERVING_OUTPUTS) -> list[Path]:
    """Rename an earlier run's serving outputs to ``<name>.stale`` (replacing an older .stale); logged.

    Without this a run that dies before writing leaves the previous submission.parquet and serve.json
    looking like its own. Returns the new .stale paths.
    """
    moved = []
    for name in names:
        path = Path(out_dir) / name
        if path.is_file():
            stale = path.with_name(path.name + STALE_SUFFIX)
            os.replace(path, stale)
            moved.append(stale)
    if moved:
        log.warning(
            "earlier run's outputs renamed so they cannot pass for this run's: %s", ", ".join(str(p) for p in moved)
        )
    return moved


@dataclass
class GatewayResult:
    submission_path: Path | None
    n_sequences: int
    latencies_s: list[float] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    degraded: dict[str, Any] = field(default_factory=dict)  # sequence_id -> how its answer was degraded

    def latency_summary(self) -> dict[str, float]:
        if not self.latencies_s:
            return {}
        lat = np.asarray(self.latencies_s) * 1000
        p95 = float(np.percentile(lat, 95))
        return {
            "calls": len(lat),
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": p95,
            "max_ms": float(lat.max()),
            "mean_ms": float(lat.mean()),
            "projected_hidden_test_s": p95 / 1000 * HIDDEN_TEST_SEQUENCES,
            "hidden_test_budget_s": TOTAL_LIMIT_S,
        }


def _read_csv(path: str | Path) -> pl.DataFrame:
    """polars' default inference on purpose: this is what the real gateway hands over (String thm/tof ...).

    A text token after the first 100 rows of a column inferred numeric makes that read fail; then the
    whole file is scanned for the types (such columns become String), so the submission is not lost.
    """
    try:
        return pl.read_csv(path)
    except pl.exceptions.ComputeError as e:
        log.warning(
            "%s: default type inference failed (%s); inferring types from every row", path, str(e).splitlines()[0]
        )
        return pl.read_csv(path, infer_schema_length=None)


def run_local_gateway(
    predict: PredictFn,
    test_csv: str | Path,
    demographics_csv: str | Path,
    out_path: str | Path,
    seed: int = 0,
    startup_s: float | None = None,
    degraded: DegradedFn | None = None,
) -> GatewayResult:
    """Serve every test sequence to ``predict`` in a seeded random order and write the submission.

    Every answer goes into ``out_path``; the sequences ``degraded()`` names (answers from a fallback or
    repaired input) are listed in the result and the log. It refuses (``GatewayError``, the answers it
    has in ``<stem>_partial.parquet``) only when ``predict`` itself is broken: a call raised or returned
    something that is not a gesture. A serving Predictor (STRICT unset) never does either.
    """
    check_predict_callable(predict)
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.stem + "_partial.parquet")
    retire_stale_outputs(out_path.parent, (out_path.name, partial.name))
    t0 = time.perf_counter()
    test = _read_csv(test_csv)
    demo = _read_csv(demographics_csv)
    if "sequence_id" not in test.columns:
        raise GatewayError(f"{test_csv} has no sequence_id column")
    seq_ids = test["sequence_id"].unique(maintain_order=True).to_list()
    order = np.random.default_rng(seed).permutation(len(seq_ids))
    groups = {k[0]: g for k, g in test.group_by("sequence_id", maintain_order=True)}
    answers: dict[str, str] = {}
    result = GatewayResult(submission_path=None, n_sequences=len(seq_ids))
    if startup_s is not None:
        level = logging.WARNING if startup_s > STARTUP_LIMIT_S else logging.INFO
        log.log(level, "start-up %.2f s (competition limit %d s)", startup_s, STARTUP_LIMIT_S)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a convenience, never a requirement of serving

        def tqdm(x, **_k):  # type: ignore[no-redef]
            return x

    for i in tqdm(order, desc="gateway", unit="seq", disable=None):
        sid = seq_ids[i]
        rows = groups[sid]
        subject = rows["subject"][0] if "subject" in rows.columns else None
        demo_row = demo.filter(pl.col("subject") == subject)
        c0 = time.perf_counter()
        try:
            answer = predict(rows, demo_row)
        except Exception as e:  # one bad sequence must not lose the other answers
            result.failures[sid] = f"{type(e).__name__}: {e}"
            log.error("predict failed on %s: %s", sid, result.failures[sid])
            continue
        finally:
            result.latencies_s.append(time.perf_counter() - c0)
        if not isinstance(answer, str) or answer not in _GESTURE_SET:
            result.failures[sid] = f"invalid gesture {answer!r}"
            log.error("predict returned an invalid gesture for %s: %r", sid, answer)
            continue
        answers[sid] = answer
    sub = pl.DataFrame(
        {"sequence_id": list(answers), "gesture": list(answers.values())},
        schema={"sequence_id": pl.String, "gesture": pl.String},
    ).sort("sequence_id")
    if degraded is not None:
        result.degraded = {str(k): v for k, v in degraded().items() if k in answers}
        if result.degraded:
            log.warning(
                "gateway: %d of %d answer(s) degraded (fallback or repaired input): %s",
                len(result.degraded),
                len(answers),
                ", ".join(sorted(result.degraded)[:20]),
            )
    if result.failures:
        with atomic_path(partial) as tmp:
            sub.write_parquet(tmp)
        raise GatewayError(
            f"{len(result.failures)} of {len(seq_ids)} sequence(s) got no valid answer "
            f"(e.g. {next(iter(result.failures.items()))}); the {len(answers)} answers are in {partial}; "
            f"no {out_path.name} was written"
        )
    with atomic_path(out_path) as tmp:
        sub.write_parquet(tmp)
    result.submission_path = out_path
    result.wall_s = time.perf_counter() - t0
    lat = result.latency_summary()
    if lat:
        log.info(
            "gateway: %d sequences in %.1f s; latency p50 %.1f ms, p95 %.1f ms, max %.1f ms "
            "(limit %d s per call); hidden test projected %.0f s of %d s",
            len(answers),
            result.wall_s,
            lat["p50_ms"],
            lat["p95_ms"],
            lat["max_ms"],
            PER_CALL_LIMIT_S,
            lat["projected_hidden_test_s"],
            TOTAL_LIMIT_S,
        )
    return result


def serve(
    predict: PredictFn,
    data_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    startup_s: float | None = None,
    degraded: DegradedFn | None = None,
) -> GatewayResult | None:
    """On Kaggle: the competition server (``serve()`` on the re-run, the local gateway otherwise).

    Elsewhere: our local gateway on ``data_dir``'s test files, writing ``out_dir/submission.parquet``.
    """
    check_predict_callable(predict)
    test_csv = Path(data_dir) / "test.csv"
    demo_csv = Path(data_dir) / "test_demographics.csv"
    module = kaggle_server_module()
    if module is not None:
        server = module.CMIInferenceServer(predict)
        if os.getenv("KAGGLE_IS_COMPETITION_RERUN"):
            server.serve()
        else:
            server.run_local_gateway(data_paths=(str(test_csv), str(demo_csv)))
        return None
    return run_local_gateway(
        predict, test_csv, demo_csv, Path(out_dir) / "submission.parquet", seed, startup_s, degraded
    )
