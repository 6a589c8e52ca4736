"""`cellserve serve` pins its kernel threads one per core once it serves (with a thread per
core, the default), and leaves every thread free with --no-pin-threads (on a real server
process)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tritonclient.http as httpclient

from serverproc import start_server

pytestmark = pytest.mark.slow  # each test starts its own server

CORES = len(os.sched_getaffinity(0))


def single_core_threads(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task") if len(os.sched_getaffinity(int(t))) == 1]


@pytest.mark.skipif(CORES < 2, reason=f"pinning two threads needs two cores; this machine has {CORES}")
@pytest.mark.parametrize("flags, pinned", [((), True), (("--no-pin-threads",), False)], ids=["default", "off"])
def test_serve_pins_the_kernel_threads_unless_told_not_to(flags, pinned):
    server = start_server("--model", "lstm-512", "--threads", str(CORES), *flags)
    try:
        client = httpclient.InferenceServerClient(server.http)
        tokens = httpclient.InferInput("tokens", [1, 5], "INT64")
        tokens.set_data_from_numpy(np.array([[1, 2, 3, 4, 5]], dtype=np.int64))
        client.infer("lstm-512", [tokens])  # answered: the engine loop runs
        single = single_core_threads(server.proc.pid)
        if pinned:  # the engine's thread (the main one) and its OpenMP workers
            assert server.proc.pid in single and len(single) == CORES, server.output()
        else:
            assert single == [], server.output()
    finally:
        assert server.stop() == 0
