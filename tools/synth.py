"""Synthetic stand-in for the CMI "Detect Behavior with Sensor Data" files.

The real train.csv cannot be redistributed, so the default data set is generated
here from a small kinematic model of a wrist-worn device (see docs/SYNTH.md):

* every gesture is a smooth wrist trajectory (torso frame) from a posture-specific
  rest pose to the gesture's body location, then a gesture-specific motion pattern;
* the posture rotates the torso relative to gravity; the accelerometer reads the
  specific force ``R^T (a_world + g z)`` in the device frame, the quaternion is the
  device->world rotation (scalar first, ``w >= 0``);
* ToF pixels are rays cast from five sensors against simple body/scene primitives
  (head, neck, thigh, chest, table or bed, a held object); thermopiles warm up in
  proportion to the nearby skin they see;
* subjects differ in size, speed, style, handedness (mirrored signals) and two of
  some wear the device rotated 180 degrees about its z axis (upside down on the wrist).

Public API: :func:`generate`, :func:`write_dataset`, :class:`SynthDataset`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import polars as pl
from scipy.ndimage import gaussian_filter1d
from scipy.signal import lfilter
from scipy.spatial.transform import Rotation

import schema
from metric import GESTURES, TARGET_GESTURES

FS = 10.0  # output sampling rate (Hz)
OVERSAMPLE = 4  # kinematics are integrated on a 40 Hz grid so fast motions keep their acceleration
G = schema.GRAVITY
ACC_QUANT = 1.0 / 256.0  # the real files store acc as multiples of 1/256 m/s^2
ROT_QUANT = 1.0 / 16384.0  # ... and quaternion components as multiples of 2^-14
TOF_RANGE_M = 0.28  # beyond ~28 cm the sensor rarely reports a reflection
ROT_MISSING_P = 0.006
# Sensor availability per training sequence, as in the real train set (REAL_DATA_FACTS.md §2): 4.1 % of the
# sequences lack exactly tof_5, 1.18 % have no ToF at all; thm_5 is missing on 5.8 % of rows, thm_1 on 1.2 %.
TOF5_MISSING_P = 0.041
NO_TOF_P = 0.0118
THM_MISSING_P = {4: 0.058, 0: 0.012}  # thermopile index -> share of sequences without it
TILTED_SHARE = 2 / 81  # wearers with the device tilted about its y axis (REAL_DATA_FACTS.md §2, grade C)

SEATED, LEAN, BACK, SIDE = schema.ORIENTATIONS

# 51 valid (orientation, gesture) pairs: targets in all four postures; the everyday
# gestures in the postures where they make sense (counts per gesture follow the real
# train.csv: 1, 3 or 4 postures).
_NON_TARGET_POSTURES: dict[str, tuple[str, ...]] = {
    "Drink from bottle/cup": (SEATED,),
    "Feel around in tray and pull out an object": (SEATED,),
    "Glasses on/off": (SEATED,),
    "Pinch knee/leg skin": (SEATED,),
    "Scratch knee/leg skin": (SEATED,),
    "Write name on leg": (SEATED,),
    "Pull air toward your face": (SEATED, BACK, SIDE),
    "Wave hello": (SEATED, BACK, SIDE),
    "Write name in air": (SEATED, BACK, SIDE),
    "Text on phone": (SEATED, LEAN, BACK, SIDE),
}
VALID_PAIRS: tuple[tuple[str, str], ...] = tuple(
    [(o, g) for g in TARGET_GESTURES for o in schema.ORIENTATIONS]
    + [(o, g) for g, os_ in _NON_TARGET_POSTURES.items() for o in os_]
)
REPEATS = 2  # every pair twice per subject: once per initial behaviour (schema.BEHAVIORS[0] and [1])

# ----------------------------------------------------------------------------------
# Body geometry, torso frame: x forward, y to the subject's left, z up the spine,
# origin at the seat between the hips; metres for a 170 cm adult (scaled per subject).
# Written for a right-handed wearer (device on the right wrist); left-handed data are
# mirrored at the end, the way top solutions un-mirror them.
# ----------------------------------------------------------------------------------
HEAD_C = np.array([0.02, 0.0, 0.70])
HEAD_R = 0.095
NECK_C = np.array([0.0, 0.0, 0.575])
NECK_R = 0.06
CHEST_X = 0.11
CHEST_TOP = 0.52


def _n(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class Location:
    """Wrist pose at a body location and the local surface frame of the motion."""

    pos: tuple[float, float, float]  # wrist position (torso frame, m at scale 1)
    fwd: tuple[float, float, float]  # forearm direction = device +y
    dorsal: tuple[float, float, float]  # back of the wrist = device +z
    normal: tuple[float, float, float]  # away from the touched surface
    tangent: tuple[float, float, float]  # main in-surface direction of strokes


# Eyebrow/eyelash, cheek/neck and hairline locations are deliberately a few cm apart:
# they are the look-alikes of the real protocol.
LOCATIONS: dict[str, Location] = {
    "above_ear": Location((0.00, -0.19, 0.67), (0.0, 0.35, 1.0), (0.1, -1.0, 0.2), (0, -1, 0.3), (1, 0, 0.2)),
    "cheek": Location((0.16, -0.125, 0.595), (-0.3, 0.45, 0.85), (0.6, -0.6, 0.1), (0.6, -0.8, 0), (0, 0.2, 1)),
    "eyebrow": Location((0.21, -0.07, 0.63), (-0.4, 0.2, 0.9), (1.0, -0.3, 0.3), (1, -0.2, 0.2), (0, 1, 0)),
    "eyelash": Location((0.21, -0.065, 0.605), (-0.45, 0.2, 0.87), (1.0, -0.3, 0.2), (1, -0.2, 0.1), (0, 1, 0)),
    # the hairline: the hand comes over the top, palm down, and pulls up and back
    "forehead": Location((0.15, -0.05, 0.75), (-0.3, 0.15, 0.94), (0.6, -0.2, 1.0), (0.4, 0, 1.0), (0, 1, 0)),
    # the side of the neck, reached with the forearm raised much as for the hair above the ear: the two look
    # alike to the IMU; the thermopiles and ToF tell bare skin from hair
    "neck": Location((0.07, -0.125, 0.52), (-0.15, 0.55, 0.82), (0.35, -0.95, 0.15), (0.3, -0.95, 0), (0, 0.1, 1)),
    "thigh": Location((0.24, -0.12, 0.14), (1.0, 0.05, -0.35), (0.1, -0.1, 1.0), (0, 0, 1), (1, 0, 0)),
    "thigh_lying": Location((0.14, -0.13, -0.17), (0.3, 0.05, -1.0), (1.0, -0.1, 0.2), (1, 0, 0), (0, 0, -1)),
    "bottle": Location((0.40, -0.16, 0.30), (0.9, 0.35, -0.1), (0.0, -1.0, 0.3), (0, 0, 1), (0, 0, 1)),
    "eyes_glasses": Location((0.19, -0.10, 0.64), (-0.3, 0.55, 0.8), (0.7, -0.7, 0.3), (1, 0, 0), (0, 1, 0)),
    "phone": Location((0.30, -0.06, 0.30), (1.0, 0.3, 0.15), (0.0, 0.0, 1.0), (0, 0, 1), (1, 0, 0)),
    "wave": Location((0.10, -0.36, 0.64), (0.0, -0.15, 1.0), (-1.0, 0.0, 0.0), (1, 0, 0), (0, 1, 0)),
    "air_front": Location((0.42, -0.16, 0.52), (1.0, 0.05, 0.35), (0.0, 0.0, 1.0), (1, 0, 0), (0, 1, 0)),
    "air_pull": Location((0.45, -0.12, 0.60), (1.0, 0.1, 0.25), (0.0, -0.3, 1.0), (1, 0, 0), (0, 1, 0)),
    "tray": Location((0.42, -0.10, 0.30), (1.0, 0.1, -0.5), (0.0, 0.0, 1.0), (0, 0, 1), (1, 0, 0)),
}

# gesture -> (location, motion pattern, amplitude m, frequency Hz, wrist rotation rad)
GESTURE_SPECS: dict[str, tuple[str, str, float, float, float]] = {
    "Above ear - pull hair": ("above_ear", "pull", 0.045, 0.9, 0.30),
    "Cheek - pinch skin": ("cheek", "pinch", 0.010, 1.4, 0.32),
    "Eyebrow - pull hair": ("eyebrow", "pull", 0.032, 1.0, 0.26),
    "Eyelash - pull hair": ("eyelash", "pull", 0.027, 1.1, 0.24),
    "Forehead - pull hairline": ("forehead", "pull", 0.042, 0.9, 0.26),
    "Forehead - scratch": ("forehead", "scratch", 0.013, 2.7, 0.2),
    "Neck - pinch skin": ("neck", "pinch", 0.012, 1.6, 0.28),
    "Neck - scratch": ("neck", "scratch", 0.012, 1.7, 0.25),
    "Drink from bottle/cup": ("bottle", "drink", 0.0, 0.0, 1.1),
    "Feel around in tray and pull out an object": ("tray", "tray", 0.06, 1.0, 0.4),
    "Glasses on/off": ("eyes_glasses", "glasses", 0.20, 0.0, 0.7),
    "Pinch knee/leg skin": ("thigh", "pinch", 0.011, 1.3, 0.30),
    "Pull air toward your face": ("air_pull", "pull_air", 0.20, 0.7, 0.6),
    "Scratch knee/leg skin": ("thigh", "scratch", 0.013, 2.4, 0.22),
    "Text on phone": ("phone", "text", 0.006, 2.5, 0.08),
    "Wave hello": ("wave", "wave", 0.06, 1.4, 0.6),
    "Write name in air": ("air_front", "write", 0.04, 1.0, 0.16),
    "Write name on leg": ("thigh", "write", 0.045, 1.0, 0.14),
}
PATTERNS: tuple[str, ...] = (
    "pull",
    "pinch",
    "scratch",
    "drink",
    "tray",
    "glasses",
    "pull_air",
    "text",
    "wave",
    "write",
)

# Rest pose per posture: (position, forearm direction, dorsal direction)
REST_POSES: dict[str, tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]] = {
    SEATED: ((0.30, -0.15, 0.11), (1.0, 0.0, -0.1), (0.0, -0.3, 1.0)),
    LEAN: ((0.36, -0.12, 0.20), (0.8, 0.5, -0.3), (0.2, -0.2, 1.0)),
    BACK: ((-0.03, -0.25, 0.08), (0.0, 0.0, -1.0), (1.0, -0.2, 0.0)),
    SIDE: ((0.05, -0.19, 0.06), (0.3, 0.0, -1.0), (0.1, -1.0, 0.0)),
}


@cache
def _base_quats() -> dict[str, np.ndarray]:
    """Device->torso quaternions of every location and rest pose, and torso->world of each posture."""
    out: dict[str, np.ndarray] = {}
    for k, loc in LOCATIONS.items():
        out["loc:" + k] = Rotation.from_matrix(_frame(loc.fwd, loc.dorsal)).as_quat()
    for o, (_, f, d) in REST_POSES.items():
        out["rest:" + o] = Rotation.from_matrix(_frame(f, d)).as_quat()
    out["post:" + SEATED] = np.array([0.0, 0.0, 0.0, 1.0])
    out["post:" + LEAN] = np.array([0.0, 0.0, 0.0, 1.0])  # its lean is drawn per sequence
    out["post:" + BACK] = Rotation.from_rotvec([0.0, -np.pi / 2, 0.0]).as_quat()  # front faces up
    # on the non-dominant (left) side: torso +y points down, the front is horizontal
    out["post:" + SIDE] = Rotation.from_matrix(
        np.column_stack([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])
    ).as_quat()
    return out


def _frame(fwd, dorsal) -> np.ndarray:
    """Device->torso matrix from the forearm (device y) and dorsal (device z) directions."""
    y = _n(fwd)
    z = np.asarray(dorsal, float) - np.dot(dorsal, y) * y
    z = z / np.linalg.norm(z)
    return np.column_stack([np.cross(y, z), y, z])


# ----------------------------------------------------------------------------------
# Sensors, device frame: x across the wrist (the mirror axis), y along the forearm
# toward the hand, z out of the back of the wrist.  Each ToF is an 8x8 grid with a
# 45 degree field of view; columns run along +x for the sensors on the mid-plane so a
# left<->right grid flip is the mirror image.  Rays are cast on a 5x5 sub-grid and the
# inverse distance (linear across a plane) is interpolated to the 8x8 pixels.
# ----------------------------------------------------------------------------------
_SENSOR_DIRS = np.array(
    [
        _n([0.0, 0.6, 0.8]),  # 1: on the face, tilted toward the hand
        _n([0.0, 0.95, -0.3]),  # 2: distal edge, looking along the fingers
        _n([0.8, 0.5, -0.3]),  # 3: radial side, looking toward the hand
        _n([0.0, 0.5, -0.87]),  # 4: palmar side, sees what the palm faces
        _n([-0.8, 0.5, -0.3]),  # 5: ulnar side (mirror of 3)
    ]
)
_SENSOR_OFFSETS = np.array(
    [
        [0.0, 0.005, 0.012],
        [0.0, 0.02, 0.006],
        [0.018, 0.0, 0.006],
        [0.0, 0.01, -0.012],
        [-0.018, 0.0, 0.006],
    ]
)
_COARSE = 5
_FOV_HALF = np.deg2rad(22.5)


def _sensor_axes(k: int) -> tuple[np.ndarray, np.ndarray]:
    c = _SENSOR_DIRS[k]
    ref = np.array([1.0, 0.0, 0.0]) if abs(c[0]) < 0.5 else np.array([0.0, 0.0, 1.0])
    u = ref - np.dot(ref, c) * c
    u /= np.linalg.norm(u)
    if k == 4:  # sensor 5 is the mirror image of sensor 3: its columns run the other way
        u3, _ = _sensor_axes(2)
        u = -(u3 * np.array([-1.0, 1.0, 1.0]))
    v = np.cross(c, u)
    return u, v


def _ray_dirs() -> np.ndarray:
    """(5, 25, 3) unit directions of the coarse rays in the device frame."""
    g = np.linspace(-1.0, 1.0, _COARSE) * np.tan(_FOV_HALF) * (7.0 / 8.0)  # coarse nodes at pixel 0 and 7 centres
    out = np.empty((5, _COARSE * _COARSE, 3))
    for k in range(5):
        u, v = _sensor_axes(k)
        d = _SENSOR_DIRS[k][None, None, :] + g[:, None, None] * v[None, None, :] + g[None, :, None] * u[None, None, :]
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        out[k] = d.reshape(-1, 3)
    return out


def _interp_matrix() -> np.ndarray:
    """(25, 64) bilinear weights from the 5x5 coarse nodes to the 8x8 pixel centres."""
    nodes = np.linspace(0.0, 7.0, _COARSE)
    w1 = np.zeros((_COARSE, 8))
    for p in range(8):
        i = min(int(np.searchsorted(nodes, p, side="right")) - 1, _COARSE - 2)
        f = (p - nodes[i]) / (nodes[i + 1] - nodes[i])
        w1[i, p] += 1 - f
        w1[i + 1, p] += f
    return np.einsum("ap,bq->abpq", w1, w1).reshape(_COARSE * _COARSE, 64)


# ----------------------------------------------------------------------------------
# Subjects
# ----------------------------------------------------------------------------------
@dataclass
class _Subject:
    sid: str
    adult: int
    age: int
    sex: int
    right_handed: bool
    height: float
    shoulder_to_wrist: int
    elbow_to_wrist: float
    rotated_device: bool
    rng: np.random.Generator
    tilt_y: float = 0.0  # radians: the device sits tilted about its own y axis on this wearer's wrist (0: not)
    # how this wearer's strap sits: a small rotation (rad, device x/y/z) of the device on the wrist, everyone
    strap_rv: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # style
    scale: float = 1.0
    arm: float = 1.0
    speed: float = 1.0


def _demographics(rng: np.random.Generator, sid: str) -> dict:
    adult = int(rng.random() < 0.52)
    if adult:
        age = int(np.clip(round(rng.lognormal(np.log(28), 0.25)), 18, 60))
        height = float(np.clip(rng.normal(172.5, 7.5), 155, 195))
    else:
        age = int(rng.integers(10, 18))
        height = float(np.clip(rng.normal(163 - (15 - age) * 3.0, 8.0), 130, 186))
    sex = int(rng.random() < 0.62)
    right = bool(rng.random() >= 0.11)
    stw = int(np.clip(round(height * 0.305 + rng.normal(0, 2.5)), 38, 72))
    etw = float(np.clip(round(height * 0.15 + rng.normal(0, 1.5)), 17, 40))
    return dict(
        subject=sid,
        adult_child=adult,
        age=age,
        sex=sex,
        handedness=int(right),
        height_cm=round(height * 2) / 2,
        shoulder_to_wrist_cm=stw,
        elbow_to_wrist_cm=etw,
    )


# ----------------------------------------------------------------------------------
# Trajectory helpers
# ----------------------------------------------------------------------------------
def _minjerk(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * x * (10 - 15 * x + 6 * x * x)


def _smooth_noise(rng: np.random.Generator, n: int, dims: int, sigma_samples: float, std: float) -> np.ndarray:
    """Band-limited noise with the given standard deviation (tremor, drift, strokes)."""
    w = rng.standard_normal((n + 8 * int(sigma_samples) + 8, dims))
    f = gaussian_filter1d(w, sigma_samples, axis=0, mode="wrap")
    pad = 4 * int(sigma_samples) + 4
    f = f[pad : pad + n]
    s = f.std(axis=0, keepdims=True) + 1e-12 if n > 4 else 1.0
    return f / s * std


def _slow_wander(rng: np.random.Generator, n: int, sigma_samples: float) -> np.ndarray:
    """Slow Gaussian noise of unit standard deviation *in expectation* (white noise through a Gaussian filter of
    ``sigma_samples``, scaled by the filter's gain). Unlike ``_smooth_noise`` it is not rescaled by the draw's own
    spread, which explodes when ``n`` is short against ``sigma_samples`` (a nearly flat draw divided by its tiny sd)."""
    pad = 4 * int(sigma_samples) + 4
    w = rng.standard_normal(n + 2 * pad)
    f = gaussian_filter1d(w, sigma_samples, mode="wrap")[pad : pad + n]
    return f * np.sqrt(2.0 * np.sqrt(np.pi) * sigma_samples)


def _sloppy_envelope(rng: np.random.Generator, tau: np.ndarray) -> np.ndarray:
    """How fully a person performs the motion over time: a slowly wandering strength (sd ~25 %) and, in about
    a third of the gestures, a hesitation of 0.4-0.9 s where the motion nearly stops (REAL_DATA_FACTS.md §1:
    real gestures are not metronomic)."""
    n = len(tau)
    if n < 9:
        return np.ones(n)
    env = np.exp(0.25 * _slow_wander(rng, n, 0.5 * OVERSAMPLE * FS))
    if rng.random() < 0.33 and tau[-1] > 1.5:
        mid = rng.uniform(0.6, tau[-1] - 0.6)
        half = 0.5 * rng.uniform(0.4, 0.9)
        dip = np.clip((np.abs(tau - mid) - half) / 0.2 + 1.0, 0.0, 1.0)  # 0 inside the pause, ramps of 0.2 s
        env *= 0.12 + 0.88 * _minjerk(dip)
    return env


def _pattern(
    kind: str,
    tau: np.ndarray,
    dur: float,
    amp: float,
    freq: float,
    rot: float,
    ph: float,
    rng: np.random.Generator,
    nrm: np.ndarray,
    tan: np.ndarray,
    style: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """Displacement (torso frame) and wrist rotation vector (device frame) of a motion pattern.

    ``tau`` is time since the gesture began (s); amplitudes are already subject-scaled.
    """
    n = len(tau)
    side = np.cross(nrm, tan)
    side = side / (np.linalg.norm(side) + 1e-9)
    disp = np.zeros((n, 3))
    rv = np.zeros((n, 3))
    env = _minjerk(tau / 0.5) * _sloppy_envelope(rng, tau)  # ease in: continuous with the hold
    # the rhythm wanders (+-15 %, slowly): the phase is the integral of the instantaneous frequency
    f_t = freq * np.exp(0.15 * _slow_wander(rng, n, 0.6 * OVERSAMPLE * FS))
    w2p = 2 * np.pi * np.concatenate([[0.0], np.cumsum(f_t[1:] * np.diff(tau))]) + ph
    if kind == "pull":
        # slow repeated tugs: quick pull away from the skin, slower release
        c = 0.5 * (1 - np.cos(w2p))
        c = c ** style["pull_sharp"]
        dirv = _n(nrm + style["pull_slant"] * tan)
        disp = env[:, None] * c[:, None] * amp * dirv
        rv[:, 0] = env * c * rot
        rv[:, 1] = env * c * rot * style["twist_mix"]
    elif kind == "pinch":
        # small twisting of the fingers with a slight pull: the twist leads the pull by a quarter cycle. The
        # twist axis mixes forearm roll (y) and wrist flexion (x) in a proportion of the person's own, so the
        # per-axis energy says little; the timing between twist and pull is what marks a pinch
        s = np.sin(w2p)
        c = 0.5 * (1 - np.cos(w2p))
        disp = env[:, None] * (c * amp)[:, None] * nrm
        axis = _n([style["rot_axis_mix"], 1.0, 0.0])
        rv = (env * s * rot)[:, None] * axis
        rv[:, 0] += env * c * rot * 0.3
    elif kind == "scratch":
        s = np.sin(w2p)
        jitter = 1.0 + 0.25 * _smooth_noise(rng, n, 1, 6, 1.0)[:, 0]
        disp = (
            env[:, None] * (amp * jitter * s)[:, None] * _n(tan + style["scr_slant"] * side)
            + env[:, None] * (0.3 * amp * np.abs(s))[:, None] * nrm
        )
        # the wrist rocks with the stroke, nearly in phase with it (the pinch's twist leads by a quarter cycle)
        axis = _n([1.0, style["rot_axis_mix"], 0.0])
        rv = (env * rot * jitter * np.sin(w2p + 0.25))[:, None] * axis
    elif kind == "wave":
        s = np.sin(w2p)
        disp = env[:, None] * (amp * s)[:, None] * tan
        rv[:, 1] = env * rot * np.sin(w2p + 0.3)
        rv[:, 0] = env * rot * 0.4 * s
    elif kind == "write":
        strokes = _smooth_noise(rng, n, 2, OVERSAMPLE * FS / (2 * np.pi * max(freq, 0.3)), 1.0)
        drift = (tau - tau.mean()) * 0.025 * style["write_speed"]
        disp = env[:, None] * (amp * (strokes[:, :1] * tan + strokes[:, 1:] * side) + drift[:, None] * side)
        rv = env[:, None] * _smooth_noise(rng, n, 3, 8, rot)
    elif kind == "text":
        taps = np.maximum(0.0, np.sin(w2p)) ** 3
        disp = env[:, None] * ((amp * taps)[:, None] * nrm + _smooth_noise(rng, n, 3, 20, 0.004))
        rv = env[:, None] * _smooth_noise(rng, n, 3, 12, rot)
    elif kind == "pull_air":
        c = 0.5 * (1 - np.cos(w2p))
        disp = -env[:, None] * (amp * c)[:, None] * nrm  # toward the face
        rv[:, 0] = env * rot * c
    elif kind == "drink":
        x = tau / dur
        lift = _minjerk(x / 0.35) - 0.6 * _minjerk((x - 0.78) / 0.22)
        mouth = np.array([0.13, -0.08, 0.56]) * style["scale"] - style["target"]
        disp = lift[:, None] * mouth
        tilt = _minjerk((x - 0.3) / 0.25) - _minjerk((x - 0.72) / 0.2)
        rv[:, 1] = -rot * tilt  # tip the cup toward the mouth by rolling the forearm
        rv[:, 0] = 0.3 * rot * tilt
    elif kind == "glasses":
        x = tau / dur
        away = _minjerk(x / 0.35) - _minjerk((x - 0.55) / 0.35)
        disp = away[:, None] * amp * _n(nrm - 0.4 * np.array([0, 0, 1.0]))
        rv[:, 1] = rot * away
    elif kind == "tray":
        x = tau / dur
        disp = env[:, None] * _smooth_noise(rng, n, 3, 0.25 * OVERSAMPLE * FS, amp)
        disp += _minjerk((x - 0.75) / 0.25)[:, None] * 0.12 * style["scale"] * nrm
        rv = env[:, None] * _smooth_noise(rng, n, 3, 0.2 * OVERSAMPLE * FS, rot)
    return disp, rv


@dataclass
class _Seq:
    """One sequence before the rotation maths and sensors (10 Hz arrays unless noted)."""

    gesture: str
    orientation: str
    kind: str
    behavior1: str
    n_move: int  # rows of the first behaviour (idle + reach)
    n_hold: int
    n_gest: int
    a_b: np.ndarray  # (L, 3) wrist linear acceleration, torso frame
    pos: np.ndarray  # (L, 3) wrist position, torso frame
    reach: np.ndarray  # (L,) 0 at rest -> 1 at the target (orientation interpolation)
    rv: np.ndarray  # (L, 3) gesture/tremor wrist rotation, device frame
    loc_key: str
    tgt_rv: np.ndarray  # (3,) subject habit + trial jitter of the hand orientation at the target
    rest_rv: np.ndarray  # (3,)
    post_rv: np.ndarray  # (3, 3) lean pitch, lean roll, posture jitter (rotation vectors)
    heading: float  # arbitrary yaw of the world frame (the magnetometer's north)
    target: np.ndarray  # (3,)
    nrm: np.ndarray  # (3,)
    thigh_c: np.ndarray  # (2, 3) two spheres standing in for the thigh
    env_d: float  # height of the table / mattress plane relative to the torso origin

    @property
    def length(self) -> int:
        return len(self.pos)


def _seq_lengths(rng: np.random.Generator, speed: float, relaxed: bool) -> tuple[int, int, int, int]:
    """(idle, move, hold, gesture) sample counts, shaped like the real segments (REAL_DATA_FACTS.md §1).

    The first segment is "Moves hand to target location" (rows: median 28, mean 38, a long tail) or, when
    ``relaxed``, "Relaxes and moves hand to target location" (median 15, mean 16.7, sd 7.3); the pause
    ("Hand at target location") has median 8, mean 11.7; the gesture 31.4 +- 3.6 rows.
    """
    if relaxed:
        first = int(np.clip(round(rng.lognormal(np.log(15.0), 0.45)), 6, 80))
    else:
        first = int(np.clip(round(rng.lognormal(np.log(28.0), 0.8)), 8, 640))
    move = int(min(first, max(6, round(rng.uniform(10, 20) / speed))))
    hold = int(np.clip(round(rng.lognormal(np.log(8.0), 0.75)), 2, 80))
    gest = int(np.clip(round(rng.normal(31.0, 3.0) / speed**0.3), 22, 48))
    idle = first - move
    total = idle + move + hold + gest
    if total < 29:
        idle += 29 - total
    return idle, move, hold, gest


def _make_sequence(
    subj: _Subject, style: dict, orientation: str, gesture: str, behavior1: str, rng: np.random.Generator
) -> _Seq:
    s = subj.scale
    loc_key, kind, amp0, freq0, rot0 = GESTURE_SPECS[gesture]
    lying = orientation in (BACK, SIDE)
    if loc_key == "thigh" and lying:
        loc_key = "thigh_lying"
    loc = LOCATIONS[loc_key]
    idle, move, hold, gest = _seq_lengths(rng, subj.speed, relaxed=behavior1 == schema.BEHAVIORS[0])
    L = idle + move + hold + gest
    nf = L * OVERSAMPLE
    t = np.arange(nf) / (FS * OVERSAMPLE)

    # target position: nominal location, subject habit, trial jitter
    target = np.asarray(loc.pos) * s + style["loc_off"][loc_key] + rng.normal(0, 0.012, 3) * s
    tgt_rv = style["rot_off"][loc_key] + rng.normal(0, 0.12, 3)
    rest = np.asarray(REST_POSES[orientation][0]) * s + style["rest_off"][orientation] + rng.normal(0, 0.02, 3) * s
    rest_rv = rng.normal(0, 0.15, 3)
    nrm, tan = _n(loc.normal), _n(loc.tangent)

    # transition: idle at rest, then a curved minimum-jerk reach, then hold; a reach is
    # never faster than a ~5 m/s^2 peak acceleration (the idle part gives way to it)
    bulge = style["bulge"] + rng.normal(0, 0.03, 3) * s
    need = int(np.ceil(FS * np.sqrt(5.77 * (np.linalg.norm(target - rest) + 3 * np.linalg.norm(bulge)) / 4.0)))
    if move < need:
        shift = min(need - move, idle)
        idle -= shift
        move = need  # too quick for a human reach: lengthen the transition instead
        L = idle + move + hold + gest
        nf = L * OVERSAMPLE
        t = np.arange(nf) / (FS * OVERSAMPLE)
    t0 = idle / FS
    t1 = (idle + move) / FS
    sm = _minjerk((t - t0) / (t1 - t0))
    pos = (1 - sm)[:, None] * rest + sm[:, None] * target + np.sin(np.pi * sm)[:, None] * bulge

    # gesture pattern
    amp = amp0 * subj.arm * style["amp"][kind] * np.exp(rng.normal(0, 0.15))
    freq = freq0 * subj.speed * style["freq"][kind] * np.exp(rng.normal(0, 0.08))
    rot = rot0 * style["rot"][kind] * np.exp(rng.normal(0, 0.15))
    ig = (idle + move + hold) * OVERSAMPLE  # integer index: float comparisons would misalign the 10 Hz grid
    tau = t[ig:] - t[ig]
    pat_style = dict(style["pat"], scale=s, target=target)
    disp, rv_f = _pattern(kind, tau, gest / FS, amp, freq, rot, rng.uniform(-0.3, 0.3), rng, nrm, tan, pat_style)
    pos[ig:] += disp
    # physiological tremor (smooth, so its acceleration stays small)
    pos += _smooth_noise(rng, nf, 3, 6, 0.0022 * style["tremor"])

    # acceleration by finite differences on the 40 Hz grid, averaged down to 10 Hz
    dt = 1.0 / (FS * OVERSAMPLE)
    a_f = np.gradient(np.gradient(pos, dt, axis=0), dt, axis=0)
    a_b = a_f.reshape(L, OVERSAMPLE, 3).mean(axis=1)
    pos10 = pos[::OVERSAMPLE] + _smooth_noise(rng, L, 3, 10, 0.006 * s)  # slow drift: ToF only
    rv10 = _smooth_noise(rng, L, 3, 3, 0.02)
    rv10[L - gest :] += rv_f[::OVERSAMPLE]

    post_rv = np.zeros((3, 3))
    if orientation == LEAN:
        # leaning forward over the table, rolled toward the non-dominant (left) side
        post_rv[0, 1] = np.deg2rad(rng.uniform(45, 65))
        post_rv[1, 0] = -np.deg2rad(rng.uniform(15, 30))
    post_rv[2] = rng.normal(0.0, np.deg2rad(6.0), 3)
    if lying:
        env_d = -(0.11 if orientation == BACK else 0.17) * s  # the mattress under the back / side
        th_dir = _n([0.15, 0.0, -1.0])
    else:
        env_d = 0.26 * s  # the table top
        th_dir = _n([1.0, 0.0, -0.1])
    hip = np.array([0.0, -0.10, 0.02]) * s
    thigh_c = np.stack([hip + th_dir * 0.15 * s, hip + th_dir * 0.33 * s])
    return _Seq(
        gesture,
        orientation,
        kind,
        behavior1,
        idle + move,
        hold,
        gest,
        a_b,
        pos10,
        sm[::OVERSAMPLE],
        rv10,
        loc_key,
        tgt_rv,
        rest_rv,
        post_rv,
        style["heading"] + float(rng.normal(0, 0.35)),
        target,
        nrm,
        thigh_c,
        env_d,
    )


def _make_style(rng: np.random.Generator, s: float) -> dict:
    """Per-subject habits: where exactly they touch, how they hold the hand, how big/fast they move."""
    return {
        "loc_off": {k: rng.normal(0, 0.02, 3) * s for k in LOCATIONS},
        "rot_off": {k: rng.normal(0, 0.3, 3) for k in LOCATIONS},
        "rest_off": {o: rng.normal(0, 0.04, 3) * s for o in schema.ORIENTATIONS},
        "amp": {k: float(np.exp(rng.normal(0, 0.3))) for k in PATTERNS},
        "freq": {k: float(np.exp(rng.normal(0, 0.2))) for k in PATTERNS},
        "rot": {k: float(np.exp(rng.normal(0, 0.3))) for k in PATTERNS},
        "bulge": rng.normal([0.05, -0.04, 0.04], 0.03, 3) * s,
        "tremor": float(np.exp(rng.normal(0, 0.4))),
        "heading": float(rng.uniform(-np.pi, np.pi)),
        "pat": {
            "pull_sharp": float(rng.uniform(1.0, 2.5)),
            "pull_slant": float(rng.normal(0.3, 0.3)),
            "twist_mix": float(rng.normal(0.0, 0.4)),
            "scr_slant": float(rng.normal(0.0, 0.5)),
            "write_speed": float(rng.uniform(0.5, 1.5)),
            "rot_axis_mix": float(rng.normal(0.0, 0.8)),
        },
    }


# ----------------------------------------------------------------------------------
# Proximity sensors, vectorised over all rows of one subject
# ----------------------------------------------------------------------------------
def _hit_sphere(ox, oy, oz, ux, uy, uz, c, r) -> np.ndarray:
    """Distance along unit rays to a sphere (inf on a miss). c: (n,1,1,3) or (3,), r: scalar or (n,1,1)."""
    wx, wy, wz = ox - c[..., 0], oy - c[..., 1], oz - c[..., 2]
    b = ux * wx + uy * wy + uz * wz
    cc = wx * wx + wy * wy + wz * wz - r * r
    disc = b * b - cc
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    return np.where((disc > 0) & (t > 0), t, np.inf)


@dataclass
class _Kin:
    """Per-row kinematics of all sequences of one subject, concatenated."""

    acc: np.ndarray  # (N, 3) device frame, with gravity
    quat: np.ndarray  # (N, 4) w, x, y, z (device -> world)
    rmat: np.ndarray  # (N, 3, 3) device -> torso
    pos: np.ndarray  # (N, 3) torso frame
    up: np.ndarray  # (N, 3) world up in the torso frame
    obj_c: np.ndarray  # (N, 3) held / nearby object centre
    obj_r: np.ndarray  # (N,) radius, 0 = none
    obj_temp: np.ndarray  # (N,) its temperature offset from ambient
    rep: np.ndarray  # (N,) sequence index of each row


def _kinematics(seqs: list[_Seq], subj: _Subject) -> _Kin:
    """Orientation, accelerometer and quaternion for all rows at once (scipy Rotation is batched)."""
    bq = _base_quats()
    lens = np.array([q.length for q in seqs])
    rep = np.repeat(np.arange(len(seqs)), lens)
    r_tgt = Rotation.from_quat(np.stack([bq["loc:" + q.loc_key] for q in seqs])) * Rotation.from_rotvec(
        np.stack([q.tgt_rv for q in seqs])
    )
    r_rest = Rotation.from_quat(np.stack([bq["rest:" + q.orientation] for q in seqs])) * Rotation.from_rotvec(
        np.stack([q.rest_rv for q in seqs])
    )
    rel = (r_rest.inv() * r_tgt).as_rotvec()
    pr = np.stack([q.post_rv for q in seqs])
    r_wb = (
        Rotation.from_quat(np.stack([bq["post:" + q.orientation] for q in seqs]))
        * Rotation.from_rotvec(pr[:, 0])
        * Rotation.from_rotvec(pr[:, 1])
        * Rotation.from_rotvec(pr[:, 2])
    )
    reach = np.concatenate([q.reach for q in seqs])
    rv = np.concatenate([q.rv for q in seqs])
    r_bd = r_rest[rep] * Rotation.from_rotvec(reach[:, None] * rel[rep]) * Rotation.from_rotvec(rv)
    up = r_wb.inv().apply([0.0, 0.0, 1.0])  # (n_seq, 3)
    a_b = np.concatenate([q.a_b for q in seqs])
    # the accelerometer measures specific force: linear acceleration plus the reaction to gravity
    acc = r_bd.inv().apply(a_b + G * up[rep])
    heading = Rotation.from_rotvec(np.outer(np.array([q.heading for q in seqs]), [0.0, 0.0, 1.0]))
    r_wd = (heading * r_wb)[rep] * r_bd
    quat = r_wd.as_quat()[:, [3, 0, 1, 2]]  # scipy is scalar-last; the files are scalar-first
    rmat = r_bd.as_matrix()
    pos = np.concatenate([q.pos for q in seqs])

    # objects: phone in the other hand, tray contents, a bottle that is grasped and carried
    N = len(rep)
    obj_c = np.zeros((N, 3))
    obj_r = np.zeros(N)
    obj_temp = np.zeros(N)
    start = 0
    s = subj.scale
    for i, q in enumerate(seqs):
        sl = slice(start, start + q.length)
        start += q.length
        if q.kind == "text":
            obj_c[sl] = q.target - q.nrm * 0.07 * s + np.array([0.02, 0.04, 0.0]) * s
            obj_r[sl] = 0.055 * s
        elif q.kind == "tray":
            obj_c[sl] = q.target - q.nrm * 0.11 * s
            obj_r[sl] = 0.09 * s
        elif q.kind == "drink":
            grip = np.array([0.0, 0.07, -0.05])
            held = rmat[sl] @ grip + pos[sl]
            at = q.n_move  # the hand closes on the bottle when it reaches it
            obj_c[sl] = held
            obj_c[sl][:at] = r_tgt[i].apply(grip) + q.target
            obj_r[sl] = 0.035
            obj_temp[sl] = -6.0  # a cool drink
    return _Kin(acc, quat, rmat, pos, up[rep], obj_c, obj_r, obj_temp, rep)


_RAY_CACHE: dict[str, np.ndarray] = {}


def _proximity(
    seqs: list[_Seq], kin: _Kin, subj: _Subject, rng: np.random.Generator, thm_base: np.ndarray, skin: float
) -> tuple[np.ndarray, np.ndarray]:
    """ToF (N, 320) and thermopile (N, 5) readings for the rows in ``kin``."""
    if not _RAY_CACHE:
        _RAY_CACHE["rays"] = _ray_dirs().reshape(-1, 3).T.astype(np.float32).copy()  # (3, 125)
        _RAY_CACHE["interp"] = _interp_matrix().astype(np.float32)
        _RAY_CACHE["offsets"] = _SENSOR_OFFSETS.T.astype(np.float32).copy()  # (3, 5)
    s = subj.scale
    N = len(kin.rep)
    rm = kin.rmat.astype(np.float32)
    pos = kin.pos.astype(np.float32)
    org = pos[:, :, None] + rm @ _RAY_CACHE["offsets"]  # (N, 3, 5)
    dirs = rm @ _RAY_CACHE["rays"]  # (N, 3, 125)
    o = [org[:, i, :, None] for i in range(3)]  # (N, 5, 1)
    u = [dirs[:, i, :].reshape(N, 5, _COARSE * _COARSE) for i in range(3)]  # (N, 5, 25)

    near = np.full((N, 5, _COARSE * _COARSE), np.inf, dtype=np.float32)
    which = np.zeros(near.shape, dtype=np.int8)  # index into ``surf_warm`` of the surface each ray sees
    surf_warm = [0.0]  # how warm each surface is (1 = bare skin); 0: nothing
    obj_label = -1

    def update(rows: np.ndarray, t: np.ndarray, warm: float) -> int:
        surf_warm.append(warm)
        label = len(surf_warm) - 1
        cur = near[rows]
        better = t < cur
        near[rows] = np.where(better, t, cur)
        which[rows] = np.where(better, np.int8(label), which[rows])
        return label

    def sub(rows: np.ndarray):
        return [x[rows] for x in o], [x[rows] for x in u]

    reach = 0.45 * s  # a ray can only report a surface within range of the wrist
    spheres = [(HEAD_C * s, HEAD_R * s, 1.0), (NECK_C * s, NECK_R * s, 1.0)]
    for k, (c, r, warm) in enumerate(spheres):
        rows = np.flatnonzero(np.linalg.norm(pos - c, axis=1) < reach + r)
        if not len(rows):
            continue
        (ox, oy, oz), (ux, uy, uz) = sub(rows)
        t = _hit_sphere(ox, oy, oz, ux, uy, uz, c.astype(np.float32), np.float32(r))
        if k == 0:
            # hair covers the top, the sides above the ears and the back of the head: it is cooler than skin
            # (it insulates) and its reflections scatter a centimetre or two deep
            with np.errstate(invalid="ignore"):
                hx, hz = ox + t * ux, oz + t * uz
            hair = np.isfinite(t) & ((hz > c[2] + 0.03 * s) | ((hx < c[0] + 0.03 * s) & (hz > c[2] - 0.035 * s)))
            depth = rng.uniform(0.0, 0.02, t.shape).astype(np.float32)
            update(rows, np.where(hair, np.inf, t), warm)
            update(rows, np.where(hair, t + depth, np.inf), 0.3)
        else:
            update(rows, t, warm)
    thc = np.stack([q.thigh_c for q in seqs])[kin.rep].astype(np.float32)  # (N, 2, 3)
    for j in range(2):
        rows = np.flatnonzero(np.linalg.norm(pos - thc[:, j], axis=1) < reach + 0.085 * s)
        if len(rows):
            (ox, oy, oz), (ux, uy, uz) = sub(rows)
            update(rows, _hit_sphere(ox, oy, oz, ux, uy, uz, thc[rows, None, None, j, :], np.float32(0.085 * s)), 0.55)
    # chest: the plane x = CHEST_X below the shoulders, seen from the front, clothed (cooler than skin)
    rows = np.flatnonzero((pos[:, 0] > CHEST_X * s) & (pos[:, 0] < CHEST_X * s + reach))
    if len(rows):
        (ox, oy, oz), (ux, uy, uz) = sub(rows)
        with np.errstate(divide="ignore", invalid="ignore"):
            tc = (CHEST_X * s - ox) / ux
            hz = oz + tc * uz
            hy = oy + tc * uy
        ok = (tc > 0) & (hz < CHEST_TOP * s) & (hz > 0.12 * s) & (np.abs(hy) < 0.17 * s)
        update(rows, np.where(ok, tc, np.inf), 0.5)
    # table top (seated; seen from above, or from below when the hand is in the lap) or the
    # mattress (lying): a world-horizontal plane
    env_d = np.array([q.env_d for q in seqs], dtype=np.float32)[kin.rep]
    table = np.array([q.orientation in (SEATED, LEAN) for q in seqs])[kin.rep]
    up = kin.up.astype(np.float32)
    height = np.einsum("ni,ni->n", pos, up) - env_d
    rows = np.flatnonzero((np.abs(height) < reach) & (table | (height > 0)))
    if len(rows):
        (ox, oy, oz), (ux, uy, uz) = sub(rows)
        n = up[rows, None, None, :]
        den = ux * n[..., 0] + uy * n[..., 1] + uz * n[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -height[rows, None, None] / den
            front = ox + t * ux > 0.2 * s  # the table's edge is in front of the lap
        ok = (t > 0) & (~table[rows, None, None] | front)
        update(rows, np.where(ok, t, np.inf), 0.0)
    rows = np.flatnonzero(kin.obj_r > 0)
    if len(rows):
        (ox, oy, oz), (ux, uy, uz) = sub(rows)
        c = kin.obj_c[rows, None, None, :].astype(np.float32)
        obj_label = update(
            rows, _hit_sphere(ox, oy, oz, ux, uy, uz, c, kin.obj_r[rows, None, None].astype(np.float32)), 0.0
        )

    # background clutter (the other arm, clothing, furniture): some sensors of some sequences see a
    # surface 17-27 cm away whatever the gesture, so far-range readings are a nuisance, not a cue
    n_seq = len(seqs)
    has = rng.random((n_seq, 5)) < 0.3
    base = rng.uniform(0.17, 0.27, (n_seq, 5))
    tilt = 1.0 + 0.12 * rng.standard_normal((n_seq, 5, 1)) * np.linspace(-1, 1, _COARSE * _COARSE)[None, None, :]
    clutter = np.where(has[:, :, None], base[:, :, None] * tilt, np.inf).astype(np.float32)
    near_env = np.minimum(near, clutter[kin.rep])
    which = np.where(near_env < near, np.int8(0), which)
    near = near_env

    # thermopile: skin seen up close warms the reading; a cool bottle cools it slightly
    proximity = np.exp(-np.minimum(near, 1.0) / 0.09)
    warm_frac = np.asarray(surf_warm, dtype=np.float32)[which]
    is_obj = which == obj_label
    warm_w = np.clip(2.2 * (warm_frac * proximity).mean(axis=2), 0.0, 1.0)  # (N, 5) share of warm view
    cool = (is_obj * proximity).mean(axis=2) * kin.obj_temp[:, None]
    thm_target = thm_base[None, :] + (skin - thm_base[None, :]) * warm_w + cool

    # ToF: interpolate inverse distance (linear across a plane) from the 5x5 rays to the 8x8 pixels
    inv = np.where(np.isfinite(near), 1.0 / np.maximum(near, 1e-3), 0.0).astype(np.float32)
    inv8 = (inv.reshape(N * 5, -1) @ _RAY_CACHE["interp"]).reshape(N, 5, 64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        d_mm = 1000.0 / inv8
        p_ret = 0.97 / (1.0 + np.exp((d_mm - TOF_RANGE_M * 1000.0) / 12.0))
        gain = np.float32(np.exp(rng.normal(0, 0.04)))
        # uniform noise: a normal draw of this size costs 5x more and the readings are rounded anyway
        noise = (rng.random(d_mm.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(3.46)
        val = d_mm * gain + noise * (1.5 + 0.02 * np.minimum(d_mm, 400))
    ok = (rng.random(d_mm.shape, dtype=np.float32) < p_ret) & (val < 254.5)
    tof = np.where(ok, np.clip(np.rint(val), 0, 254), -1.0).astype(np.float32).reshape(N, 320)

    # thermopile lag (~0.8 s time constant) per sequence, then noise
    thm = np.empty((N, 5), dtype=np.float32)
    a = 1.0 - np.exp(-1.0 / (FS * 0.8))
    start = 0
    for q in seqs:
        x = thm_target[start : start + q.length]
        y, _ = lfilter([a], [1.0, -(1 - a)], x, axis=0, zi=(1 - a) * x[:1])
        thm[start : start + q.length] = y
        start += q.length
    thm += rng.normal(0, 0.06, thm.shape).astype(np.float32)
    return tof, thm


def _mirror(acc: np.ndarray, quat: np.ndarray, thm: np.ndarray, tof: np.ndarray) -> None:
    """In place: the left-hand wearer's signal, the mirror image across the device x axis."""
    acc[:, 0] *= -1
    quat[:, 2] *= -1
    quat[:, 3] *= -1
    thm[:, [2, 4]] = thm[:, [4, 2]]
    g = tof.reshape(-1, 5, 8, 8)
    g[:] = g[:, [0, 1, 4, 3, 2], :, ::-1]


def _tilt_about_y(acc: np.ndarray, quat: np.ndarray, angle: float) -> None:
    """In place: the IMU signal of a device sitting tilted by ``angle`` about its own y axis (a loose or
    oddly placed strap; two real train subjects look like this, REAL_DATA_FACTS.md §2). Unlike the 180-degree
    turn this is no symmetry of the device: thm/ToF keep their places and only point elsewhere."""
    tilt = Rotation.from_rotvec([0.0, angle, 0.0])
    acc[:] = tilt.inv().apply(acc)
    r = Rotation.from_quat(quat[:, [1, 2, 3, 0]]) * tilt
    quat[:] = r.as_quat()[:, [3, 0, 1, 2]]


def _strap(acc: np.ndarray, quat: np.ndarray, rotvec: np.ndarray) -> None:
    """In place: the IMU signal of a device sitting on the wrist rotated by ``rotvec`` (device axes) from its
    nominal place: every wearer's strap sits a little differently (a few degrees about x and z, up to ~10
    about the forearm axis y)."""
    r0 = Rotation.from_rotvec(rotvec)
    acc[:] = r0.inv().apply(acc)
    quat[:] = (Rotation.from_quat(quat[:, [1, 2, 3, 0]]) * r0).as_quat()[:, [3, 0, 1, 2]]


def _rotate_about_z(acc: np.ndarray, quat: np.ndarray, thm: np.ndarray, tof: np.ndarray) -> None:
    """In place: the signal of a device worn turned 180 degrees about its own z axis.

    As in the real train set: acc_x and acc_y change sign, the quaternion gains a half
    turn about device z, thermopiles/ToF sensors 2<->4 and 3<->5 trade places and every
    ToF grid is turned 180 degrees. Applied to the recorded signal (like the mirror), so
    the sensor layout is taken to be symmetric under that turn, as the real device's is.
    """
    acc[:, :2] *= -1
    r = Rotation.from_quat(quat[:, [1, 2, 3, 0]]) * Rotation.from_rotvec([0.0, 0.0, np.pi])
    quat[:] = r.as_quat()[:, [3, 0, 1, 2]]
    thm[:] = thm[:, [0, 3, 4, 1, 2]]
    g = tof.reshape(-1, 5, 8, 8)
    g[:] = g[:, [0, 3, 4, 1, 2], ::-1, ::-1]


@dataclass
class _SubjectRows:
    seq_ids: list[str]
    seqs: list[_Seq]
    sensors: np.ndarray  # (N, 332) float32, NaN = missing


def _simulate_subject(subj: _Subject, seq_ids: list[str], imu_only: np.ndarray, rot_missing_p: float) -> _SubjectRows:
    rng = subj.rng
    style = _make_style(rng, subj.scale)
    # the real protocol: each (orientation, gesture) pair once per initial behaviour, 102 slots, each used once
    slots = [(o, g, b) for o, g in VALID_PAIRS for b in schema.BEHAVIORS[:REPEATS]]
    order = rng.permutation(len(slots))
    seqs = [_make_sequence(subj, style, *slots[i], rng) for i in order]
    N = sum(q.length for q in seqs)
    ambient = float(rng.uniform(23.5, 27.0))
    skin = float(rng.uniform(33.0, 35.5))
    thm_base = ambient + rng.uniform(0.8, 3.0, 5)  # the device warms up on the wrist

    kin = _kinematics(seqs, subj)
    acc = kin.acc + rng.normal(0, 0.08, (N, 3)) + rng.normal(0, 0.08, 3)  # white noise + bias
    r = Rotation.from_quat(kin.quat[:, [1, 2, 3, 0]]) * Rotation.from_rotvec(rng.normal(0, 0.004, (N, 3)))
    quat = r.as_quat()[:, [3, 0, 1, 2]]
    tof, thm = _proximity(seqs, kin, subj, rng, thm_base, skin)
    if any(subj.strap_rv):
        _strap(acc, quat, np.asarray(subj.strap_rv))
    if not subj.right_handed:
        _mirror(acc, quat, thm, tof)
    if subj.rotated_device:
        _rotate_about_z(acc, quat, thm, tof)
    if subj.tilt_y:
        _tilt_about_y(acc, quat, subj.tilt_y)
    quat[quat[:, 0] < 0] *= -1  # stored with w >= 0, as in the files
    acc = np.round(acc / ACC_QUANT) * ACC_QUANT
    quat = np.round(quat / ROT_QUANT) * ROT_QUANT

    sensors = np.empty((N, len(schema.SENSOR_COLS)), dtype=np.float32)
    sensors[:, 0:3] = acc
    sensors[:, 3:7] = quat
    sensors[:, 7:12] = thm
    sensors[:, 12:] = tof
    start = 0
    for i, q in enumerate(seqs):
        sl = slice(start, start + q.length)
        start += q.length
        if imu_only[i]:
            sensors[sl, 7:] = np.nan
            continue
        # One draw whenever p > 0, whatever p is: data sets that differ in p differ only in which rotations are gone.
        if rot_missing_p > 0 and rng.random() < rot_missing_p:
            sensors[sl, 3:7] = np.nan
        u = rng.random()
        if u < NO_TOF_P:
            sensors[sl, 12:] = np.nan
        elif u < NO_TOF_P + TOF5_MISSING_P:
            sensors[sl, 12 + 64 * 4 :] = np.nan
        for k, p in THM_MISSING_P.items():
            if rng.random() < p:
                sensors[sl, 7 + k] = np.nan
    return _SubjectRows(list(seq_ids), seqs, sensors)


@dataclass
class SynthDataset:
    train: pl.DataFrame  # exactly schema.TRAIN_COLUMNS
    test: pl.DataFrame  # exactly schema.TEST_COLUMNS
    train_demographics: pl.DataFrame  # schema.DEMOGRAPHIC_COLS
    test_demographics: pl.DataFrame
    test_solution: pl.DataFrame  # sequence_id, gesture
    # subjects wearing the device rotated 180 degrees about z, per split (truth Kaggle never gives)
    rotated_subjects: dict[str, list[str]] = field(default_factory=lambda: {"train": [], "test": []})
    # subjects wearing it tilted about device y (not upside down: a wear detector must leave them alone)
    tilted_subjects: dict[str, list[str]] = field(default_factory=lambda: {"train": [], "test": []})


_DEMO_SCHEMA = {
    "subject": pl.String,
    "adult_child": pl.Int64,
    "age": pl.Int64,
    "sex": pl.Int64,
    "handedness": pl.Int64,
    "height_cm": pl.Float64,
    "shoulder_to_wrist_cm": pl.Int64,
    "elbow_to_wrist_cm": pl.Float64,
}


def _frame_from_rows(parts: list[tuple[_Subject, _SubjectRows]], with_labels: bool) -> pl.DataFrame:
    seq_ids, subjects, gestures, orients, b1, nmove, nhold, ngest = [], [], [], [], [], [], [], []
    blocks = []
    for subj, rows in parts:
        for sid, q in zip(rows.seq_ids, rows.seqs):
            seq_ids.append(sid)
            subjects.append(subj.sid)
            gestures.append(q.gesture)
            orients.append(q.orientation)
            b1.append(q.behavior1)
            nmove.append(q.n_move)
            nhold.append(q.n_hold)
            ngest.append(q.n_gest)
        blocks.append(rows.sensors)
        rows.sensors = None  # type: ignore[assignment]  # free as soon as copied
    nm_a, nh_a, ng_a = (np.asarray(x, dtype=np.int64) for x in (nmove, nhold, ngest))
    lens = nm_a + nh_a + ng_a
    order = np.argsort(np.array(seq_ids), kind="stable")  # the files are sorted by sequence_id
    lens_o = lens[order]
    dst = np.zeros(len(lens), dtype=np.int64)
    dst[order] = np.concatenate([[0], np.cumsum(lens_o)[:-1]]) if len(order) else []
    # copy each sequence's block straight into its sorted place (one copy of the big array)
    sensors = np.empty((int(lens.sum()), len(schema.SENSOR_COLS)), dtype=np.float32)
    k = 0
    for block in blocks:
        src_off = 0
        while src_off < len(block):
            n = int(lens[k])
            sensors[dst[k] : dst[k] + n] = block[src_off : src_off + n]
            src_off += n
            k += 1
    blocks.clear()
    lens_o = lens[order]
    seq_rep = np.repeat(order, lens_o)
    counter = np.concatenate([np.arange(n) for n in lens_o]) if len(order) else np.zeros(0, np.int64)

    def rep(values: list[str]) -> pl.Series:
        return pl.Series(values, dtype=pl.String).gather(pl.Series(seq_rep, dtype=pl.UInt32))

    cols: dict[str, pl.Series] = {
        "sequence_id": rep(seq_ids),
        "sequence_counter": pl.Series(counter, dtype=pl.Int64),
        "subject": rep(subjects),
    }
    if with_labels:
        gest = rep(gestures)
        tgt = set(TARGET_GESTURES)
        cols["sequence_type"] = rep(["Target" if g in tgt else "Non-Target" for g in gestures])
        cols["orientation"] = rep(orients)
        cols["gesture"] = gest
        # behaviour/phase from the position inside the sequence
        nm = nm_a[seq_rep]
        nh = nh_a[seq_rep]
        b1_codes = np.array([0 if b == schema.BEHAVIORS[0] else 1 for b in b1], dtype=np.int64)[seq_rep]
        code = np.where(counter < nm, b1_codes, np.where(counter < nm + nh, 2, 3))
        cols["behavior"] = pl.Series(list(schema.BEHAVIORS)).gather(pl.Series(code, dtype=pl.UInt32))
        cols["phase"] = pl.Series(["Transition", "Gesture"]).gather(pl.Series((code == 3).astype(np.uint32)))
    df = pl.DataFrame(cols)
    df = df.with_columns(
        (pl.col("sequence_id") + "_" + pl.col("sequence_counter").cast(pl.String).str.zfill(6)).alias("row_id")
    )
    sens = pl.DataFrame([pl.Series(c, sensors[:, j], nan_to_null=True) for j, c in enumerate(schema.SENSOR_COLS)])
    del sensors
    df = pl.concat([df, sens], how="horizontal")
    return df.select(schema.TRAIN_COLUMNS if with_labels else schema.TEST_COLUMNS)


def generate(
    n_subjects: int = 81,
    seed: int = 0,
    n_test_subjects: int | None = None,
    test_imu_only_fraction: float = 0.5,
    n_rotated_test_subjects: int = 0,
    n_rotated_train_subjects: int | None = None,
    rot_missing_fraction: float = ROT_MISSING_P,
) -> SynthDataset:
    """Generate a train set of ``n_subjects`` and a test set of different subjects.

    ``n_rotated_train_subjects`` (default: 2 when there are at least 40 subjects, else 0)
    and ``n_rotated_test_subjects`` (default 0) wear the device rotated 180 degrees about z.
    ``rot_missing_fraction`` of the training sequences lose their rotation columns (real data: ~0.6 %).
    """
    if n_subjects < 1:
        raise ValueError("n_subjects must be >= 1")
    if not 0.0 <= test_imu_only_fraction <= 1.0:
        raise ValueError("test_imu_only_fraction must be in [0, 1]")
    if not 0.0 <= rot_missing_fraction <= 1.0:
        raise ValueError("rot_missing_fraction must be in [0, 1]")
    if set(GESTURE_SPECS) != set(GESTURES):  # the gesture vocabulary is the metric's; keep them in step
        raise RuntimeError("synth.GESTURE_SPECS does not cover metric.GESTURES")
    n_test = max(2, round(n_subjects * 0.25)) if n_test_subjects is None else int(n_test_subjects)
    if n_test < 0:
        raise ValueError("n_test_subjects must be >= 0")
    n_total = n_subjects + n_test
    root = np.random.SeedSequence(seed)
    g_ss, subj_ss = root.spawn(2)
    grng = np.random.default_rng(g_ss)
    per_subject = subj_ss.spawn(n_total)
    n_seq_each = len(VALID_PAIRS) * REPEATS

    subj_nums = grng.choice(70000, size=n_total, replace=False)
    seq_pool = max(100000, 2 * n_total * n_seq_each)
    seq_nums = grng.choice(seq_pool, size=n_total * n_seq_each, replace=False).reshape(n_total, n_seq_each)
    n_rot_train = (2 if n_subjects >= 40 else 0) if n_rotated_train_subjects is None else int(n_rotated_train_subjects)
    if not 0 <= n_rot_train <= n_subjects:
        raise ValueError(f"n_rotated_train_subjects must be in [0, {n_subjects}], got {n_rot_train}")
    if not 0 <= n_rotated_test_subjects <= n_test:
        raise ValueError(
            f"n_rotated_test_subjects must be in [0, {n_test}] (the test subjects), got {n_rotated_test_subjects}"
        )
    rotated = set(grng.choice(n_subjects, size=n_rot_train, replace=False).tolist()) if n_rot_train else set()
    n_test_seq = n_test * n_seq_each
    imu_flat = np.zeros(n_test_seq, dtype=bool)
    imu_flat[grng.choice(n_test_seq, size=int(round(test_imu_only_fraction * n_test_seq)), replace=False)] = True
    imu_flags = imu_flat.reshape(n_test, n_seq_each) if n_test else np.zeros((0, n_seq_each), bool)
    # a few wearers with the device tilted about its y axis (about 2 in 81, as in the real train set): they
    # are not upside down, and a wear detector must not take them for it
    n_tilted = round(TILTED_SHARE * n_total)
    normal = np.array(sorted(set(range(n_total)) - rotated), dtype=np.int64)
    tilted = set(grng.choice(normal, size=min(n_tilted, normal.size), replace=False).tolist()) if n_tilted else set()
    if n_rotated_test_subjects:  # drawn last: the rest of the data set is the same as without them
        rotated |= set((n_subjects + grng.choice(n_test, size=n_rotated_test_subjects, replace=False)).tolist())

    subjects: list[_Subject] = []
    demos: list[dict] = []
    for i in range(n_total):
        rng = np.random.default_rng(per_subject[i])
        sid = f"SUBJ_{int(subj_nums[i]):06d}"
        d = _demographics(rng, sid)
        demos.append(d)
        subj = _Subject(
            sid,
            d["adult_child"],
            d["age"],
            d["sex"],
            bool(d["handedness"]),
            d["height_cm"],
            d["shoulder_to_wrist_cm"],
            d["elbow_to_wrist_cm"],
            i in rotated,
            rng,
        )
        subj.scale = subj.height / 170.0
        subj.arm = subj.shoulder_to_wrist / 52.0
        subj.speed = float(np.exp(rng.normal(0, 0.15)))
        subj.strap_rv = tuple(float(v) for v in rng.normal(0.0, np.deg2rad([4.0, 10.0, 4.0])))
        if i in tilted:
            subj.tilt_y = float(np.deg2rad(rng.uniform(20.0, 40.0)) * rng.choice([-1.0, 1.0]))
        subjects.append(subj)

    train_parts, test_parts = [], []
    for i, subj in enumerate(subjects):
        ids = [f"SEQ_{int(x):06d}" for x in seq_nums[i]]
        if i < n_subjects:
            rows = _simulate_subject(subj, ids, np.zeros(n_seq_each, bool), rot_missing_fraction)
            train_parts.append((subj, rows))
        else:
            rows = _simulate_subject(subj, ids, imu_flags[i - n_subjects], 0.0)
            test_parts.append((subj, rows))

    train = _frame_from_rows(train_parts, with_labels=True)
    test = _frame_from_rows(test_parts, with_labels=False)
    sol = sorted((sid, q.gesture) for _, rows in test_parts for sid, q in zip(rows.seq_ids, rows.seqs))
    test_solution = pl.DataFrame(
        {"sequence_id": [a for a, _ in sol], "gesture": [b for _, b in sol]},
        schema={"sequence_id": pl.String, "gesture": pl.String},
    )
    tr_demo = pl.DataFrame(demos[:n_subjects], schema=_DEMO_SCHEMA).select(schema.DEMOGRAPHIC_COLS).sort("subject")
    te_demo = pl.DataFrame(demos[n_subjects:], schema=_DEMO_SCHEMA).select(schema.DEMOGRAPHIC_COLS).sort("subject")
    rot = {
        "train": sorted(s.sid for i, s in enumerate(subjects) if s.rotated_device and i < n_subjects),
        "test": sorted(s.sid for i, s in enumerate(subjects) if s.rotated_device and i >= n_subjects),
    }
    tilted_ids = {
        "train": sorted(s.sid for i, s in enumerate(subjects) if s.tilt_y and i < n_subjects),
        "test": sorted(s.sid for i, s in enumerate(subjects) if s.tilt_y and i >= n_subjects),
    }
    return SynthDataset(train, test, tr_demo, te_demo, test_solution, rot, tilted_ids)


def write_dataset(
    out_dir: str | os.PathLike,
    n_subjects: int = 81,
    seed: int = 0,
    n_test_subjects: int | None = None,
    test_imu_only_fraction: float = 0.5,
    n_rotated_test_subjects: int = 0,
    n_rotated_train_subjects: int | None = None,
    rot_missing_fraction: float = ROT_MISSING_P,
) -> dict[str, Path]:
    """Generate and write the five CSV files atomically; returns their paths by stem."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = generate(
        n_subjects,
        seed,
        n_test_subjects,
        test_imu_only_fraction,
        n_rotated_test_subjects,
        n_rotated_train_subjects,
        rot_missing_fraction,
    )
    frames = {
        "train": ds.train,
        "test": ds.test,
        "train_demographics": ds.train_demographics,
        "test_demographics": ds.test_demographics,
        "test_solution": ds.test_solution,
    }
    paths: dict[str, Path] = {}
    for name, df in frames.items():
        final = out / f"{name}.csv"
        tmp = out / f".{name}.csv.tmp-{os.getpid()}"
        if name in ("train", "test"):
            # float32 prints its shortest repr (6.6835938); float64 keeps the 1/256 and 2^-14 grids exact
            df = df.with_columns(pl.col(list(schema.IMU_COLS + schema.THM_COLS)).cast(pl.Float64))
        try:
            df.write_csv(tmp)
            os.replace(tmp, final)  # readers never see a half-written file
        finally:
            if tmp.exists():
                tmp.unlink()
        paths[name] = final
    # which subjects wear the device rotated: the truth for scoring the detector, like test_solution.csv
    info = out / "synth_info.json"
    tmp = out / f".synth_info.json.tmp-{os.getpid()}"
    tmp.write_text(
        json.dumps(
            {
                "rotated_subjects": ds.rotated_subjects,
                "tilted_subjects": ds.tilted_subjects,
                "n_subjects": n_subjects,
                "seed": seed,
            },
            indent=2,
        )
    )
    os.replace(tmp, info)
    paths["synth_info"] = info
    return paths
