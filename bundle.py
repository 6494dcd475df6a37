"""Self-describing bundle metadata: what a trained member needs to be loaded and checked.

A bundle is a directory of data (weights in the framework's own safe format,
never pickle) plus ``metadata.json``. Loading compares the metadata with what
the running code produces and raises ``BundleError`` naming what differs.

The seal: ``metadata.json``'s ``files`` lists every model file with its size and
sha256. A bundle without it is refused; every listed name is a plain file name
inside the bundle folder (no path, no ``..``, no symlink). Loaders get a model
file's path only from ``sealed_file``, which checks the name is sealed and the
file's digest right before any parser sees it (a truncated LightGBM file would
otherwise abort the interpreter). Malformed metadata (a missing key, a wrong
type) is a ``BundleError`` naming the field (``field``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import platform
import re
import time
from collections.abc import Callable, Mapping
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


_REQUIRED: Any = object()
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _field_name(keys: tuple[str | int, ...]) -> str:
    out = ""
    for k in keys:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def _kind_ok(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, float):
        return float in kinds and math.isfinite(value)
    if isinstance(value, int):
        return int in kinds or float in kinds
    return isinstance(value, kinds)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a finite number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def field(
    meta: Any,
    key: str | int | tuple[str | int, ...],
    kind: type | tuple[type, ...],
    where: str | Path,
    default: Any = _REQUIRED,
    items: type | tuple[type, ...] | None = None,
) -> Any:
    """``meta[key]`` (``key`` a tuple: a path of object keys / list indices), checked to be a ``kind``.

    ``items``: the kind of every element of a list (or value of an object). Missing (without ``default``) or of
    the wrong kind: a ``BundleError`` naming the file ``where`` and the field. Numbers are never booleans; a
    float is finite.
    """
    keys = key if isinstance(key, tuple) else (key,)
    node = meta
    for i, k in enumerate(keys):
        parent = _field_name(keys[:i]) or "the metadata"
        if isinstance(k, int):
            if not isinstance(node, list):
                raise BundleError(f"{where}: field {parent} is {type(node).__name__}, expected a list")
            if not -len(node) <= k < len(node):
                raise BundleError(f"{where}: field {_field_name(keys[: i + 1])} is missing (list of {len(node)})")
        else:
            if not isinstance(node, Mapping):
                raise BundleError(f"{where}: field {parent} is {type(node).__name__}, expected an object")
            if k not in node:
                if default is not _REQUIRED:
                    return default
                raise BundleError(f"{where}: field {_field_name(keys[: i + 1])} is missing")
        node = node[k]
    name = _field_name(keys)
    if not _kind_ok(node, kind):
        raise BundleError(f"{where}: field {name} is {_short(node)}, expected {_kind_name(kind)}")
    if items is not None:
        values = node.items() if isinstance(node, Mapping) else enumerate(node)
        for k, v in values:
            if not _kind_ok(v, items):
                raise BundleError(f"{where}: field {name}[{k!r}] is {_short(v)}, expected {_kind_name(items)}")
    return node


def parse_field(where: str | Path, name: str, parse: Callable[[Any], Any], value: Any) -> Any:
    """``parse(value)``; its KeyError/TypeError/ValueError as a ``BundleError`` naming the file and field."""
    try:
        return parse(value)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"{where}: field {name} cannot be read ({type(e).__name__}: {e})") from None


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_member_name(bundle_dir: Path, name: Any, where: str | Path) -> Path:
    """``bundle_dir / name`` for a sealed name: a plain file name (no path, ``..``, symlink) inside the bundle."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{where}: sealed file name {_short(name)} is not a file name")
    if name in (".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute():
        raise BundleError(
            f"{where}: sealed file name {name!r} is not a plain file name inside the bundle "
            "(absolute paths, folders and '..' are refused)"
        )
    path = bundle_dir / name
    if path.is_symlink():
        raise BundleError(f"{path}: a symbolic link (to {path.readlink()}); a bundle's files must be its own")
    if path.exists() and path.resolve().parent != bundle_dir.resolve():
        raise BundleError(f"{path}: resolves outside the bundle folder {bundle_dir}")
    return path


def sealed_digests(bundle_dir: Path, meta: Any, where: str | Path) -> dict[str, dict[str, Any]]:
    """``meta["files"]`` checked: a non-empty object of plain names -> {size, sha256}; else a ``BundleError``."""
    files = meta.get("files") if isinstance(meta, Mapping) else None
    if not files:
        raise BundleError(
            f"{where}: field files is missing or empty: the bundle carries no file digests (it is not sealed) "
            "and is refused; retrain it (this code seals every model file it writes)"
        )
    field(meta, "files", dict, where, items=dict)
    for name, d in files.items():
        check_member_name(bundle_dir, name, where)
        size = field(meta, ("files", name, "size"), int, where)
        sha = field(meta, ("files", name, "sha256"), str, where)
        if size < 0 or not _SHA256.fullmatch(sha):
            raise BundleError(f"{where}: field files.{name} is not a size and sha256 digest: {d!r}")
    return files


def sealed_file(bundle_dir: str | Path, meta: Mapping[str, Any], name: Any) -> Path:
    """The path of model file ``name`` of the bundle, for a loader to open: the one way loaders get one.

    Raises ``BundleError`` unless ``name`` is listed in ``meta["files"]``, is a plain file inside the bundle (no
    symlink) and its size and sha256 match, checked now, right before the caller's parser sees the file.
    """
    bundle_dir = Path(bundle_dir)
    where = bundle_dir / METADATA_FILE
    files = sealed_digests(bundle_dir, meta, where)
    path = check_member_name(bundle_dir, name, where)
    if name not in files:
        raise BundleError(f"{path}: not sealed in {where} (not listed in its files); a loader opens only sealed files")
    if not path.is_file():
        raise BundleError(f"{path} is missing (sealed in {where})")
    _check_digest(path, files[name])
    return path


def _check_digest(path: Path, expected: Mapping[str, Any]) -> None:
    size = path.stat().st_size
    if size != expected.get("size"):  # no need to read a file of the wrong size
        raise BundleError(
            f"{path} is corrupt or truncated (size {size}, expected {expected.get('size')}; sha256 differs)"
        )
    if file_digest(path)["sha256"] != expected.get("sha256"):
        raise BundleError(f"{path} is corrupt or truncated (size {size} as sealed, but its sha256 differs)")


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
    i = next((i for i, (a, b) in enumerate(zip(found, expected)) if a != b), None)
    if i is None:  # equal as lists: the stored value was of another type
        return f"{name}: bundle holds {_short(found)}, not the list the code expects"
    return f"{name}: first difference at position {i}: bundle {found[i]!r} vs code {expected[i]!r}"


def read_metadata(
    bundle_dir: str | Path,
    member: str,
    feature_names: list[str] | tuple[str, ...] | None = None,
    required_files: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Read ``metadata.json`` and check it against the running code; raise BundleError naming any difference.

    Also checks the seal: ``files`` present and non-empty, every name plain and inside the bundle, every
    ``required_files`` name sealed, every sealed file present with its size and sha256.
    """
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
    classes = field(meta, "classes", list, path)
    if classes != list(GESTURES):
        problems.append(diff_list("classes", list(classes), list(GESTURES)))
    names = field(meta, "feature_names", list, path)
    if feature_names is not None and names != list(feature_names):
        problems.append(diff_list("feature_names", list(names), list(feature_names)))
    if problems:  # the code and the bundle disagree: say so before looking at its files
        raise BundleError(f"{member} bundle {path} does not match the code: " + "; ".join(problems))
    sealed = sealed_digests(bundle_dir, meta, path)
    for name in required_files:
        check_member_name(bundle_dir, name, path)
        if name not in sealed:
            problems.append(f"{bundle_dir / name} is not sealed (not listed in files)")
    missing = [f for f in (*required_files, *sealed) if not (bundle_dir / f).is_file()]
    problems += [f"{bundle_dir / f} is missing" for f in dict.fromkeys(missing)]
    for name, expected in sealed.items():
        path_f = bundle_dir / name
        if path_f.is_file():
            try:
                _check_digest(path_f, expected)
            except BundleError as e:
                problems.append(str(e))
    if problems:
        raise BundleError(f"{member} bundle {path} does not match the code: " + "; ".join(problems))
    return meta
