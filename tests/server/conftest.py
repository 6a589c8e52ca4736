"""One zoo server for the whole session (start-up takes seconds); tests that need their own
configuration start their own with `start_server`, or, for a module's shared server, declare it
with `serverproc.early_server` and take it with `take_server`.

Once collection shows which declared servers the selected tests use, the session starts them
in the background, one after another in the order their first tests run (serverproc.py):
their start-up then overlaps the tests that run before them."""

from __future__ import annotations

import pytest

from serverproc import ServerProcess, declared_for, early_server, launch_declared, stop_untaken, take_server

ZOO = early_server(__name__, "zoo_server", "--sequence-idle-timeout", "30")


def pytest_collection_finish(session) -> None:
    keys: list[str] = []
    for item in session.items:
        fixtures = getattr(item, "fixturenames", ())
        found = declared_for(getattr(item.module, "__name__", ""), fixtures) if hasattr(item, "module") else []
        if "zoo_server" in fixtures:
            found.append(ZOO)
        keys += [k for k in found if k not in keys]
    if keys:
        launch_declared(keys)


def pytest_sessionfinish(session) -> None:
    stop_untaken()


@pytest.fixture(scope="session")
def zoo_server() -> ServerProcess:
    server = take_server(ZOO)
    yield server
    server.stop()
