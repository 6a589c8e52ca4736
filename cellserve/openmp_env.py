"""How long the CPU kernels' OpenMP workers spin for more work: set for cellserve's commands
before torch (and with it libgomp, which reads its environment once, when it loads) is imported.

libgomp's workers spin after each parallel region before they sleep, by default for 300,000
turns of their wait loop when there are no more threads than cores.
A server's engine thread and its worker are pinned one per core (kernels/affinity.py), and
the frontends' thread and a local client float between the same cores: after a lightly loaded
request's last step, the worker kept spinning on its core while the frontends' thread,
woken with the answer, waited behind it; at saturation the spin filled the engine's Python
between steps. A spin of SPIN_COUNT turns, a thirtieth of that, covers the gaps between the steps
of a lone request's run, so that the worker is awake for each, and gives the core back soon
after the last; at saturation the worker sleeps between steps and is woken for each, which
measured no slower. Figures in docs/performance.md ("Light-load latency breakdown").

The user's own OpenMP settings win: nothing is set when GOMP_SPINCOUNT or OMP_WAIT_POLICY is in
the environment. Servers cellserve starts (`bench`'s own `cellserve serve`) inherit the value;
the peers `bench compare` starts do not (peer_environ), so they run with their own defaults.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = "10000"
_SET_BY_CELLSERVE = "_CELLSERVE_SET_GOMP_SPINCOUNT"  # marks a GOMP_SPINCOUNT that is ours, not the user's


def set_spin_default(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set GOMP_SPINCOUNT to SPIN_COUNT unless the user set it or OMP_WAIT_POLICY; returns
    whether it did. Call before torch is imported (later, libgomp has read its settings)."""
    if "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    environ[_SET_BY_CELLSERVE] = "1"
    return True


def peer_environ(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """`environ` without what set_spin_default added: the environment for another server. A
    GOMP_SPINCOUNT other than ours stays (the marker may be inherited from a cellserve parent
    while the user set another value for this process)."""
    env = dict(environ)
    if env.pop(_SET_BY_CELLSERVE, None) is not None and env.get("GOMP_SPINCOUNT") == SPIN_COUNT:
        del env["GOMP_SPINCOUNT"]
    return env
