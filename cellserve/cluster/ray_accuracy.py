"""Accuracy scaling on the Ray workers (`serve --ray --accuracy-scaling`), pure parts: no Ray.

What is served: variant families (graph/zoo/families.py). Clients send to a *family's* name;
each worker (a device of Proteus's problem, all of one type, "worker") hosts at most one
variant; every period the controller (plan/accuracy_control.AccuracyController) re-solves
Proteus's MILP on the demand measured at the frontends, and requests are routed by the plan's
weighted random shares. The driver's loop is ray_accuracy_loop.py, the request path
ray_accuracy_core.py; this module holds what they share:

- `resolve_families(names)`: which families `--model` names (a family's name serves all its
  variants, a variant's name that one with the others of its family left out; nothing: every
  family); anything else is an AccuracyScalingError naming it.
- `served_families` / `served_variants`: the frontends' entries (one per family, the metadata
  of its first variant under the family's name: every variant has the same inputs and
  outputs) and the workers' (one per variant, named as the variant).
- `build_problem`: the AccuracyProblem of a period: the live workers as devices, each
  variant's latency profile on a worker l(b) the fixed one of ray_accuracy_profile.py
  (measured alone at start, or from --accuracy-profiles files), so capacity is Proteus's rule: the
  best batch whose latency is at most half the family's SLO.
"""

from __future__ import annotations

from cellserve.plan.accuracy import AccuracyProblem, Device, Family, LatencyPoints, Variant

DEVICE_TYPE = "worker"


class AccuracyScalingError(ValueError):
    """Settings that cannot serve accuracy scaling; the message names what is wrong."""


def _known() -> str:
    from cellserve.graph.zoo import families

    return "; ".join(f"{f.name}: {', '.join(f.variant_names())}" for f in families.FAMILIES.values())


def resolve_families(names: list[str]) -> dict[str, list[str]]:
    """Family -> the variants to serve (in the family's order, smallest first)."""
    from cellserve.graph.zoo import families

    if not names:
        return {f.name: f.variant_names() for f in families.FAMILIES.values()}
    whole = [n for n in names if n in families.FAMILIES]
    for name in names:
        if name in families.VARIANTS and families.variant(name).family in whole:
            fam = families.variant(name).family
            raise AccuracyScalingError(f"--model {name!r} is a variant of family {fam!r}, which --model {fam!r} "
                                       "serves whole: name the family, or the variants to serve, not both")
    out: dict[str, list[str]] = {}
    for name in names:
        if name in families.FAMILIES:
            picked = families.FAMILIES[name].variant_names()
        elif name in families.VARIANTS:
            picked = [name]
        else:
            raise AccuracyScalingError(f"--accuracy-scaling serves variant families; --model {name!r} is neither a "
                                       f"family nor a variant of one (the families: {_known()})")
        fam = families.variant(picked[0]).family
        have = set(out.get(fam, [])) | set(picked)
        out[fam] = [v for v in families.FAMILIES[fam].variant_names() if v in have]
    return out


def served_families(fams: dict[str, list[str]], slo_ms: float | None) -> list:
    """The frontends' ServedModels: one per family, named as the family."""
    from cellserve.graph.zoo import families
    from cellserve.server.repository import ModelSettings, ServedModel

    out = []
    for fam, variants in fams.items():
        model = families.load(variants[0])
        model.name = f"{fam}:1"
        out.append(ServedModel(fam, "1", model, "cellserve_zoo", ModelSettings(
            default_timeout_s=slo_ms / 1e3 if slo_ms else None)))
    return out


def served_variants(names: list[str], slo_ms: float | None) -> list:
    """The workers' ServedModels: one per variant, named as the variant (KeyError for a name
    that is no variant)."""
    from cellserve.graph.zoo import families
    from cellserve.server.repository import ModelSettings, ServedModel

    out = []
    for name in names:
        model = families.load(name)
        model.name = f"{name}:1"
        out.append(ServedModel(name, "1", model, "cellserve_zoo", ModelSettings(
            default_timeout_s=slo_ms / 1e3 if slo_ms else None)))
    return out


def build_problem(fams: dict[str, list[str]], accuracy: dict[str, float], demand_rps: dict[str, float],
                  slo_ms: float, workers: list[str], profiles: dict[str, list[tuple[int, float]]],
                  headroom: float) -> AccuracyProblem:
    """Proteus's problem for this period. `profiles`: variant -> (batch, ms) points on a worker
    (a variant with none cannot be placed: its capacity is 0). Raises AccuracyScalingError for
    no live worker (there is nothing to plan onto)."""
    if not workers:
        raise AccuracyScalingError("no live worker to place variants on")
    families_ = {f: Family(f, float(demand_rps.get(f, 0.0)), tuple(Variant(v, accuracy[v]) for v in vs), slo_ms)
                 for f, vs in fams.items()}
    latency = {DEVICE_TYPE: {v: LatencyPoints(tuple(pts)) for v, pts in profiles.items() if pts}}
    return AccuracyProblem(families_, tuple(Device(w, DEVICE_TYPE) for w in sorted(workers)),
                           latency_ms=latency, headroom=headroom)
