"""The engine's invariants hold whichever executor runs its steps: real kernels on a fake
clock, or the simulator's priced costs on a virtual one. Same engine, same test body."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine
from cellserve.engine.request import Request, Status
from cellserve.executor.kernel import KernelExecutor
from cellserve.plan.profile import synthetic_profile
from cellserve.sim.clock import VirtualClock
from cellserve.sim.executor import SimExecutor
from strategies_engine import MIX, timed_requests  # tests/engine (see conftest.py)

TICK = 1e-3


class TickingClock(VirtualClock):
    """Virtual time that also moves a little on every reading, as wall time does."""

    def now(self) -> float:
        self.t += TICK / 10
        return self.t


def make_engine(models, kind: str, config: EngineConfig) -> tuple[Engine, object]:
    served = [models.models[n] for n in MIX]
    clock = TickingClock()
    if kind == "kernels":
        executor = KernelExecutor("cpu")
    else:
        profiles = {m.name: synthetic_profile(m, lambda b: TICK * (1 + b / 8), lone_lanes=1, lone_step_s=TICK / 2,
                                              plain_op_s=TICK / 10, max_batch=64) for m in served}
        executor = SimExecutor(profiles, clock, np.random.default_rng(0))
    engine = Engine(served, config, clock, executors={kind: executor})
    for cell_type in engine.cell_types:
        engine.costs.observe(cell_type, 1, TICK)
    return engine, executor


@pytest.mark.parametrize("kind", ["kernels", "sim"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(policy=st.sampled_from(["cellular", "cellular-edf", "padded", "none"]), admission=st.booleans(),
       specs=st.lists(timed_requests(min_timeout_s=1e-3), min_size=1, max_size=8))
def test_every_request_gets_exactly_one_response_on_either_executor(models, kind, policy, admission, specs):
    config = EngineConfig(policy=policy, admission=admission, drop_late=True, batch_timeout_s=0.001, profile=False,
                          pin_threads=False)
    engine, executor = make_engine(models, kind, config)
    got: dict[int, list] = {i: [] for i in range(len(specs))}
    for i, (name, inputs, timeout, steps_before) in enumerate(specs):
        for _ in range(steps_before):
            engine.step()
        engine.submit(Request(name, inputs, on_done=got[i].append, timeout_s=timeout))
    engine.run_until_idle(timeout_s=60)
    assert engine.idle()
    allowed = {Status.OK, Status.DROPPED} | ({Status.REJECTED} if admission else set())
    for i, (name, inputs, timeout, _) in enumerate(specs):
        assert len(got[i]) == 1, f"request {i} got {len(got[i])} responses"
        (response,) = got[i]
        assert response.status in allowed, f"{response.status}: {response.reason}"
        assert response.finish >= response.arrival
        if timeout is None:
            assert response.status is Status.OK  # nothing drops a request without a deadline
        if response.status is Status.OK:
            model = models.models[name]
            assert set(response.outputs) == {o.name for o in model.outputs}
            rows = next(iter(inputs.values())).shape[0]
            assert all(np.shape(v)[0] == rows for v in response.outputs.values())  # batch first in these models
        else:
            assert response.outputs == {}
    if kind == "kernels":
        assert all(k.slots.in_use == 0 for k in executor.kernels.values())
    else:
        assert not executor._decoding  # every decoder lane released
