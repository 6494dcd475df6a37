"""The ensemble files as one sealed set, bound to the bundles they were fitted with.

Training writes ``ensemble/weights.json`` (the blend), ``protocol.json`` and
``orientation_model.txt`` (subject post-processing) and ``wear.json`` (the wear
detector), each atomically; at the very end of ``main.stage_train`` it writes
``ensemble/manifest.json`` (atomically, last): every one of those files present
with its size and sha256, and per blended member the identity of its bundle
(sha256 of ``bundles/<m>/metadata.json``, its fingerprint and creation time),
with a ``run_id`` over them.

Serving reads each file only through ``read_sealed``: the bytes a parser gets
are the bytes whose digest matched (a truncated ``orientation_model.txt`` would
crash LightGBM's parser). ``check_bundles`` compares the loaded bundles with the
manifest. Every failure is an ``EnsembleSealError`` (a ``bundle.BundleError``)
naming the file and the problem: damaged (digest), unsealed (no manifest, or not
listed in it), or fitted with other bundles (the member named). A file that is
absent is not an error here: it means "not fitted" and the caller uses its
defaults. Imports only ``bundle`` and ``io_utils``: training and serving both use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import bundle
from io_utils import write_json

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
# The files of the set (wear.WEAR_FILE, subject_pp.PROTOCOL_FILE / ORIENTATION_MODEL_FILE; a test keeps them equal).
FILES = ("weights.json", "protocol.json", "orientation_model.txt", "wear.json")
RESEAL_HINT = (
    "re-run `python main.py train --out DIR` on the output folder that holds these bundles (trained members are "
    "skipped; the ensemble files are refitted and sealed), or upload that run's ensemble/ folder with its bundles/"
)

log = logging.getLogger(__name__)


class EnsembleSealError(bundle.BundleError):
    """An ensemble file that is damaged, unsealed, or belongs to other bundles."""


def bundle_identity(bundle_dir: str | Path) -> dict[str, Any]:
    """What an ensemble set was fitted with: sha256 of the bundle's metadata.json, its fingerprint and creation."""
    path = Path(bundle_dir) / bundle.METADATA_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {"metadata_sha256": None, "fingerprint": None, "created": None}
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    meta = meta if isinstance(meta, dict) else {}
    return {
        "metadata_sha256": hashlib.sha256(raw).hexdigest(),
        "fingerprint": meta.get("fingerprint"),
        "created": meta.get("created"),
    }


def write_manifest(ensemble_dir: str | Path, bundle_dirs: Mapping[str, str | Path]) -> dict[str, Any]:
    """Seal the ensemble files present in ``ensemble_dir`` and bind them to ``bundle_dirs`` (member -> bundle).

    Call it after every ensemble file is written: the manifest is the last write of a training run.
    """
    ens = Path(ensemble_dir)
    ens.mkdir(parents=True, exist_ok=True)
    files = {name: bundle.file_digest(ens / name) for name in FILES if (ens / name).is_file()}
    bundles = {str(m): bundle_identity(d) for m, d in bundle_dirs.items()}
    for m, ident in bundles.items():
        if ident["metadata_sha256"] is None:
            log.warning("ensemble manifest: member %s has no bundle at %s", m, bundle_dirs[m])
    run_id = hashlib.sha256(json.dumps(bundles, sort_keys=True).encode()).hexdigest()[:16]
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_id": run_id,
        "files": files,
        "bundles": bundles,
    }
    write_json(ens / MANIFEST_FILE, manifest)
    log.info(
        "ensemble set sealed in %s: %s (run %s, bundles %s)",
        ens / MANIFEST_FILE,
        sorted(files),
        run_id,
        sorted(bundles),
    )
    return manifest


def read_manifest(ensemble_dir: str | Path) -> dict[str, Any]:
    """The checked manifest of ``ensemble_dir``; ``EnsembleSealError`` when absent or malformed (field named)."""
    path = Path(ensemble_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise EnsembleSealError(
            f"{path} is missing: the ensemble set in {Path(ensemble_dir)} is not sealed (written by older code, or "
            f"its training run did not finish); {RESEAL_HINT}"
        ) from None
    except ValueError as e:
        raise EnsembleSealError(f"{path}: corrupt JSON ({e}); {RESEAL_HINT}") from None
    try:
        if not isinstance(manifest, dict):
            raise bundle.BundleError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise bundle.BundleError(
                f"{path}: field format_version is {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}"
            )
        bundle.field(manifest, "files", dict, path, items=dict)
        for name in manifest["files"]:
            bundle.field(manifest, ("files", name, "size"), int, path)
            bundle.field(manifest, ("files", name, "sha256"), str, path)
        bundle.field(manifest, "bundles", dict, path, items=dict)
        for m in manifest["bundles"]:
            bundle.field(manifest, ("bundles", m, "metadata_sha256"), (str, type(None)), path)
    except bundle.BundleError as e:
        raise EnsembleSealError(str(e)) from None
    return manifest


def read_sealed(ensemble_dir: str | Path, name: str) -> bytes | None:
    """The bytes of ensemble file ``name`` after its digest matched the manifest; None when the file is absent.

    Raises ``EnsembleSealError`` for a present file without a manifest, not listed in it, or damaged.
    """
    path = Path(ensemble_dir) / name
    if not path.exists():
        return None
    manifest = read_manifest(ensemble_dir)
    where = Path(ensemble_dir) / MANIFEST_FILE
    expected = manifest["files"].get(name)
    if expected is None:
        raise EnsembleSealError(
            f"{path} is not sealed: {where} does not list it (it was not written with this ensemble set); "
            f"{RESEAL_HINT}, or delete the file"
        )
    size = path.stat().st_size
    if size != expected["size"]:  # never read a file of the wrong size
        raise EnsembleSealError(
            f"{path} is damaged: size {size}, sealed in {where} with size {expected['size']} "
            f"(truncated, or rewritten after the manifest); {RESEAL_HINT}"
        )
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected["sha256"] or len(data) != expected["size"]:
        raise EnsembleSealError(f"{path} is damaged: its sha256 differs from the one sealed in {where}; {RESEAL_HINT}")
    return data


def parse_json(data: bytes, path: str | Path) -> Any:
    """JSON of a sealed file's bytes (``EnsembleSealError`` naming ``path`` when it does not parse)."""
    try:
        return json.loads(data)
    except ValueError as e:
        raise EnsembleSealError(f"{path}: corrupt JSON ({e})") from None


def check_bundles(ensemble_dir: str | Path, bundle_dirs: Mapping[str, str | Path]) -> dict[str, Any] | None:
    """Check that the loaded bundles (member -> folder) are the ones the ensemble set was fitted with.

    Returns the manifest (None when ``ensemble_dir`` has none: then there is nothing to bind, and each
    present ensemble file is refused by ``read_sealed``). A member whose bundle differs: ``EnsembleSealError``
    naming it. A loaded member the set was fitted without is logged (it has no fitted weight).
    """
    if not (Path(ensemble_dir) / MANIFEST_FILE).exists():
        return None
    manifest = read_manifest(ensemble_dir)
    where = Path(ensemble_dir) / MANIFEST_FILE
    problems = []
    for m, d in bundle_dirs.items():
        fitted = manifest["bundles"].get(m)
        if fitted is None:
            log.warning(
                "member %s: the ensemble set in %s was fitted without it (run %s)", m, where, manifest.get("run_id")
            )
            continue
        now = bundle_identity(d)
        if now["metadata_sha256"] == fitted.get("metadata_sha256"):
            continue
        if now["fingerprint"] != fitted.get("fingerprint"):
            why = "trained on other data or settings"
            why += f" (fingerprint {now['fingerprint']}, the set's {fitted.get('fingerprint')})"
        else:
            why = "another training run of the same data and settings"
            why += f" (created {now['created']}, the set's {fitted.get('created')})"
        problems.append(f"member {m}: the bundle at {d} is not the one the set was fitted with: {why}")
    if problems:
        raise EnsembleSealError(
            f"the ensemble files in {Path(ensemble_dir)} belong to other bundles (sealed in {where}, run "
            f"{manifest.get('run_id')}): " + "; ".join(problems) + f"; {RESEAL_HINT}"
        )
    return manifest


__all__ = [
    "FILES",
    "MANIFEST_FILE",
    "EnsembleSealError",
    "bundle_identity",
    "check_bundles",
    "parse_json",
    "read_manifest",
    "read_sealed",
    "write_manifest",
]
