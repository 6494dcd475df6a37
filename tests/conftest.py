"""Test-wide settings: STRICT=1 so a member failing inside the Predictor raises instead of being skipped."""

import os


def pytest_configure(config):
    os.environ.setdefault("STRICT", "1")
