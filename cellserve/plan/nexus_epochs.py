"""Epochs: when the next plan is due, and which sessions a re-plan moved.

Nexus re-plans every epoch (30 s), and early when a session's measured rate leaves
[0.8, 1.1] x the rate it was planned for; `nexus_pack.replan` makes the next plan, and
`moved_sessions` says what it moved (docs/planning.md, "Epochs").
"""

from __future__ import annotations

from cellserve.plan.nexus import Plan

EPOCH_S = 30.0
RATE_BAND = (0.8, 1.1)


def planned_rates(plan: Plan) -> dict[str, float]:
    """Session id -> the rate the plan was made for (on devices and unserved)."""
    rates: dict[str, float] = {}
    for dev in plan.devices:
        for a in dev.sessions:
            rates[a.id] = rates.get(a.id, 0.0) + a.rate_rps
    for u in plan.unserved:
        rates[u.id] = rates.get(u.id, 0.0) + u.rate_rps
    return rates


def replan_due(plan: Plan, measured_rps: dict[str, float], seconds_since_plan: float, epoch_s: float = EPOCH_S,
               band: tuple[float, float] = RATE_BAND, min_early_s: float = 10.0) -> str | None:
    """Why the next epoch should start now, or None: every `epoch_s`; earlier (but not within
    `min_early_s` of the last plan, as Nexus's code) when a session's measured rate leaves
    [band[0], band[1]] x its planned rate, or a session the plan lacks has traffic."""
    if seconds_since_plan >= epoch_s:
        return f"epoch: {seconds_since_plan:g} s since the last plan"
    if seconds_since_plan < min_early_s:
        return None
    planned = planned_rates(plan)
    for sid, rate in sorted(planned.items()):
        got = measured_rps.get(sid, 0.0)
        if not band[0] * rate <= got <= band[1] * rate:
            return f"session {sid!r}: measured {got:g} req/s, planned {rate:g} ({got / rate:.2f}x)"
    for sid, got in sorted(measured_rps.items()):
        if sid not in planned and got > 0:
            return f"session {sid!r}: {got:g} req/s and not in the plan"
    return None


def moved_sessions(old: Plan, new: Plan) -> set[str]:
    """Sessions of both plans that moved: taken off a device that keeps running, put onto a
    device that was running without them, or put onto a new device beside a session they shared
    no device with before. A unit's whole devices added or released (scaling out and in) are
    not moves."""
    before = {d.id: {a.id for a in d.sessions} for d in old.devices}
    after = {d.id: {a.id for a in d.sessions} for d in new.devices}
    partners: dict[str, set[str]] = {}
    for ids in before.values():
        for s in ids:
            partners.setdefault(s, set()).update(ids)
    both = (set().union(*before.values(), (u.id for u in old.unserved))
            & set().union(*after.values(), (u.id for u in new.unserved)))
    moved = set()
    for dev_id, ids in after.items():
        if dev_id in before:
            was = before[dev_id]
            moved |= (was - ids) | (ids - was)
        else:
            moved |= {s for s in ids if ids - partners.get(s, {s})}
    return moved & both
