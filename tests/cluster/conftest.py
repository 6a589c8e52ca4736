"""Fixtures for the cluster tests: a small workload of the committed measured profiles."""

from __future__ import annotations

import pytest

from cellserve.cluster.workload import ClusterSession, load_catalogue

TINY_SESSIONS = (
    ClusterSession("gru-256", "gru-256", 50.0, 4.0),
    ClusterSession("gru-256-slo200", "gru-256", 200.0, 1.0),
    ClusterSession("lstm-512", "lstm-512", 100.0, 2.0),
)


@pytest.fixture(scope="session")
def tiny():
    """Three sessions (two of one model under different SLOs) of two zoo models."""
    return load_catalogue(TINY_SESSIONS)
