"""Atomic writes (a reader never sees a half-written file) and one writer per output folder. Imports nothing of ours."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"  # <out>/.lock: held (flock) by the one process writing the folder


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        tmp_path.chmod(0o644)  # mkstemp makes it private; outputs and bundles are meant to be shared
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing file: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt JSON in {path}: {e}") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)


def read_npy(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"corrupt or truncated array file {path}: {e}") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it in whole (the old one is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- one writer per folder


class OutputLockError(RuntimeError):
    """Another process holds the lock of an output folder; the message names it and the folder."""


def _holder_text(raw: bytes) -> str:
    """What a lock file says about its holder, for the error message."""
    try:
        h = json.loads(raw.decode())
        return f"pid {h['pid']} on {h['host']}, running {h['command']!r} since {h['started']}"
    except (ValueError, KeyError, TypeError):  # the holder has just taken the lock and not written it yet
        return "a process that has not yet written its details"


@contextlib.contextmanager
def output_lock(folder: str | Path, command: str | None = None) -> Iterator[dict[str, Any]]:
    """Hold ``<folder>/.lock`` (an OS file lock, ``fcntl.flock``) for the duration; yields what it records.

    Non-blocking: while another process holds it, this raises ``OutputLockError`` naming that process (pid,
    host, command, since when) and the folder. The file records the holder's pid, host, command and start
    time; it is emptied on release and left in place. The kernel releases the lock of a process that dies,
    however it dies, so a killed run never leaves the folder locked. flock locks belong to an open file
    description: a second ``output_lock`` on the same folder in the same process fails too (no nesting).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    try:
        import fcntl
    except ImportError:  # not a POSIX system: documented in the README, logged, not silent
        log.warning("no fcntl on this system: %s is not locked against a second writer", folder)
        yield {}
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.pread(fd, 65536, 0))
            os.close(fd)
            raise OutputLockError(
                f"output folder {folder} is in use by another writer: {holder} (lock file {path}). "
                "Wait for it to finish or stop it, or give this run another --out"
            ) from None
        try:  # the file locked must still be the one at ``path`` (not one removed since it was opened)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command if command is not None else " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield info
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # an empty lock file: nobody's details linger
        os.close(fd)  # releases the lock


def is_stale_temporary(name: str) -> bool:
    """A name ``atomic_path`` / ``atomic_dir`` give their temporaries: ``.<name>.XXXX.tmp`` or ``.<name>.old``."""
    return name.startswith(".") and name.endswith((".tmp", ".old"))


def remove_stale_temporaries(roots: Iterable[str | Path]) -> list[Path]:
    """Remove what killed writers left under ``roots`` (recursively): ``.*.tmp`` / ``.*.old`` files and folders.

    Only safe while holding the folder's ``output_lock``: a live writer's temporaries look the same. Symbolic
    links are removed, never followed. Returns what was removed.
    """
    removed: list[Path] = []
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for here, dirs, files in os.walk(root):
            for name in [d for d in dirs if is_stale_temporary(d)]:
                dirs.remove(name)  # not descended into: removed whole
                p = Path(here) / name
                if p.is_symlink():
                    p.unlink()
                else:
                    shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            for name in files:
                if is_stale_temporary(name):
                    p = Path(here) / name
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                    removed.append(p)
    return removed


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
