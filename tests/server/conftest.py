"""One zoo server for the whole session (start-up takes seconds); tests that need their own
configuration start their own with `start_server`."""

from __future__ import annotations

import pytest

from serverproc import ServerProcess, start_server


@pytest.fixture(scope="session")
def zoo_server() -> ServerProcess:
    server = start_server("--sequence-idle-timeout", "30")
    yield server
    server.stop()
