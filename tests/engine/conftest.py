"""Fixtures for the engine tests: small models (built once per session) and a clock the tests drive."""

from __future__ import annotations

import pytest

from helpers_engine import FakeClock, Models


@pytest.fixture(scope="session")
def models() -> Models:
    return Models()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
