"""Column layout of the competition files and the sensor groups. Imports only ``metric``."""

from __future__ import annotations

from metric import GESTURES, NON_TARGET_GESTURES, TARGET_GESTURES  # noqa: F401  (re-exported)

ID_COLS: tuple[str, ...] = ("row_id", "sequence_id", "sequence_counter", "subject")
LABEL_COLS: tuple[str, ...] = ("sequence_type", "orientation", "behavior", "phase", "gesture")
ACC_COLS: tuple[str, ...] = ("acc_x", "acc_y", "acc_z")
ROT_COLS: tuple[str, ...] = ("rot_w", "rot_x", "rot_y", "rot_z")  # scalar first, as in the files
IMU_COLS: tuple[str, ...] = ACC_COLS + ROT_COLS
THM_COLS: tuple[str, ...] = tuple(f"thm_{k}" for k in range(1, 6))
N_TOF_SENSORS = 5
TOF_PIXELS = 64  # 8x8, row-major
TOF_COLS: tuple[str, ...] = tuple(f"tof_{k}_v{p}" for k in range(1, N_TOF_SENSORS + 1) for p in range(TOF_PIXELS))
SENSOR_COLS: tuple[str, ...] = IMU_COLS + THM_COLS + TOF_COLS

# Exact column order of the competition files.
TRAIN_COLUMNS: tuple[str, ...] = (
    "row_id",
    "sequence_type",
    "sequence_id",
    "sequence_counter",
    "subject",
    "orientation",
    "behavior",
    "phase",
    "gesture",
) + SENSOR_COLS
TEST_COLUMNS: tuple[str, ...] = ID_COLS + SENSOR_COLS
DEMOGRAPHIC_COLS: tuple[str, ...] = (
    "subject",
    "adult_child",
    "age",
    "sex",
    "handedness",
    "height_cm",
    "shoulder_to_wrist_cm",
    "elbow_to_wrist_cm",
)
DEMOGRAPHIC_FEATURES: tuple[str, ...] = DEMOGRAPHIC_COLS[1:]

ORIENTATIONS: tuple[str, ...] = (
    "Seated Straight",
    "Seated Lean Non Dom - FACE DOWN",
    "Lie on Back",
    "Lie on Side - Non Dominant",
)
BEHAVIORS: tuple[str, ...] = (
    "Relaxes and moves hand to target location",
    "Moves hand to target location",
    "Hand at target location",
    "Performs gesture",
)
PHASES: tuple[str, ...] = ("Transition", "Gesture")
SEQUENCE_TYPES: tuple[str, ...] = ("Target", "Non-Target")

TOF_NO_REFLECTION = -1.0  # the device's "nothing in range"
TOF_MAX = 254.0
GRAVITY = 9.81
