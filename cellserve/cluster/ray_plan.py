"""What the Ray workers serve: from the flags (N workers, each every model) or a Nexus plan.

Contracts:
- Flags: `workers` workers, each serving every served model.
- A plan (cellserve plan nexus's PLAN.json, plan/nexus_io.load_plan): one worker per device,
  serving the models of that device's sessions. Each model the plan places gets a rate gate
  at the sum of the rates its devices carry (what the plan serves), with room for a burst
  that arrives at that rate over the model's loosest SLO there; a served model the plan
  places nowhere is *unplanned* (refused 429, naming the plan's reason when it lists the
  model as unserved). A plan naming a model the server does not serve is refused
  (PlanMismatch, naming the device and session).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cellserve.cluster.ray_router import RateGate
from cellserve.plan.nexus import Plan


class PlanMismatch(ValueError):
    """The plan does not fit the models this server serves."""


@dataclass(frozen=True)
class Layout:
    workers: tuple[tuple[str, ...], ...]  # per worker, the models it serves
    gates: dict[str, RateGate]
    unplanned: dict[str, str]  # model -> why no worker serves it


def from_flags(models: list[str], workers: int) -> Layout:
    return Layout(tuple(tuple(models) for _ in range(workers)), {}, {})


def from_plan(plan: Plan, models: list[str], path: Path | str = "PLAN.json") -> Layout:
    served = set(models)
    workers, rates, slos = [], {}, {}
    for i, device in enumerate(plan.devices):
        names = []
        for j, a in enumerate(device.sessions):
            if a.model not in served:
                raise PlanMismatch(f"plan file '{path}': devices[{i}].sessions[{j}].model is {a.model!r}, which "
                                   f"this server does not serve (it serves {', '.join(sorted(served))})")
            if a.model not in names:
                names.append(a.model)
            rates[a.model] = rates.get(a.model, 0.0) + a.rate_rps
            slos[a.model] = max(slos.get(a.model, 0.0), a.slo_ms)
        workers.append(tuple(names))
    gates = {m: RateGate(rates[m], slos[m] / 1e3) for m in rates}
    reasons = {u.model: u.reason for u in plan.unserved}
    unplanned = {m: (f"unserved: {reasons[m]}" if m in reasons else "the plan places it on no device")
                 for m in sorted(served - set(rates))}
    return Layout(tuple(workers), gates, unplanned)
