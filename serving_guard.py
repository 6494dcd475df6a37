"""Serving-side guard: hostile input repaired into something the members can use, and the class prior
that answers when nothing can.

Used by ``ensemble.Predictor.predict`` only when ``cfg.run.strict`` is off (serving). Training and
``STRICT=1`` never come here: there the same inputs raise ``features.FeatureError`` /
``ensemble.PredictorError`` naming the problem. Every repair is returned as a short problem string so
the Predictor can log it and list the sequence as degraded (``Predictor.summary()`` -> serve.json).
``subject_of`` is the exception: both modes find the sequence's subject with it (one rule).
First of all, ``cut_to_tail`` bounds a call's cost: a frame longer than ``ENSEMBLE_SERVE_MAX_ROWS`` keeps
its last rows (``STRICT=1``: an error instead).

The fallback chain (``Predictor.predict``, serving):
1. the members on the repaired rows;
2. the members' IMU-only view on the rows with a usable accelerometer reading;
3. the training class prior (``class_prior`` in weights.json, else the OOF labels ``oof/y_true.npy``);
4. a uniform prior over the 18 gestures, the documented last resort (its argmax is the first gesture).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl

from blend import Blend, PriorError, check_class_prior, stored_class_prior
from features import (  # the same missing-value spellings as training's parser
    _NULL_TOKENS,
    MAX_ABS_READING,
)
from io_utils import read_npy
from metric import GESTURES, N_CLASSES
from schema import ACC_COLS, SENSOR_COLS

log = logging.getLogger(__name__)

UNKNOWN_SEQUENCE_ID = "SEQ_UNKNOWN"
_FILLED = "__sequence_id_filled"  # a helper column, dropped before the rows leave repair_sequence


# --------------------------------------------------------------------------- frames


def to_polars(obj: Any, what: str) -> pl.DataFrame | None:
    """A polars DataFrame from what a caller may hand over: polars (eager or lazy), pandas, or None.

    Raises TypeError naming ``what`` and the type for anything else.
    """
    if obj is None or isinstance(obj, pl.DataFrame):
        return obj
    if isinstance(obj, pl.LazyFrame):
        return obj.collect()
    if type(obj).__module__.split(".")[0] == "pandas" and hasattr(obj, "columns"):
        return pl.from_pandas(obj)
    raise TypeError(f"{what} must be a polars or pandas DataFrame, got {type(obj).__name__}")


def cut_to_tail(seq: pl.DataFrame, max_rows: int) -> tuple[pl.DataFrame, list[str]]:
    """At most ``max_rows`` rows (``ENSEMBLE_SERVE_MAX_ROWS``): one call's cost is bounded. Returns (rows, problems).

    Runs before ``repair_sequence``, on the frame as handed over, and looks at one column only: a longer
    frame keeps the rows with the ``max_rows`` largest ``sequence_counter`` values (the gesture ends a
    sequence; counters that do not parse rank first, i.e. are cut first), in their file order; without a
    counter column, its last ``max_rows`` rows.
    """
    n = seq.height
    if n <= max_rows:
        return seq, []
    if "sequence_counter" in seq.columns:
        counter = seq["sequence_counter"]
        if counter.dtype == pl.String:
            counter = counter.str.strip_chars()
        key = counter.cast(pl.Float64, strict=False).fill_nan(None).fill_null(-np.inf).to_numpy()
        keep = np.sort(np.argsort(key, kind="stable")[n - max_rows :])
        contiguous = keep[-1] - keep[0] == max_rows - 1  # rows in counter order: a slice, no copy
        seq = seq.slice(int(keep[0]), max_rows) if contiguous else seq[keep]
        how = "the last by sequence_counter"
    else:
        seq, how = seq.tail(max_rows), "the last in file order"
    return seq, [f"{n} rows, more than ENSEMBLE_SERVE_MAX_ROWS={max_rows}: cut to {how} {max_rows}"]


def repair_sequence(seq: pl.DataFrame) -> tuple[pl.DataFrame, list[str]]:
    """One sequence's rows made acceptable to ``features.clean_sensors``; returns (rows, problems).

    Serving only: one sequence_id (the most frequent; null ids take it), missing acc columns as
    null, text and non-numeric sensor values as missing, one row per sequence_counter (the first),
    counters renumbered in file order when some are missing. ``seq`` must have rows.
    """
    problems: list[str] = []
    df = seq
    if "sequence_id" not in df.columns:
        problems.append("no sequence_id column")
        df = df.with_columns(pl.lit(UNKNOWN_SEQUENCE_ID).alias("sequence_id"))
    df = df.with_columns(pl.col("sequence_id").cast(pl.String))
    # the most frequent id; a tie goes to the one seen first, so the same frame always gets the same answer
    counts = (
        df.select("sequence_id")
        .with_row_index("row")
        .drop_nulls("sequence_id")
        .group_by("sequence_id")
        .agg(pl.len().alias("n"), pl.col("row").min().alias("first"))
        .sort(["n", "first"], descending=[True, False])
    )
    sid = counts["sequence_id"][0] if counts.height else UNKNOWN_SEQUENCE_ID
    if counts.height > 1:
        problems.append(f"{counts.height} sequence_ids in one frame: answered on the {counts['n'][0]} row(s) of {sid}")
        df = df.filter(pl.col("sequence_id").is_null() | (pl.col("sequence_id") == sid))
    n_null = df["sequence_id"].null_count()
    if n_null:
        problems.append(f"{n_null} row(s) without sequence_id taken as {sid}")
        df = df.with_columns(pl.col("sequence_id").is_null().alias(_FILLED), pl.col("sequence_id").fill_null(sid))

    absent_acc = [c for c in ACC_COLS if c not in df.columns]
    if absent_acc:
        problems.append(f"missing column(s) {', '.join(absent_acc)}")
        df = df.with_columns(pl.lit(None, dtype=pl.Float32).alias(c) for c in absent_acc)
    df, text_problems = _numeric_sensors(df)
    problems += text_problems

    if "sequence_counter" in df.columns:
        counter = df["sequence_counter"]
        if counter.dtype == pl.String:
            counter = counter.str.strip_chars()
        counter = counter.cast(pl.Float64, strict=False)
        whole = counter.is_not_null() & counter.is_finite() & (counter == counter.floor())
        if not whole.all():
            problems.append(
                f"{int((~whole).fill_null(True).sum())} row(s) without an integer sequence_counter: "
                "rows renumbered in file order"
            )
            df = df.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("sequence_counter"))
        else:
            df = df.with_columns(counter.cast(pl.Int64).alias("sequence_counter"))
        n_before = df.height
        if n_null:  # a counter given twice: the row that carried the id wins over one whose id was filled in
            df = df.sort(_FILLED, maintain_order=True)
        df = df.unique(subset="sequence_counter", keep="first", maintain_order=True)
        if df.height < n_before:
            problems.append(f"{n_before - df.height} row(s) repeat a sequence_counter: kept the first of each")
    return (df.drop(_FILLED) if _FILLED in df.columns else df), problems


def _numeric_sensors(df: pl.DataFrame) -> tuple[pl.DataFrame, list[str]]:
    """Sensor columns as numbers: text that does not parse and non-numeric dtypes read as missing."""
    schema = df.schema
    present = [c for c in SENSOR_COLS if c in schema]
    text = [c for c in present if schema[c] == pl.String]
    other = [c for c in present if schema[c] != pl.String and not (schema[c].is_numeric() or schema[c] == pl.Null)]
    problems = []
    if text:
        cleaned = [pl.col(c).str.strip_chars().replace(_NULL_TOKENS, None) for c in text]
        lost = df.select(
            (e.is_not_null() & e.cast(pl.Float64, strict=False).is_null()).sum().alias(c) for e, c in zip(cleaned, text)
        ).row(0, named=True)
        bad = {c: n for c, n in lost.items() if n}
        if bad:
            problems.append(
                f"non-numeric text in {sum(bad.values())} cell(s) of {', '.join(list(bad)[:5])}"
                f"{' ...' if len(bad) > 5 else ''}: read as missing"
            )
        df = df.with_columns(e.cast(pl.Float64, strict=False).alias(c) for e, c in zip(cleaned, text))
    if other:
        problems.append(
            "sensor column(s) of a non-numeric dtype read as missing: "
            + ", ".join(f"{c} ({schema[c]})" for c in other[:5])
        )
        df = df.with_columns(pl.lit(None, dtype=pl.Float32).alias(c) for c in other)
    return df, problems


def usable_imu_rows(df: pl.DataFrame) -> np.ndarray:
    """Rows whose three accelerometer values are finite readings (the IMU-only path needs at least one)."""
    ok = pl.all_horizontal(
        pl.col(c).cast(pl.Float64).is_finite() & (pl.col(c).cast(pl.Float64).abs() <= MAX_ABS_READING) for c in ACC_COLS
    ).fill_null(False)
    return df.select(ok.alias("ok"))["ok"].to_numpy()


def subject_of(rows: pl.DataFrame, demographics: pl.DataFrame | None) -> str:
    """The sequence's subject, one rule for serving and STRICT=1: the first non-empty ``subject`` of its rows,
    else the ``subject`` of a demographics frame of one row; "" when neither says (no per-subject steps)."""
    if "subject" in rows.columns:
        named = rows["subject"].drop_nulls().cast(pl.String)
        named = named.filter(named != "")
        if named.len():
            return str(named[0])
    if demographics is not None and "subject" in demographics.columns and demographics.height == 1:
        v = demographics["subject"][0]
        return "" if v is None else str(v)
    return ""


def repair_demographics(demo: pl.DataFrame | None, subject: str | None) -> tuple[pl.DataFrame | None, list[str]]:
    """Demographics the feature code can join: a frame without ``subject`` is used only if it has one row."""
    if demo is None or demo.height == 0 or "subject" in demo.columns:
        return demo, []
    if demo.height == 1 and subject is not None:
        return demo.with_columns(pl.lit(subject).alias("subject")), [
            "demographics without a subject column: its one row taken as this sequence's subject"
        ]
    return None, [f"demographics without a subject column ({demo.height} rows): predicted without demographics"]


# --------------------------------------------------------------------------- class prior


@dataclass(frozen=True)
class ClassPrior:
    """The answer of last resort: class probabilities in ``GESTURES`` order and where they came from."""

    proba: np.ndarray  # (18,), sums to 1
    source: str  # "uniform" or the file it was read from

    @property
    def is_uniform(self) -> bool:
        return self.source == "uniform"

    @property
    def answer(self) -> str:
        return GESTURES[int(np.argmax(self.proba))]


def class_prior_from_labels(y: np.ndarray) -> list[float]:
    """Training class frequencies (indices into GESTURES) as a list for weights.json."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=N_CLASSES).astype(np.float64)
    return (counts / max(counts.sum(), 1.0)).tolist()


def _prior_from_weights(weights: Blend | Path | None) -> ClassPrior | None:
    if isinstance(weights, Blend):  # the blend the Predictor loaded through the seal (its prior checked there)
        return None if weights.class_prior is None else ClassPrior(weights.class_prior, weights.source)
    values = stored_class_prior(weights) if weights is not None else None
    return None if values is None else ClassPrior(check_class_prior(values, weights), str(weights))


def _prior_from_labels(y_path: Path) -> ClassPrior | None:
    if not y_path.exists():
        return None
    y = read_npy(y_path)
    if y.ndim != 1 or y.size == 0 or y.min() < 0 or y.max() >= N_CLASSES:
        raise PriorError(f"{y_path}: not a vector of class indices 0..{N_CLASSES - 1}")
    return ClassPrior(check_class_prior(class_prior_from_labels(y), y_path), str(y_path))


def load_class_prior(weights: Blend | Path | None, oof_dir: Path, problems: list[str] | None = None) -> ClassPrior:
    """The training class prior: ``class_prior`` of the blend, else the OOF labels, else uniform (logged).

    ``weights``: the ``Blend`` the Predictor loaded (through the seal), a weights.json path (tools, tests:
    read by ``blend.stored_class_prior``), or None (not fitted, or left out as damaged).

    A damaged source raises (``PriorError`` or the reader's error, naming the file). With ``problems``
    (serving) it is logged, appended there instead, and the next source is tried.
    """
    y_path = oof_dir / "y_true.npy"
    where = weights.source if isinstance(weights, Blend) else weights
    sources: tuple[tuple[Callable[[], ClassPrior | None], Any], ...] = (
        (lambda: _prior_from_weights(weights), where),
        (lambda: _prior_from_labels(y_path), y_path),
    )
    for read, path in sources:
        try:
            prior = read()
        except Exception as e:  # noqa: BLE001  (strict: re-raised; serving: the next source answers)
            if problems is None:
                raise
            problems.append(f"{path}: {type(e).__name__}: {e}")
            log.error("class prior from %s left out (%s: %s); trying the next source", path, type(e).__name__, e)
            continue
        if prior is not None:
            return prior
    log.warning(
        "no class prior in %s nor %s: the last-resort answer is a uniform prior (%r)", where, y_path, GESTURES[0]
    )
    return ClassPrior(np.full(N_CLASSES, 1.0 / N_CLASSES), "uniform")


T = TypeVar("T")


def subject_state(
    state: OrderedDict[str, T], subject: str, make: Callable[[], T], max_subjects: int
) -> tuple[T, list[tuple[str, T]]]:
    """``subject``'s entry of ``state`` (made by ``make`` when new), now the most recently seen, and the
    entries evicted, least recently seen first, to keep at most ``max_subjects`` (the serving bound of every
    per-subject step: ``ENSEMBLE_SERVE_MAX_SUBJECTS``)."""
    entry = state.get(subject)
    if entry is not None:
        state.move_to_end(subject)
        return entry, []
    entry = state[subject] = make()
    evicted = []
    while len(state) > max_subjects:
        evicted.append(state.popitem(last=False))
    return entry, evicted
