"""Self-describing bundle metadata: what a trained member needs to be loaded and checked.

A bundle is a directory of data (weights in the framework's own safe format,
never pickle) plus ``metadata.json``. Loading compares the metadata with what
the running code produces and raises ``BundleError`` naming what differs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import time
from pathlib import Path
from typing import Any

from io_utils import read_json, write_json
from metric import GESTURES

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"


class BundleError(RuntimeError):
    """A bundle that is missing, corrupt, or does not match the running code."""


def library_versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("numpy", "polars", "scikit-learn", *packages):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def bundle_metadata(
    member: str,
    feature_names: list[str] | tuple[str, ...],
    folds_hash: str,
    extra: dict[str, Any] | None = None,
    packages: tuple[str, ...] = (),
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "member": member,
        "format_version": FORMAT_VERSION,
        "classes": list(GESTURES),
        "feature_names": list(feature_names),
        "folds_hash": folds_hash,
        "versions": library_versions(*packages),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta.update(extra or {})
    return meta


_UNSEALED = {METADATA_FILE, "config.json"}


def file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def write_metadata(bundle_dir: str | Path, meta: dict[str, Any]) -> None:
    """Write metadata.json, sealing every model file already in the bundle with its size and sha256.

    A truncated model file can crash a framework's parser outright (LightGBM
    does), so files are checked against their digests before any parser sees them.
    """
    bundle_dir = Path(bundle_dir)
    files = {
        p.name: file_digest(p)
        for p in sorted(bundle_dir.iterdir())
        if p.is_file() and p.name not in _UNSEALED and not p.name.startswith(".")
    }
    write_json(bundle_dir / METADATA_FILE, {**meta, "files": files})


def diff_list(name: str, found: list[str], expected: list[str]) -> str:
    if len(found) != len(expected):
        extra = [x for x in found if x not in expected][:3]
        lacking = [x for x in expected if x not in found][:3]
        return (
            f"{name}: bundle has {len(found)}, code expects {len(expected)}"
            f" (only in bundle: {extra}; only in code: {lacking})"
        )
    i = next(i for i, (a, b) in enumerate(zip(found, expected)) if a != b)
    return f"{name}: first difference at position {i}: bundle {found[i]!r} vs code {expected[i]!r}"


def read_metadata(
    bundle_dir: str | Path,
    member: str,
    feature_names: list[str] | tuple[str, ...] | None = None,
    required_files: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Read ``metadata.json`` and check it against the running code; raise BundleError naming any difference."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / METADATA_FILE
    if not bundle_dir.is_dir():
        raise BundleError(f"{member} bundle not found: {bundle_dir} is not a directory")
    try:
        meta = read_json(path)
    except (FileNotFoundError, ValueError) as e:
        raise BundleError(f"{member} bundle at {bundle_dir}: {e}") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: expected a JSON object")
    problems = []
    if meta.get("member") != member:
        problems.append(f"member: bundle is {meta.get('member')!r}, expected {member!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version: bundle {meta.get('format_version')!r} vs code {FORMAT_VERSION}")
    classes = meta.get("classes")
    if classes != list(GESTURES):
        problems.append(diff_list("classes", list(classes or []), list(GESTURES)))
    if feature_names is not None and meta.get("feature_names") != list(feature_names):
        problems.append(diff_list("feature_names", list(meta.get("feature_names") or []), list(feature_names)))
    sealed = meta.get("files") or {}
    missing = [f for f in (*required_files, *sealed) if not (bundle_dir / f).is_file()]
    problems += [f"{bundle_dir / f} is missing" for f in dict.fromkeys(missing)]
    for name, expected in sealed.items():
        path_f = bundle_dir / name
        if path_f.is_file() and file_digest(path_f) != expected:
            problems.append(
                f"{path_f} is corrupt or truncated (size {path_f.stat().st_size}, "
                f"expected {expected.get('size')}; sha256 differs)"
            )
    if problems:
        raise BundleError(f"{member} bundle {path} does not match the code: " + "; ".join(problems))
    return meta
