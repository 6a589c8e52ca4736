"""The measured profiles committed for the cluster's workload (docs/results/sim) price the zoo
models as the engine serves them today. A profile of an older version of a model (its plain
ops renamed, a cell type added) is refused when an engine starts; these tests catch it in the
suite instead of in a benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from cellserve.cluster.workload import DEFAULT_SESSIONS, PROFILE_DIR, PROFILE_FILE
from cellserve.engine.config import EngineConfig
from cellserve.engine.request import Status
from cellserve.graph import zoo
from cellserve.plan.profile import ModelProfile
from cellserve.sim.loop import SimArrival, Simulation


@pytest.mark.parametrize("name", sorted({s.base for s in DEFAULT_SESSIONS}))
def test_a_committed_profile_serves_its_zoo_model(name):
    model = zoo.load(name)
    profile = ModelProfile.from_json(PROFILE_DIR / PROFILE_FILE.format(model=name))
    sim = Simulation(seed=0)
    sim.add_engine([model], {name: profile}, EngineConfig(policy="cellular", pin_threads=False))
    spec = model.inputs[0]
    vocab = model.semantics[spec.name].vocab
    rng = np.random.default_rng(0)
    arrivals = [SimArrival(i * 1e-3, name, {spec.name: rng.integers(0, vocab, size=(1, 3 + i), dtype=np.int64)})
                for i in range(8)]
    outcomes = sim.run(arrivals)
    assert [o.status for o in outcomes] == [Status.OK] * len(arrivals), [o.reason for o in outcomes]
