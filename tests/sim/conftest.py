"""Fixtures for the simulator tests: the engine tests' small models (built once per session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "engine"))

from helpers_engine import Models  # noqa: E402


@pytest.fixture(scope="session")
def models() -> Models:
    return Models()
