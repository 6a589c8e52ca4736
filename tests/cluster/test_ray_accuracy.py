"""Accuracy scaling on the Ray workers (`serve --ray --accuracy-scaling`): families from --model,
the controller's loop over fake workers with an injected clock (a demand change switches a
worker's variant, which then drains), the request path's routing and fallback, bad flags, and
the real thing on a local Ray (slow)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cellserve.cluster.ray_accuracy import AccuracyScalingError, resolve_families, served_variants
from cellserve.cluster.ray_accuracy_core import AccuracyCore, VariantRoutes
from cellserve.cluster.ray_accuracy_loop import AccuracyReplanner
from cellserve.cluster.ray_router import Router, WorkerInfo, WorkerState
from cellserve.graph.stacking import stack_layers
from cellserve.graph.zoo import families
from cellserve.plan.accuracy import AccuracyPlan
from cellserve.plan.accuracy_control import WeightedRouter
from cellserve.server.errors import Unavailable

SLO_MS = 100.0
# per-step seconds of a variant's cell types at batch b: h128 3x, h32 1.2x the smallest's
SCALE = {"reverse-h16": 1.0, "reverse-h32": 1.2, "reverse-h128": 3.0}


def test_families_from_model_names():
    every = families.FAMILIES["reverse"].variant_names()
    assert resolve_families([]) == {"reverse": every}
    assert resolve_families(["reverse"]) == {"reverse": every}
    assert resolve_families(["reverse-h128", "reverse-h16"]) == {"reverse": ["reverse-h16", "reverse-h128"]}
    with pytest.raises(AccuracyScalingError, match=r"--model 'lstm-512' is neither a family nor a variant of one "
                                                   r"\(the families: reverse: reverse-h16"):
        resolve_families(["reverse", "lstm-512"])


# ---- the loop over fake workers ----

class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)
        return call()


@pytest.fixture(scope="module")
def variant_models():
    return {s.name: s for s in served_variants(list(SCALE), SLO_MS)}


class FakeWorker:
    """load/unload answered at once; cost tables of every variant (measured at start)."""

    def __init__(self, wid, served):
        self.wid, self.served, self.models = wid, served, set(served)
        self.tables = {}
        for name, s in served.items():
            for t in stack_layers(s.model).cell_types():
                cost = {k: SCALE[name] * 1e-4 * (1 + (1 << k) / 8) for k in range(7)}
                self.tables[t] = {"mean": cost, "best": cost}
        self.load, self.unload = _Method(self._load), _Method(self._unload)
        self.unloaded: list[str] = []

    def info(self):
        return WorkerInfo(self.wid, "node", tuple(sorted(self.models)),
                          {n: stack_layers(self.served[n].model).cell_types() for n in self.models},
                          {n: [0] for n in self.models}, 64)

    def _load(self, names):
        self.models |= set(names)
        return self.info()

    def _unload(self, names):
        self.unloaded += names
        self.models -= set(names)
        return {"unloaded": list(names), "busy": {}, "info": self.info()}


def fake_cluster(variant_models, n=2):
    fakes = [FakeWorker(f"w{i}", variant_models) for i in range(n)]
    states = [WorkerState(f.info(), f) for f in fakes]
    for s, f in zip(states, fakes):
        s.snapshot = {"costs": {"tables": f.tables, "group_of": None}, "step_overhead_s": 0.0}
    router = Router(states)
    core = SimpleNamespace(router=router, accepting=True, deaths=[], meter=None, controller=None,
                           routes=VariantRoutes({}, None))
    return core, fakes


def offer(r, clock, rps, seconds):
    """`rps` of family `reverse` for `seconds` of fake time, the loop ticking every 0.5 s."""
    for _ in range(int(seconds / 0.5)):
        for _ in range(int(rps * 0.5)):
            r.meter.arrived("reverse", 8)
            if r.controller is not None:
                r.controller.observe("reverse")
        clock["t"] += 0.5
        asyncio.run(r.tick())


def test_a_demand_rise_switches_a_worker_to_a_faster_variant_and_the_old_one_drains(monkeypatch, variant_models):
    core, fakes = fake_cluster(variant_models)
    clock = {"t": 0.0}
    monkeypatch.setattr("cellserve.cluster.ray_accuracy_loop.time.monotonic", lambda: clock["t"])
    logs = []
    accuracy = {v: families.variant(v).accuracy for v in SCALE}
    r = AccuracyReplanner(core, {"reverse": list(SCALE)}, list(variant_models.values()), accuracy, SLO_MS, 2.0,
                          True, (RuntimeError,), str, log=logs.append, rng=random.Random(0))
    offer(r, clock, 100, 4.0)
    first = r.applied[-1]
    assert r.controller is not None and core.controller is r.controller
    assert set(first.placement.values()) == {"reverse-h128"}  # light load: the most accurate everywhere
    assert {f.wid: f.models for f in fakes} == {"w0": {"reverse-h128"}, "w1": {"reverse-h128"}}  # the rest drained
    assert r.capacity_rps["reverse-h128"] < r.capacity_rps["reverse-h16"]
    high = 2.5 * r.capacity_rps["reverse-h128"]  # past what two workers of h128 carry (1.9x at headroom 1.05)
    assert high < 1.9 * r.capacity_rps["reverse-h16"]  # and within what two of the fastest carry
    offer(r, clock, high, 6.0)
    last = r.applied[-1]
    assert "measured demand" in last.reason and last.demand_rps["reverse"] == pytest.approx(high, rel=0.05)
    assert set(last.placement.values()) != {"reverse-h128"} and not last.unserved_rps["reverse"]
    assert first.effective_accuracy > last.effective_accuracy >= families.variant("reverse-h16").accuracy
    for f in fakes:  # each worker hosts exactly its planned variant, the old one unloaded
        assert f.models == {last.placement[f.wid]}
    assert core.routes.placement == last.placement and r.moved_total >= 1
    assert any("accuracy plan" in line and "capacity per worker" in line for line in logs)
    offer(r, clock, 20, 6.0)  # the demand falls back: the most accurate again
    assert set(r.applied[-1].placement.values()) == {"reverse-h128"}


def test_a_dead_worker_is_planned_around_at_once(monkeypatch, variant_models):
    core, fakes = fake_cluster(variant_models)
    clock = {"t": 0.0}
    monkeypatch.setattr("cellserve.cluster.ray_accuracy_loop.time.monotonic", lambda: clock["t"])
    accuracy = {v: families.variant(v).accuracy for v in SCALE}
    r = AccuracyReplanner(core, {"reverse": list(SCALE)}, list(variant_models.values()), accuracy, SLO_MS, 2.0,
                          True, (RuntimeError,), str, log=lambda s: 0)
    offer(r, clock, 100, 1.0)
    core.router.mark_dead(core.router.workers["w0"], "killed")
    offer(r, clock, 100, 0.5)
    assert "w0 died" in r.applied[-1].reason and set(r.applied[-1].placement) == {"w1"}
    assert set(r.controller.plan.placement) == {"w1"}


# ---- the request path's choice of worker and variant ----

def _core(models_by_worker, accuracy):
    states = [WorkerState(WorkerInfo(w, "node", tuple(ms), {m: [] for m in ms}, {m: [0] for m in ms}, 64))
              for w, ms in models_by_worker.items()]
    core = AccuracyCore.__new__(AccuracyCore)  # the routing needs only these (no frontends, no Ray)
    core.router, core.family_of, core.accuracy = Router(states), {v: "reverse" for v in SCALE}, accuracy
    return core


def test_routing_follows_the_plans_shares_and_falls_back_where_the_choice_cannot_serve():
    accuracy = {v: families.variant(v).accuracy for v in SCALE}
    core = _core({"w0": ["reverse-h128"], "w1": ["reverse-h16"], "w2": ["reverse-h32"]}, accuracy)
    plan = AccuracyPlan({"w0": "reverse-h128", "w1": "reverse-h16", "w2": "reverse-h32"},
                        {"reverse": {"w0": 0.25, "w1": 0.75}}, 0.6, 1.05, {"reverse": 0.0})
    core.routes = VariantRoutes(plan.placement, WeightedRouter(plan, random.Random(1)))
    picks = Counter(core._choose_variant("reverse", [])[0].id for _ in range(4000))
    assert set(picks) == {"w0", "w1"} and abs(picks["w0"] / 4000 - 0.25) < 0.03
    assert core._choose_variant("reverse", [])[1] in ("reverse-h128", "reverse-h16")
    core.router.mark_dead(core.router.workers["w1"], "gone")  # its share falls back to the others
    got = Counter(core._choose_variant("reverse", [])[0].id for _ in range(400))
    assert "w1" not in got and got["w0"] > 0
    # fallback: fewest outstanding, then the most accurate variant
    core.routes = VariantRoutes({}, None)
    assert core._choose_variant("reverse", [])[1] == "reverse-h128"
    core.router.workers["w0"].outstanding = 3
    assert core._choose_variant("reverse", [])[1] == "reverse-h32"
    with pytest.raises(Unavailable, match="no live worker hosts a variant of family 'other'"):
        core._choose_variant("other", [])


# ---- bad flags ----

@pytest.mark.parametrize("args, why", [
    (["--accuracy-scaling", "--slo-ms", "100"], "--accuracy-scaling places variants on the Ray workers: it needs --ray"),
    (["--accuracy-scaling", "--ray"], "needs --slo-ms"),
    (["--accuracy-scaling", "--ray", "--slo-ms", "100", "--plan", "p.json"], "cannot be combined with --plan"),
    (["--accuracy-scaling", "--ray", "--slo-ms", "100", "--model", "lstm-512"],
     "--model 'lstm-512' is neither a family nor a variant of one"),
])
def test_bad_flags_exit_2_naming_what_is_wrong(args, why):
    done = subprocess.run([sys.executable, "-m", "cellserve.cli", "serve", "--http-port", "0", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert why in done.stderr


# ---- the real thing: a local Ray, two workers (slow) ----

@pytest.mark.slow
@pytest.mark.xfail(reason="UNMET on the 2-core VM (2026-12-02): under this load the workers' measured step costs "
                          "leave no variant a batch under half of the 20 ms SLO, every plan places nothing, workers "
                          "keep h128 (the idle-keep rule) and no switch happens; see docs/accuracy-scaling.md",
                   strict=False)
def test_on_ray_a_family_under_load_is_served_by_its_variants_and_a_load_change_switches_one():
    """Two workers start with every variant; the first plan (nominal demand) hosts the most
    accurate on both, the others unloaded; heavy load (16 closed-loop clients at a 20 ms SLO)
    makes a re-plan place a faster variant on a worker; every request is answered, each 200 by
    a variant of the family (the response's `variant` parameter)."""
    pytest.importorskip("ray")
    import json
    import re
    import urllib.error
    import urllib.request

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
    from serverproc import metric, start_server, wait_until

    server = start_server("--ray", "--ray-workers", "2", "--accuracy-scaling", "--model", "reverse",
                          "--slo-ms", "20", "--replan-every", "2", timeout=300)
    codes: list[tuple[int, str | None]] = []
    stop = threading.Event()
    digits = np.array([[4, 5, 6, 7, 8, 9, 3, 4]])
    body = json.dumps({"inputs": [{"name": "digits", "shape": list(digits.shape), "datatype": "INT64",
                                   "data": digits.ravel().tolist()}]}).encode()

    def client():
        while not stop.is_set():
            req = urllib.request.Request(f"http://{server.http}/v2/models/reverse/infer", body)
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    doc = json.loads(resp.read())
                    assert doc["outputs"][0]["data"] == digits[0, ::-1].tolist() or doc["parameters"]["variant"] \
                        != "reverse-h128"  # the most accurate answers right; the others may err
                    codes.append((200, doc["parameters"]["variant"]))
            except urllib.error.HTTPError as exc:
                codes.append((exc.code, None))
    try:
        wait_until(lambda: any("accuracy plan 1 " in line for line in server.lines), "the first plan", timeout=60)
        first = next(line for line in server.lines if "accuracy plan 1 " in line)
        assert re.search(r"w0: reverse-h128; w1: reverse-h128", first), first
        wait_until(lambda: metric(server, "cellserve_worker_model_changes_total", action="unload") >= 4,
                   "the variants not hosted unloaded", timeout=60)
        threads = [threading.Thread(target=client, daemon=True) for _ in range(16)]
        for t in threads:
            t.start()
        wait_until(lambda: any(re.search(r"accuracy plan \d+ \(period.*w\d: reverse-h(16|32)", line)
                               for line in server.lines), "a worker switched to a faster variant", timeout=90)
        seen = len(codes)
        wait_until(lambda: len(codes) > seen + 20, "answers after the switch", timeout=30)
    finally:
        stop.set()
        print("\n".join(line for line in server.lines if "accuracy plan" in line))  # with -s
        assert server.stop() == 0
    ok = [v for c, v in codes if c == 200]
    assert ok and set(ok) <= set(families.FAMILIES["reverse"].variant_names())
    assert len(set(ok)) >= 2, Counter(ok)  # answered by the first plan's variant and the switched one's
    assert all(c in (200, 429, 503, 504) for c, _ in codes), Counter(c for c, _ in codes)
