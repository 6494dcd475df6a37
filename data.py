"""Reading the competition files with explicit dtypes, and validating them.

Errors name the file and the problem (missing columns, unknown gestures,
subjects without demographics). Sorting and duplicate checks of the sensor rows
happen in ``features.clean_sensors``, which prediction uses too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from metric import GESTURES
from schema import DEMOGRAPHIC_COLS, LABEL_COLS, SENSOR_COLS, TEST_COLUMNS, TRAIN_COLUMNS

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Input files that cannot be used; the message names the file and the problem."""


_STRING_COLS = ("row_id", "sequence_id", "subject", *LABEL_COLS)
_DEMO_DTYPES = {
    "subject": pl.String,
    "adult_child": pl.Int64,
    "age": pl.Float64,
    "sex": pl.Int64,
    "handedness": pl.Int64,
    "height_cm": pl.Float64,
    "shoulder_to_wrist_cm": pl.Float64,
    "elbow_to_wrist_cm": pl.Float64,
}


def sensor_dtypes(columns: list[str] | tuple[str, ...]) -> dict[str, pl.DataType]:
    """Explicit dtypes for every known column: ids and labels String, counter Int64, sensors Float32."""
    out: dict[str, pl.DataType] = {}
    for c in columns:
        if c in _STRING_COLS:
            out[c] = pl.String
        elif c == "sequence_counter":
            out[c] = pl.Int64
        elif c in SENSOR_COLS:
            out[c] = pl.Float32
    return out


def _read_csv(path: Path, expected: tuple[str, ...], what: str) -> pl.DataFrame:
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    header = pl.read_csv(path, n_rows=0).columns
    missing = [c for c in expected if c not in header]
    if missing:
        shown = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        raise DataError(f"{path}: missing {len(missing)} column(s): {shown}")
    try:
        # Explicit dtypes: inference on a file that starts with IMU-only rows would type thm/tof as String.
        return pl.read_csv(path, schema_overrides=sensor_dtypes(header), null_values=["", "NA", "NaN", "nan"])
    except pl.exceptions.PolarsError as e:
        raise DataError(f"{path}: cannot parse as the competition's {what} layout: {e}") from None


def read_train(data_dir: str | Path) -> pl.DataFrame:
    path = Path(data_dir) / "train.csv"
    df = _read_csv(path, TRAIN_COLUMNS, "train")
    validate_labels(df, str(path))
    check_sequence_subjects(df, str(path))
    return df


def read_test(data_dir: str | Path) -> pl.DataFrame:
    return _read_csv(Path(data_dir) / "test.csv", TEST_COLUMNS, "test")


def read_demographics(path: str | Path) -> pl.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"demographics file not found: {path}")
    df = pl.read_csv(path, schema_overrides=_DEMO_DTYPES)
    missing = [c for c in DEMOGRAPHIC_COLS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s): {', '.join(missing)}")
    dup = df["subject"].is_duplicated().sum()
    if dup:
        raise DataError(f"{path}: {dup} rows repeat a subject")
    return df.select(DEMOGRAPHIC_COLS)


def validate_labels(df: pl.DataFrame, where: str) -> None:
    """Every sequence has exactly one known gesture string."""
    bad = df.filter(~pl.col("gesture").is_in(list(GESTURES)) | pl.col("gesture").is_null())
    if bad.height:
        names = bad["gesture"].unique().to_list()[:5]
        raise DataError(f"{where}: {bad.height} row(s) with unknown gesture string(s): {names}")
    multi = df.group_by("sequence_id").agg(pl.col("gesture").n_unique().alias("n")).filter(pl.col("n") > 1)
    if multi.height:
        raise DataError(
            f"{where}: {multi.height} sequence(s) carry more than one gesture, e.g. {multi['sequence_id'][0]}"
        )


def check_sequence_subjects(df: pl.DataFrame, where: str) -> None:
    """Each sequence is one subject's recording: a ``sequence_id`` under two subjects is an error naming it.

    Grouping by sequence would otherwise merge two recordings into one (and give it the first subject).
    """
    shared = (
        df.group_by("sequence_id")
        .agg(pl.col("subject").unique().sort().alias("subjects"))
        .filter(pl.col("subjects").list.len() > 1)
        .sort("sequence_id")
    )
    if shared.height:
        seq, subjects = shared["sequence_id"][0], shared["subjects"][0].to_list()
        more = f" ({shared.height} such sequence ids in all)" if shared.height > 1 else ""
        raise DataError(
            f"{where}: sequence_id {seq} belongs to {len(subjects)} subjects ({', '.join(map(str, subjects))}){more}; "
            "a sequence is one subject's recording: give each its own sequence_id"
        )


def check_demographics(df: pl.DataFrame, demographics: pl.DataFrame, where: str) -> None:
    missing = sorted(set(df["subject"].unique().to_list()) - set(demographics["subject"].to_list()))
    if missing:
        raise DataError(f"{where}: {len(missing)} subject(s) without a demographics row: {missing[:5]}")


@dataclass(frozen=True)
class TrainData:
    rows: pl.DataFrame
    demographics: pl.DataFrame
    labels: pl.DataFrame  # one row per sequence: sequence_id, subject, gesture, orientation


def load_train(data_dir: str | Path) -> TrainData:
    data_dir = Path(data_dir)
    rows = read_train(data_dir)
    demo = read_demographics(data_dir / "train_demographics.csv")
    check_demographics(rows, demo, str(data_dir / "train.csv"))
    labels = (
        rows.group_by("sequence_id", maintain_order=True)
        .agg(pl.col("subject").first(), pl.col("gesture").first(), pl.col("orientation").first())
        .sort("sequence_id")
    )
    log.info("train: %d rows, %d sequences, %d subjects", rows.height, labels.height, labels["subject"].n_unique())
    return TrainData(rows=rows, demographics=demo, labels=labels)
