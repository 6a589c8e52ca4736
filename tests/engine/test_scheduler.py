"""The scheduling policies on their own: hand-made lanes, no torch, no kernels."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellserve.engine.scheduler import SCRATCH, CellularPolicy, Lane, PaddedPolicy, StepBatch, make_policy

INF = math.inf


def lane(lane_id, request_id, cell_type, length, *, deadline=INF, priority=0, arrival=0.0, row=None,
         stride=1) -> Lane:
    """A lane whose slot is its id and whose rows start at 100 * id (reverse lanes start at the end)."""
    base = 100 * lane_id
    if row is None:
        row = base + (length - 1 if stride < 0 and length else 0)
    return Lane(lane_id, request_id, cell_type, length, deadline, priority, arrival, slot=lane_id, row=row,
                stride=stride)


def real(batch: StepBatch) -> list[int]:
    return [i for i in batch.lane_ids if i != -1]


def run_batch(policy, now=0.0, ended=frozenset()):
    batch = policy.next_batch(now)
    assert batch is not None
    return batch, policy.complete(batch, ended)


# ---------------------------------------------------------------- cellular


def test_cellular_batches_lanes_of_one_type_at_different_step_positions():
    p = CellularPolicy(max_batch=8)
    a = lane(1, 1, "m/a", 5)
    p.add(a)
    for _ in range(2):
        run_batch(p)
    b = lane(2, 2, "m/a", 3)
    p.add(b)
    batch = p.next_batch(0.0)
    assert batch.cell_type == "m/a"
    assert sorted(batch.lane_ids) == [1, 2]
    by_id = {i: (s, r, d) for i, s, r, d in zip(batch.lane_ids, batch.slots, batch.rows, batch.strides)}
    assert by_id[1] == (1, 100 + 2, 1)  # lane 1 is at step 2
    assert by_id[2] == (2, 200, 1)  # lane 2 at step 0
    assert (a.step, b.step) == (2, 0)


def test_cellular_cell_types_take_turns_one_type_per_batch():
    p = CellularPolicy(max_batch=8)
    p.add(lane(1, 1, "m/a", 3, priority=1))
    p.add(lane(2, 2, "m/b", 3, priority=0))
    p.add(lane(3, 3, "m/a", 3, priority=1))
    p.add(lane(4, 4, "m/c", 1))
    batches = [run_batch(p)[0] for _ in range(4)]
    assert [b.cell_type for b in batches] == ["m/a", "m/b", "m/c", "m/a"]  # round robin
    assert sorted(batches[0].lane_ids) == [1, 3] and batches[1].lane_ids == (2,)
    # m/c's only lane ended: the turn skips the type with no lanes
    assert [run_batch(p)[0].cell_type for _ in range(3)] == ["m/b", "m/a", "m/b"]
    assert not p.has_work()


def test_cellular_is_stable_only_while_a_single_cell_type_has_lanes():
    p = CellularPolicy()
    p.add(lane(1, 1, "m/a", 3))
    assert p.stable
    p.add(lane(2, 2, "m/b", 3))
    assert not p.stable


def test_cellular_edf_runs_the_cell_type_holding_the_most_urgent_lane():
    p = make_policy("cellular-edf", {})
    p.add(lane(1, 1, "m/a", 3, priority=1))
    p.add(lane(2, 2, "m/b", 3, priority=0, deadline=5.0))
    p.add(lane(3, 3, "m/a", 3, priority=1))
    p.add(lane(4, 4, "m/c", 3, priority=0, deadline=9.0))
    for _ in range(3):
        batch, _ = run_batch(p)
        assert batch.cell_type == "m/b" and batch.lane_ids == (2,)
    batch, _ = run_batch(p)
    assert batch.cell_type == "m/c"
    p.add(lane(5, 5, "m/a", 1, priority=0, deadline=1.0))  # now m/a holds the most urgent lane
    batch, _ = run_batch(p)
    assert batch.cell_type == "m/a" and sorted(batch.lane_ids) == [1, 3, 5]


def test_cellular_respects_max_batch_taking_the_most_urgent_lanes_by_priority_then_deadline():
    p = CellularPolicy(max_batch=3)
    p.add(lane(1, 1, "t", 4, priority=1, deadline=1.0))
    p.add(lane(2, 2, "t", 4, priority=0, deadline=9.0))
    p.add(lane(3, 3, "t", 4, priority=0, deadline=5.0))
    p.add(lane(4, 4, "t", 4, priority=2, deadline=0.5))
    p.add(lane(5, 5, "t", 4, priority=1, deadline=0.9))
    p.add(lane(6, 6, "t", 4, priority=0, deadline=INF))
    batch = p.next_batch(0.0)
    assert batch.size == 3
    assert set(batch.lane_ids) == {2, 3, 6}  # all priority 0
    p.remove(6)
    assert set(p.next_batch(0.0).lane_ids) == {2, 3, 5}  # then priority 1 with the earlier deadline
    p.remove(2), p.remove(3)
    assert set(p.next_batch(0.0).lane_ids) == {1, 4, 5}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 40)), min_size=1, max_size=300),
       max_batch=st.integers(1, 12))
def test_cellular_takes_the_most_urgent_lanes_whatever_order_they_came_and_went_in(ops, max_batch):
    """Lanes added out of urgency order (a beam's rows after its request's first step, a more
    urgent priority) and removed at random: each batch is still the max_batch most urgent."""
    p = CellularPolicy(max_batch=max_batch)
    held: dict[int, Lane] = {}
    for i, (adding, priority, arrival) in enumerate(ops):
        if adding or not held:
            held[i] = lane(i, i, "t", 1000, priority=priority, arrival=float(arrival))
            p.add(held[i])
        else:
            gone = sorted(held)[arrival % len(held)]
            p.remove(gone)
            del held[gone]
        want = sorted(held.values(), key=lambda x: x.key)[:max_batch]
        batch = p.next_batch(0.0)
        assert sorted(batch.lane_ids if batch else []) == sorted(x.lane_id for x in want)


def test_cellular_ties_in_priority_and_deadline_go_to_the_earliest_arrival():
    p = CellularPolicy(max_batch=1)
    p.add(lane(1, 1, "t", 2, arrival=3.0))
    p.add(lane(2, 2, "t", 2, arrival=1.0))
    assert p.next_batch(0.0).lane_ids == (2,)


def test_lanes_join_between_steps_and_leave_when_their_length_is_reached():
    p = CellularPolicy(max_batch=8)
    p.add(lane(1, 1, "t", 2))
    batch, done = run_batch(p)
    assert batch.lane_ids == (1,) and done == []
    p.add(lane(2, 2, "t", 3))  # joins between steps
    batch, done = run_batch(p)
    assert sorted(batch.lane_ids) == [1, 2]
    assert [l.lane_id for l in done] == [1]  # lane 1 reached length 2
    batch, done = run_batch(p)
    assert batch.lane_ids == (2,) and done == []
    batch, done = run_batch(p)
    assert batch.lane_ids == (2,) and [l.lane_id for l in done] == [2]
    assert not p.has_work() and p.next_batch(0.0) is None


def test_reverse_lane_rows_walk_backwards_through_its_block():
    p = CellularPolicy()
    p.add(lane(1, 1, "t", 3, stride=-1))
    rows = []
    while p.has_work():
        batch, _ = run_batch(p)
        rows.append(batch.rows[0])
        assert batch.strides == (-1,)
    assert rows == [102, 101, 100]


def test_complete_returns_each_finished_lane_exactly_once():
    p = CellularPolicy()
    p.add(lane(1, 1, "t", 1))
    p.add(lane(2, 1, "t", 2))
    batch = p.next_batch(0.0)
    done = p.complete(batch)
    assert [l.lane_id for l in done] == [1]
    # completing the same batch again (lane 1 is gone) does not report lane 1 again
    done = p.complete(batch)
    assert [l.lane_id for l in done] == [2]
    assert p.complete(batch) == []
    assert not p.has_work()


def test_complete_finishes_open_ended_lanes_only_when_the_kernel_reports_their_end():
    p = CellularPolicy()
    dec = lane(1, 1, "m/dec", None, stride=0)
    p.add(dec)
    for _ in range(5):
        _, done = run_batch(p)
        assert done == []
    batch, done = run_batch(p, ended=frozenset({1}))
    assert done == [dec] and batch.rows == (100,)  # stride 0: a decoder's memory row stays put
    assert not p.has_work()


def test_removed_lane_is_not_scheduled_or_reported():
    p = CellularPolicy()
    p.add(lane(1, 1, "t", 1))
    p.add(lane(2, 2, "t", 1))
    batch = p.next_batch(0.0)
    p.remove(1)  # dropped while its batch ran
    assert [l.lane_id for l in p.complete(batch)] == [2]
    assert not p.has_work()


def test_policies_refuse_a_max_batch_below_one():
    with pytest.raises(ValueError, match="max_batch"):
        CellularPolicy(0)


def test_make_policy_names():
    order = {"m": ["m/a"]}
    assert isinstance(make_policy("cellular", order), CellularPolicy)
    assert make_policy("cellular", order).max_batch == 64
    padded = make_policy("padded", order, 4, 0.5)
    assert isinstance(padded, PaddedPolicy) and padded.max_batch == 4 and padded.batch_timeout_s == 0.5
    none = make_policy("none", order)
    assert isinstance(none, PaddedPolicy) and none.max_batch == 1 and none.batch_timeout_s == 0.0
    assert make_policy("cellular-edf", order).name == "cellular-edf"
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fifo", order)


# ---------------------------------------------------------------- padded

ORDER = {"m": ["m/a", "m/b"], "n": ["n/a"]}


def test_padded_waits_until_max_batch_requests_have_arrived():
    p = PaddedPolicy(ORDER, max_batch=3, batch_timeout_s=1.0)
    p.add(lane(1, 1, "m/a", 2, arrival=0.0))
    p.add(lane(2, 2, "m/a", 2, arrival=0.1))
    assert p.next_batch(0.2) is None
    p.add(lane(3, 3, "m/a", 2, arrival=0.2))
    batch = p.next_batch(0.2)
    assert batch is not None and sorted(batch.lane_ids) == [1, 2, 3]


def test_padded_forms_a_smaller_cohort_after_the_timeout_of_the_oldest_request():
    p = PaddedPolicy(ORDER, max_batch=8, batch_timeout_s=1.0)
    p.add(lane(1, 1, "m/a", 2, arrival=0.5))
    p.add(lane(2, 2, "m/a", 2, arrival=0.25))
    assert p.wake_at(0.3) == pytest.approx(1.25)  # the oldest arrival plus the timeout
    assert p.next_batch(1.2) is None
    batch = p.next_batch(1.25)
    assert sorted(batch.lane_ids) == [1, 2]
    assert p.wake_at(1.25) is None  # a cohort is running: nothing to wait for


def test_padded_cohort_takes_the_oldest_requests_of_the_oldest_requests_model():
    p = PaddedPolicy(ORDER, max_batch=2, batch_timeout_s=0.0)
    p.add(lane(1, 1, "n/a", 1, arrival=0.3))
    p.add(lane(2, 2, "m/a", 1, arrival=0.1))
    p.add(lane(3, 3, "m/a", 1, arrival=0.4))
    p.add(lane(4, 4, "m/a", 1, arrival=0.2))
    batch = p.next_batch(1.0)
    assert batch.cell_type == "m/a" and sorted(batch.lane_ids) == [2, 4]


def test_padded_keeps_finished_lanes_as_padding_until_the_longest_lane_ends_then_moves_on():
    p = PaddedPolicy(ORDER, max_batch=3, batch_timeout_s=0.0)
    lengths = {1: 1, 2: 3, 3: 2}
    for i, n in lengths.items():
        p.add(lane(i, i, "m/a", n))
    seen = []
    while True:
        batch = p.next_batch(0.0)
        if batch.cell_type != "m/a":
            break
        seen.append(batch)
        for l in p.complete(batch):  # the engine starts a request's next layer when it ends one
            p.add(lane(10 + l.lane_id, l.request_id, "m/b", 1))
    assert len(seen) == 3  # as many steps as the longest lane
    for b in seen:
        assert b.size == 3  # the width never shrinks
        for i, s, r, d in zip(b.lane_ids, b.slots, b.rows, b.strides):
            if i == -1:
                assert (s, r, d) == (SCRATCH, SCRATCH, 0)
    assert [len(real(b)) for b in seen] == [3, 2, 1]
    assert real(seen[1]) and 1 not in seen[1].lane_ids
    # then the next cell type in cell_order, for the same cohort
    assert batch.cell_type == "m/b" and sorted(batch.lane_ids) == [11, 12, 13]


def test_padded_does_not_let_a_later_request_join_a_running_cohort():
    p = PaddedPolicy(ORDER, max_batch=2, batch_timeout_s=0.0)
    p.add(lane(1, 1, "m/a", 3))
    batch, _ = run_batch(p)
    assert batch.lane_ids == (1,)
    p.add(lane(2, 2, "m/a", 3, arrival=0.1))
    for _ in range(2):
        batch, _ = run_batch(p)
        assert batch.lane_ids == (1,)
    # the cohort's model has no lanes of type m/b: the cohort ends, the waiting one starts
    batch, _ = run_batch(p, now=1.0)
    assert batch.lane_ids == (2,)


def test_policy_none_runs_one_request_at_a_time_start_to_finish():
    p = make_policy("none", ORDER)
    p.add(lane(1, 1, "m/a", 2, arrival=0.0))
    p.add(lane(2, 1, "m/a", 1, arrival=0.0))  # a request with two rows
    p.add(lane(3, 2, "m/a", 1, arrival=0.1))
    requests = []
    while p.has_work():
        batch = p.next_batch(1.0)
        rids = {p._lanes[i].request_id for i in real(batch)}
        assert len(rids) == 1
        requests.append(rids.pop())
        for l in p.complete(batch):
            if l.cell_type == "m/a" and not any(x.request_id == l.request_id and x.cell_type == "m/a"
                                                for x in p._lanes.values()):
                p.add(lane(10 + l.request_id, l.request_id, "m/b", 2, arrival=l.arrival))
    # request 1 runs both of its layers before request 2 starts
    assert requests == [1, 1, 1, 1, 2, 2, 2]


# ---------------------------------------------------------------- property test

MODELS = {  # model -> stages; a stage is the cell types whose lanes start together
    "m": [["m/l0"], ["m/l1"]],
    "bi": [["bi/l0/0", "bi/l0/1"], ["bi/l1/0", "bi/l1/1"]],
    "dec": [["dec/enc"], ["dec/dec"]],
}
CELL_ORDER = {name: [t for stage in stages for t in stage] for name, stages in MODELS.items()}

request_strategy = st.fixed_dictionaries({
    "model": st.sampled_from(sorted(MODELS)),
    "rows": st.integers(1, 2),
    "length": st.integers(1, 6),
    "decode_len": st.integers(1, 5),  # steps until an open-ended lane reports its end
    "priority": st.integers(0, 2),
    "deadline": st.one_of(st.just(INF), st.floats(0.0, 10.0)),
    "arrives_at": st.integers(0, 12),  # scheduling iteration
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_name=st.sampled_from(["cellular", "cellular-edf", "padded", "none"]), max_batch=st.integers(1, 4),
       requests=st.lists(request_strategy, min_size=1, max_size=8))
def test_every_lane_runs_exactly_its_length_and_finishes_once(policy_name, max_batch, requests):
    policy = make_policy(policy_name, CELL_ORDER, max_batch, batch_timeout_s=0.003)
    max_batch = policy.max_batch  # "none" is always 1
    lanes: dict[int, Lane] = {}
    target: dict[int, int] = {}  # lane id -> steps it must run
    stage_of = {rid: 0 for rid in range(len(requests))}
    open_lanes: dict[int, set[int]] = {}
    steps_run: dict[int, int] = {}
    finished: list[int] = []
    ids = iter(range(1, 10**6))
    now = 0.0

    def start_stage(rid):
        r = requests[rid]
        stage = MODELS[r["model"]][stage_of[rid]]
        open_lanes[rid] = set()
        for cell_type in stage:
            for row in range(r["rows"]):
                lid = next(ids)
                decoder = cell_type.endswith("/dec")
                length = None if decoder else r["length"]
                stride = 0 if decoder else (-1 if cell_type.endswith("/1") else 1)
                l = lane(lid, rid, cell_type, length, deadline=r["deadline"], priority=r["priority"],
                         arrival=r["arrives_at"] * 0.001, stride=stride)
                lanes[lid] = l
                target[lid] = r["decode_len"] if decoder else r["length"]
                steps_run[lid] = 0
                open_lanes[rid].add(lid)
                policy.add(l)

    pending = sorted(range(len(requests)), key=lambda i: requests[i]["arrives_at"])
    for iteration in range(10_000):
        while pending and requests[pending[0]]["arrives_at"] <= iteration:
            start_stage(pending.pop(0))
        if not policy.has_work():
            if not pending:
                break
            now += 0.001
            continue
        batch = policy.next_batch(now)
        if batch is None:
            assert not policy_name.startswith("cellular"), "cellular must always run when it has lanes"
            wake = policy.wake_at(now)
            assert wake is not None and wake > now, "an idle padded policy must say when to look again"
            now = min(wake, now + 0.001) if pending else wake
            continue
        real_ids = real(batch)
        assert len(real_ids) == len(set(real_ids)), "a lane twice in one batch"
        if policy_name.startswith("cellular"):
            assert len(real_ids) <= max_batch
        else:  # padded's max_batch counts requests (a request with two rows brings two lanes)
            assert len({lanes[i].request_id for i in real_ids}) <= max_batch
        assert len(batch.slots) == len(batch.rows) == len(batch.strides) == batch.size
        if policy_name.startswith("cellular"):
            assert len(real_ids) == batch.size, "cellular never pads"
        for i, s, r, d in zip(batch.lane_ids, batch.slots, batch.rows, batch.strides):
            if i == -1:
                assert (s, r, d) == (SCRATCH, SCRATCH, 0)
                continue
            l = lanes[i]
            assert l.cell_type == batch.cell_type, "lanes of two cell types in one batch"
            assert s == l.slot
            base = 100 * i + (target[i] - 1 if l.stride < 0 else 0)
            assert r == base + l.stride * steps_run[i], "the batch row is not the lane's current step"
            steps_run[i] += 1
        if policy_name == "none":
            assert len({lanes[i].request_id for i in real_ids}) == 1
        ended = frozenset(i for i in real_ids if lanes[i].length is None and steps_run[i] == target[i])
        done = policy.complete(batch, ended)
        now += 0.001
        for l in done:
            finished.append(l.lane_id)
            rid = l.request_id
            open_lanes[rid].discard(l.lane_id)
            if not open_lanes[rid] and stage_of[rid] + 1 < len(MODELS[requests[rid]["model"]]):
                stage_of[rid] += 1
                start_stage(rid)
    else:
        pytest.fail("the policy did not drain its lanes")

    assert not policy.has_work() and not pending
    assert sorted(finished) == sorted(lanes), "every lane finishes exactly once"
    assert steps_run == target, "every lane runs exactly its length"
    assert all(stage_of[rid] == len(MODELS[r["model"]]) - 1 for rid, r in enumerate(requests))
