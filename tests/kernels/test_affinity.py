"""Pinning the kernels' OpenMP threads: each thread of the team lands on its own core, the
user's own placement wins, a process with fewer threads than cores is left alone, and the
engine loop gives its thread back its cores on exit.

Each case runs in a child process held to two cores (as `taskset -c` would): pinning is per
thread and per OpenMP pool, and the test runner's own threads must keep all their cores."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # each test runs Python processes to read their threads' placement: seconds each

CORES = len(os.sched_getaffinity(0))
needs_two_cores = pytest.mark.skipif(CORES < 2, reason=f"pinning two threads needs two cores; this machine has {CORES}")


TWO_CORES = "import os; os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])\n"


def run_child(code: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", TWO_CORES + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


PIN_AND_REPORT = """
    import os, torch
    from cellserve.kernels import affinity
    torch.set_num_threads(2)
    torch.ones(1 << 22).sum()  # a parallel region: the pool exists before pinning, as in a server
    pinned = affinity.pin_openmp_threads()
    torch.ones(1 << 22).sum()  # the team torch uses afterwards is the pinned one
    single = sorted(int(open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()[36])
                    for t in os.listdir("/proc/self/task") if len(os.sched_getaffinity(int(t))) == 1)
    print(pinned, sorted(os.sched_getaffinity(0)), single)
"""


@needs_two_cores
def test_each_thread_of_the_team_gets_its_own_core():
    pinned, own, single = (eval(part) for part in run_child(PIN_AND_REPORT).replace("] [", "]|[").split("|"))
    assert len(pinned) == 2 and len(set(pinned)) == 2
    assert own == [pinned[0]]  # the calling thread is the team's master
    assert len(single) >= 2  # the master and its worker are each held to one core
    assert sorted(set(single)) == sorted(pinned)  # ...and they run on those cores


@pytest.mark.parametrize("variable", ["OMP_PROC_BIND", "GOMP_CPU_AFFINITY"])
def test_the_users_own_placement_wins(variable):
    code = """
        import os, torch
        from cellserve.kernels import affinity
        torch.set_num_threads(2)
        print(affinity.pin_openmp_threads(), len(os.sched_getaffinity(0)))
    """
    value = "false" if variable == "OMP_PROC_BIND" else " ".join(map(str, sorted(os.sched_getaffinity(0))[:2]))
    pinned, cores = run_child(code, {variable: value}).split()
    assert pinned == "None"
    if variable == "OMP_PROC_BIND":  # (with GOMP_CPU_AFFINITY, libgomp itself binds the thread)
        assert int(cores) == min(CORES, 2)


@pytest.mark.parametrize("threads", [1, 3])
def test_fewer_or_more_threads_than_cores_are_left_alone(threads):
    code = f"""
        import os, torch
        from cellserve.kernels import affinity
        torch.set_num_threads({threads})
        print(affinity.pin_openmp_threads(), len(os.sched_getaffinity(0)))
    """
    pinned, cores = run_child(code).split()
    assert pinned == "None" and int(cores) == min(CORES, 2)


@needs_two_cores
def test_the_engine_loop_pins_while_it_runs_and_unpins_after():
    code = """
        import os, threading, numpy as np, torch
        from cellserve.engine.engine import Engine, EngineConfig
        from cellserve.engine.request import Request
        from cellserve.graph import zoo
        torch.set_num_threads(2)
        engine = Engine([zoo.load("lstm-512")], EngineConfig(pin_threads=True))
        stop, seen = threading.Event(), []
        def client():
            done = threading.Event()
            engine.submit(Request("lstm-512", {"tokens": np.array([[1, 2, 3]])}, on_done=lambda r: done.set()))
            done.wait(30)
            seen.append(len(os.sched_getaffinity(threading.main_thread().native_id)))
            stop.set()
        threading.Thread(target=client).start()
        engine.serve_forever(stop)
        print(seen[0], len(os.sched_getaffinity(0)))
    """
    while_running, after = map(int, run_child(code).split())
    assert while_running == 1 and after == 2
