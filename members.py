"""The member registry: the one place that lists the members, in blend order.

A new member is one new ``*_pipeline.py`` (a ``member_base.MemberPipeline``
subclass) plus one line in ``REGISTRY`` (and its config section in config.py).
Every other module (``main.py``, ``tools/benchmarks.py``, ``tools/notebook_export.py``, the
Predictor, the tests) asks this module. Importing it imports no member: a
pipeline module is imported when its member is first asked for.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scaffold pulls in numpy/features; the registry itself stays light
    from member_base import MemberPipeline

log = logging.getLogger(__name__)

# name -> "module:class". The name is also the member's config section (config.Config.<name>).
REGISTRY: dict[str, str] = {
    "lgbm": "lgbm_pipeline:LGBMPipeline",
    "torch": "torch_pipeline:TorchPipeline",
    "keras": "keras_pipeline:KerasPipeline",
    "branchnet": "branchnet_pipeline:BranchNetPipeline",
}


class UnknownMemberError(ValueError):
    pass


def names() -> list[str]:
    """Every registered member, in blend order."""
    return list(REGISTRY)


def module_name(name: str) -> str:
    check(name)
    return REGISTRY[name].split(":")[0]


def check(names_: str | Iterable[str]) -> None:
    wanted = [names_] if isinstance(names_, str) else list(names_)
    unknown = [m for m in wanted if m not in REGISTRY]
    if unknown:
        raise UnknownMemberError(f"unknown member(s) {unknown}; known: {', '.join(REGISTRY)}")


def get(name: str) -> MemberPipeline:
    """The member's pipeline object (imports its module: an ImportError says what is missing)."""
    check(name)
    module, cls = REGISTRY[name].split(":")
    pipeline = getattr(importlib.import_module(module), cls)()
    if pipeline.name != name:
        raise UnknownMemberError(f"{REGISTRY[name]} says its name is {pipeline.name!r}, registered as {name!r}")
    return pipeline


def importable(names_: Iterable[str] | None = None) -> list[MemberPipeline]:
    """Pipelines of ``names_`` (default: all) whose module imports; the others are logged and left out."""
    out = []
    for name in names() if names_ is None else list(names_):
        try:
            out.append(get(name))
        except ImportError as e:  # e.g. torch absent from a slim environment
            log.warning("member %s cannot be imported: %s", name, e)
    return out
