"""What the torch members share: device choice, AMP context, seeding, state-dict and version hygiene.

Kept apart from the pipelines so that no pipeline imports another (tests/test_main.py).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import threads
from config import Config

log = logging.getLogger(__name__)


def is_available() -> tuple[bool, str]:
    """torch is imported at module top, so reaching this means it is installed."""
    return True, f"torch {torch.__version__}"


def select_device(cfg: Config) -> torch.device:
    """CUDA when available, else CPU with ``cfg.run.n_threads`` intra-op threads."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(threads.n_threads(cfg))
    return torch.device("cpu")


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """float16 autocast on CUDA when enabled; a no-op context otherwise (AMP is never used on CPU)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that nn.DataParallel / DDP add, so bundles load into a bare model."""
    prefix = "module."
    return OrderedDict((k[len(prefix) :] if k.startswith(prefix) else k, v) for k, v in state_dict.items())


def warn_if_other_torch(member: str, bundle_dir: Path, meta: Mapping[str, Any]) -> None:
    """A bundle written by another torch version usually loads; say so, since numerics may differ."""
    if meta.get("torch_version") != torch.__version__:
        log.warning(
            "%s bundle %s was written by torch %s, running torch %s",
            member,
            bundle_dir,
            meta.get("torch_version"),
            torch.__version__,
        )
