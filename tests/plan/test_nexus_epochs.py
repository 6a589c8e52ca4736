"""Epochs: when a re-plan is due, what a re-plan keeps and moves, by hand; and the documented
example in docs/planning.md is what the planner makes of the documented files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers_nexus import linear, profiles, workload

from cellserve.plan.nexus_check import check_plan
from cellserve.plan.nexus_io import parse_plan, parse_profiles, parse_workload
from cellserve.plan.nexus_epochs import moved_sessions, planned_rates, replan_due
from cellserve.plan.nexus_pack import plan, replan

L = linear(10.0, 5.0)  # l(b) = 10 + 5b


def _shape(p):
    return {d.id: sorted(a.id for a in d.sessions) for d in p.devices}


def test_replan_due_every_epoch_or_when_a_rate_leaves_the_band():
    p = profiles({"l": L})
    first = plan(workload([("l", 100.0, 40.0), ("l", 200.0, 20.0)]), p)
    assert planned_rates(first) == pytest.approx({"s0": 40.0, "s1": 20.0})
    assert replan_due(first, {"s0": 40.0, "s1": 20.0}, 12.0) is None
    assert replan_due(first, {"s0": 32.0, "s1": 22.0}, 12.0) is None  # 0.8x and 1.1x are inside
    assert "s0" in replan_due(first, {"s0": 31.0, "s1": 20.0}, 12.0)
    assert "s1" in replan_due(first, {"s0": 40.0, "s1": 22.5}, 12.0)
    assert replan_due(first, {"s0": 80.0, "s1": 20.0}, 5.0) is None  # too soon after the last plan
    assert replan_due(first, {"s0": 40.0, "s1": 20.0}, 30.0).startswith("epoch")
    assert "new" in replan_due(first, {"s0": 40.0, "s1": 20.0, "new": 3.0}, 12.0)


def test_a_device_that_no_longer_fits_sheds_the_session_whose_rate_changed():
    """s0 (SLO 100, 40 req/s) and s1 (SLO 200, 20 req/s) share a device at d = 75 (batches
    3 and 2: 45 ms). At 100 req/s s1 would still fit (batch 8: 25 + 50 <= 75); at 120 (batch 9:
    25 + 55 > 75) it does not: s1 is shed and moves; s0 stays where it was."""
    p = profiles({"l": L})
    first = plan(workload([("l", 100.0, 40.0), ("l", 200.0, 20.0)]), p)
    assert _shape(first) == {0: ["s0", "s1"]}
    assert moved_sessions(first, replan(first, workload([("l", 100.0, 40.0), ("l", 200.0, 100.0)]), p)) == set()
    busier = workload([("l", 100.0, 40.0), ("l", 200.0, 120.0)])
    second = replan(first, busier, p)
    assert check_plan(second, p, busier) == []
    assert ["s0"] in [ids for d, ids in _shape(second).items() if d == 0]
    assert moved_sessions(first, second) == {"s1"}


def test_scaling_out_and_in_is_not_a_move():
    """A session on whole devices (160 req/s each at batch 8) keeps them and gets another as its
    rate grows; fewer as it falls; nothing counts as moved."""
    p = profiles({"l": L})
    first = plan(workload([("l", 100.0, 330.0)]), p)
    assert first.devices_used == 3  # 2 whole + a residual of 10 req/s
    up = replan(first, workload([("l", 100.0, 490.0)]), p)
    assert up.devices_used == 4 and {0, 1} <= {d.id for d in up.devices}
    down = replan(first, workload([("l", 100.0, 170.0)]), p)
    assert down.devices_used == 2
    assert moved_sessions(first, up) == set() and moved_sessions(first, down) == set()
    for new, w in ((up, 490.0), (down, 170.0)):
        assert check_plan(new, p, workload([("l", 100.0, w)])) == []


def test_new_and_gone_sessions_on_replan():
    p = profiles({"l": L})
    first = plan(workload([("l", 100.0, 40.0), ("l", 200.0, 20.0)]), p)
    w = workload([("l", 200.0, 20.0), ("l", 500.0, 5.0)], ids=["s1", "s9"])
    second = replan(first, w, p)
    assert check_plan(second, p, w) == []
    assert moved_sessions(first, second) == set()  # s0 left, s9 is new, s1 stayed
    assert 0 in _shape(second) and "s1" in _shape(second)[0]


DOC = Path(__file__).resolve().parents[2] / "docs" / "planning.md"


def _doc_json(title: str) -> dict:
    """The example under the doc's `### TITLE` heading (its first JSON block)."""
    section = DOC.read_text().split(f"### {title}\n", 1)[1]
    return json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))


def test_the_documented_example_is_what_the_planner_makes():
    p = parse_profiles(_doc_json("PROFILES"))
    w = parse_workload(_doc_json("SESSIONS"), p)
    documented = parse_plan(_doc_json("PLAN"))
    made = plan(w, p)
    assert check_plan(made, p, w) == []
    assert made.devices_used == documented.devices_used
    assert [[(a.id, a.batch) for a in d.sessions] for d in made.devices] == \
        [[(a.id, a.batch) for a in d.sessions] for d in documented.devices]
    assert made.queries[0].split_ms == documented.queries[0].split_ms
    for got, doc in zip(made.devices, documented.devices):
        assert got.duty_cycle_ms == pytest.approx(doc.duty_cycle_ms, abs=0.01)
        assert got.occupancy == pytest.approx(doc.occupancy, abs=0.001)
    # the schemas in the doc are JSON too
    schemas = re.findall(r"```json\n(\{\"\$schema\".*?)```", DOC.read_text(), re.S)
    assert len(schemas) == 3 and all(json.loads(s)["title"] for s in schemas)
