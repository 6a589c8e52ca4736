"""The kernel-thread governor's rule (executor/team.py), on a fake clock with given timings."""

from __future__ import annotations

from cellserve.executor.team import TeamGovernor, call_key


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def run(gov: TeamGovernor, clock: Clock, key, per_step: dict[int, float], calls: int, dt: float = 0.01) -> list[int]:
    """`calls` kernel calls of 10 steps, each team size taking `per_step[n]` a step."""
    chosen = []
    for _ in range(calls):
        n = gov.choose(key)
        chosen.append(n)
        gov.observe(key, n, per_step[n] * 10, 10)
        clock.t += dt
    return chosen


def test_one_thread_configured_means_no_choice():
    gov = TeamGovernor(full=1)
    assert gov.choose("k") == 1 and gov.sizes == (1,)


def test_the_faster_team_is_kept_and_the_other_retried_only_when_its_estimate_is_stale():
    clock = Clock()
    gov = TeamGovernor(full=2, explore_after_s=0.25, clock=clock)
    key = call_key("lstm", False, 8)
    chosen = run(gov, clock, key, {2: 40e-6, 1: 70e-6}, calls=100)  # an idle machine: the team wins
    assert chosen[:3] == [2, 1, 1]  # each measured once first (the call after a switch is not measured)
    assert gov.preferred(key) == 2
    retries = chosen[3:].count(1)
    # one retry (two calls: the switch, then the measured one) per 0.25 s of clock: 97 calls of 10 ms
    assert 6 <= retries <= 8, chosen


def test_a_team_slowed_by_contention_loses_within_a_few_calls_and_wins_back_when_it_ends():
    clock = Clock()
    gov = TeamGovernor(full=2, explore_after_s=0.1, clock=clock)
    key = call_key("gru", False, 16)
    run(gov, clock, key, {2: 40e-6, 1: 70e-6}, calls=50)
    assert gov.preferred(key) == 2
    # another process takes a core: the team's steps wait for a descheduled thread
    chosen = run(gov, clock, key, {2: 3e-3, 1: 75e-6}, calls=50)
    assert gov.preferred(key) == 1
    assert chosen[-30:].count(2) <= 6  # only the periodic retries: two calls each per 0.1 s
    run(gov, clock, key, {2: 40e-6, 1: 70e-6}, calls=60)  # the neighbour left
    assert gov.preferred(key) == 2


def test_kinds_of_call_are_judged_apart():
    clock = Clock()
    gov = TeamGovernor(full=4, clock=clock)
    small, large = call_key("lstm", False, 1), call_key("lstm", False, 64)
    run(gov, clock, small, {4: 30e-6, 1: 10e-6}, calls=5)  # one lane: the team's fork costs more than it saves
    run(gov, clock, large, {4: 50e-6, 1: 160e-6}, calls=5)
    assert gov.preferred(small) == 1 and gov.preferred(large) == 4


def test_the_call_after_a_switch_is_not_measured():
    """Threads woken from sleep make the first call of a grown team slow: a retry judged on it
    would never give the team back."""
    clock = Clock()
    gov = TeamGovernor(full=2, explore_after_s=0.1, clock=clock)
    key = call_key("lstm", False, 4)
    run(gov, clock, key, {2: 40e-6, 1: 70e-6}, calls=3)
    assert gov.preferred(key) == 2
    gov.observe(key, 1, 1.0, 10)  # a switch to one thread: a wildly slow first call is ignored
    gov.observe(key, 2, 1.0, 10)  # and so is the switch back
    assert gov.preferred(key) == 2
    gov.observe(key, 2, 20e-6 * 10, 10)  # measured: the same team as the call before
    assert gov._estimates[key][2].per_step_s < 40e-6


def test_call_keys_round_batch_sizes_up_to_powers_of_two():
    assert call_key("c", False, 1) == ("c", False, 1)
    assert call_key("c", False, 5) == call_key("c", False, 8) == ("c", False, 8)
    assert call_key("c", True, 9)[2] == 16
