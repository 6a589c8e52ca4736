"""Cores shared by models (Veltair): how many cores each layer block, or each model, gets.

A *block* is one cell type (a layer, or a stack of layers stepped as one). Its step time on c
cores is modelled from two measurements, the mean step at 1 and at 2 threads of a
kernel-versions profile (`openmp-1`, `openmp-2`, no interference): Amdahl's law fitted per batch
size, t(c) = t1 * ((1 - p) + p / c) with p = 2 * (1 - t2 / t1), clamped to [0, 1]. Beyond two
threads that is an extrapolation (stated wherever its results are shown); a block never uses
more threads than it has panels of hidden units (kernels/cell.py: PANEL_UNITS).

The allocator gives every unit (a block, or a whole model: the granularity) one core, then
hands out the rest one at a time: to the unit whose predicted latency is the largest share of
its SLO share, unless one more core would cut that by less than MIN_GAIN (Amdahl's serial part:
more cores there are wasted), in which case to the unit a core helps most. Predicted latency of a request in a unit: its tokens times the step
time at a nominal batch, inflated by 1 / (1 - utilisation) (a queue's wait); a unit's SLO
share: the model's SLO split over its blocks by their 1-thread step times. Plain data in,
plain data out: the simulator (bench/tenancy_sim.py) re-runs it as measured rates move.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

NOMINAL_BATCH = 8  # the batch a unit's predictions assume (a loaded unit's typical batch)
MAX_UTILISATION = 0.95  # a unit predicted past this is priced as if at it (and gets cores first)
MIN_GAIN = 0.02  # a core that cuts the worst unit's predicted share by less goes where it helps most


@dataclass(frozen=True)
class Block:
    """One cell type of a model: mean seconds per step at 1 and 2 threads per batch size."""

    name: str
    batches: tuple[int, ...]
    one: tuple[float, ...]
    two: tuple[float, ...]
    max_threads: int = 1024  # panels of hidden units: more threads have nothing to take

    def __post_init__(self) -> None:
        if not self.batches or len(self.one) != len(self.batches) or len(self.two) != len(self.batches):
            raise ValueError(f"block {self.name!r}: one step time per batch size at 1 and at 2 threads")
        if list(self.batches) != sorted(set(self.batches)) or self.batches[0] < 1:
            raise ValueError(f"block {self.name!r}: batch sizes must ascend from 1 or more")
        if any(not x > 0 for x in self.one + self.two):
            raise ValueError(f"block {self.name!r}: step times must be > 0")

    def step_s(self, batch: int, cores: int) -> float:
        """Modelled seconds of one step of `batch` lanes on `cores` threads (see the module)."""
        t1, t2 = _lerp(self.batches, self.one, batch), _lerp(self.batches, self.two, batch)
        p = min(max(2.0 * (1.0 - t2 / t1), 0.0), 1.0)
        c = max(1, min(cores, self.max_threads))
        return t1 * ((1.0 - p) + p / c)


def _lerp(xs: tuple[int, ...], ys: tuple[float, ...], x: float) -> float:
    """ys at x, linear between the measured xs; past the last, per lane as there."""
    if x >= xs[-1]:
        return ys[-1] * x / xs[-1]
    if x <= xs[0]:
        return ys[0]
    hi = bisect.bisect_right(xs, x)
    w = (x - xs[hi - 1]) / (xs[hi] - xs[hi - 1])
    return (1 - w) * ys[hi - 1] + w * ys[hi]


@dataclass(frozen=True)
class Tenant:
    """A model served on the shared CPU: its blocks in the order a request runs them."""

    name: str
    blocks: tuple[Block, ...]
    slo_s: float
    mean_tokens: float

    def __post_init__(self) -> None:
        if not self.blocks or not self.slo_s > 0 or not self.mean_tokens > 0:
            raise ValueError(f"tenant {self.name!r}: needs blocks, an SLO > 0 and a mean length > 0")

    def request_core_s(self) -> float:
        """Core-seconds one request takes at the nominal batch on one thread, all blocks."""
        return self.mean_tokens * sum(b.step_s(NOMINAL_BATCH, 1) / NOMINAL_BATCH for b in self.blocks)


@dataclass(frozen=True)
class Unit:
    """What gets cores: one block of a tenant, or all of a tenant's blocks together."""

    tenant: int
    blocks: tuple[int, ...]  # indices into the tenant's blocks


def units_of(tenants: list[Tenant], granularity: str) -> list[Unit]:
    """One unit per block ("block") or per tenant ("model")."""
    if granularity == "block":
        return [Unit(i, (k,)) for i, t in enumerate(tenants) for k in range(len(t.blocks))]
    if granularity == "model":
        return [Unit(i, tuple(range(len(t.blocks)))) for i, t in enumerate(tenants)]
    raise ValueError(f"granularity must be block or model, got {granularity!r}")


def predicted_share(tenant: Tenant, unit: Unit, rate_rps: float, cores: int) -> float:
    """A request's predicted time in `unit` on `cores` over its share of the tenant's SLO."""
    blocks = [tenant.blocks[k] for k in unit.blocks]
    lane_step = sum(b.step_s(NOMINAL_BATCH, cores) for b in blocks)  # one step of each block, in turn
    utilisation = min(rate_rps * tenant.mean_tokens * lane_step / NOMINAL_BATCH, MAX_UTILISATION)
    latency = tenant.mean_tokens * lane_step / (1.0 - utilisation)
    weight = sum(b.step_s(NOMINAL_BATCH, 1) for b in blocks) / sum(b.step_s(NOMINAL_BATCH, 1) for b in tenant.blocks)
    return latency / (tenant.slo_s * weight)


def allocate(tenants: list[Tenant], units: list[Unit], rates_rps: list[float], cores: int) -> list[int]:
    """Cores per unit (each at least one, all `cores` given out; see the module)."""
    if cores < len(units):
        raise ValueError(f"{cores} cores for {len(units)} units: each needs one")
    given = [1] * len(units)

    def share(u: int, c: int) -> float:
        return predicted_share(tenants[units[u].tenant], units[u], rates_rps[units[u].tenant], c)

    for _ in range(cores - len(units)):
        now = [share(u, given[u]) for u in range(len(units))]
        gain = [now[u] - share(u, given[u] + 1) for u in range(len(units))]
        worst = max(range(len(units)), key=lambda u: (now[u], -u))
        pick = worst if gain[worst] >= MIN_GAIN * now[worst] else max(range(len(units)), key=lambda u: (gain[u], -u))
        given[pick] += 1
    return given


def capacity_rps(tenants: list[Tenant], cores: int) -> float:
    """Requests per second the cores carry at one thread per step and the nominal batch, the
    tenants' requests in equal numbers: the load scale of the simulated benchmark."""
    return cores / (sum(t.request_core_s() for t in tenants) / len(tenants))



def place_cores(sizes: list[int], shares: list[float], others: dict[int, float],
                current: list[tuple[int, ...]] | None = None, demand: list[float] | None = None,
                margin: float = 0.0) -> list[tuple[int, ...]]:
    """Which cores each unit gets, on a real CPU where other processes take some of them.

    `sizes`: cores per unit (`allocate`'s answer, or one each when there are more units than
    cores); `shares`: each unit's predicted share of its SLO (`predicted_share`: the larger, the
    tighter); `others`: per core, the load other processes put on it, in cores (0 to 1).
    The tightest unit chooses first and takes the quietest free cores, so a neighbour's core
    goes to the unit with the most slack. With more units than cores, the units left once every
    core is taken (the loosest) each share the core with the least load so far: its neighbours'
    plus the `demand` of the units already on it (per unit, the cores' worth of CPU it uses, as
    measured; None: a whole core each). A unit keeps its `current` cores unless others are
    quieter by more than `margin` cores (so that a meter's noise moves nothing); ties go to the
    current cores, then to the lower core."""
    if len(sizes) != len(shares):
        raise ValueError(f"{len(sizes)} sizes for {len(shares)} shares: one each")
    if not others:
        raise ValueError("place_cores needs at least one core")
    if any(n < 1 for n in sizes):
        raise ValueError(f"every unit needs one core or more, got {sizes}")
    if any(not 0 <= x <= 1 for x in others.values()):
        raise ValueError(f"others' load per core is 0 to 1 cores, got {others}")
    if current is not None and len(current) != len(sizes):
        raise ValueError(f"{len(current)} current placements for {len(sizes)} units: one each")
    if demand is not None and (len(demand) != len(sizes) or any(not x >= 0 for x in demand)):
        raise ValueError(f"demand is one load >= 0 per unit; got {demand} for {len(sizes)} units")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0 cores, got {margin}")
    use = list(demand) if demand is not None else [1.0] * len(sizes)
    free = sorted(others)
    if sum(sizes) > len(free) and any(n > 1 for n in sizes):
        raise ValueError(f"{sum(sizes)} cores asked of {len(free)}: more than one each only when all fit")
    load = dict(others)
    placed: list[tuple[int, ...]] = [()] * len(sizes)
    for u in sorted(range(len(sizes)), key=lambda u: (-shares[u], u)):
        had = set(current[u]) if current is not None else set()

        def key(c: int, level: dict[int, float]) -> tuple:
            return (level[c] - (margin if c in had else 0.0), c not in had, c)

        if len(free) >= sizes[u]:
            free.sort(key=lambda c: key(c, others))
            mine, free = free[:sizes[u]], free[sizes[u]:]
        else:
            mine = [min(load, key=lambda c: key(c, load))]
        for c in mine:
            load[c] += use[u] / len(mine)
        placed[u] = tuple(sorted(mine))
    return placed
