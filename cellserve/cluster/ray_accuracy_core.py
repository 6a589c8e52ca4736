"""The request path of `serve --ray --accuracy-scaling`: a RayCore whose models are families.

Contracts (each request still gets exactly one answer, as RayCore's):
- A request names a family. It is counted for the family's measured demand (the
  controller's `observe`, once per row: a request of k rows is k lanes of work, and
  capacities count lanes; and the driver's RateMeter), then
  routed to a worker by weighted random choice from the applied plan's shares
  (`VariantRoutes.pick`), and sent there as a request of the variant that worker hosts.
- A plan's routes take effect only once applied (ray_accuracy_loop.py: after the chosen
  variants are loaded); until the first plan, and whenever the chosen worker is dead or
  does not have its planned variant loaded, the request goes to the live worker with a
  variant of the family loaded and the fewest requests outstanding (the most accurate
  variant first among equals). No such worker: 503 naming the family.
- A worker that dies with the request: it is sent once more, to another worker hosting a
  variant of the family (fallback rule); a second death is a 503 naming both.
- The answer carries the response parameter `variant`: the variant that computed it.
- Sequences are refused (the families are encoder-decoders: Core refuses them already).
"""

from __future__ import annotations

import contextvars
import random

from cellserve.cluster.ray_core import RayCore, WorkerDied
from cellserve.cluster.ray_router import time_length
from cellserve.cluster.ray_worker import Call
from cellserve.plan.accuracy_control import WeightedRouter
from cellserve.server.errors import Unavailable

_ANSWERED_BY: contextvars.ContextVar[str | None] = contextvars.ContextVar("cellserve_variant", default=None)


class VariantRoutes:
    """The applied plan: worker id -> the variant it hosts, and the plan's weighted router."""

    def __init__(self, placement: dict[str, str | None], router: WeightedRouter | None):
        self.placement, self.router = dict(placement), router

    def pick(self, family: str) -> str | None:
        return None if self.router is None else self.router.route(family)


class AccuracyCore(RayCore):
    def __init__(self, served, variants: dict[str, object], family_of: dict[str, str], accuracy: dict[str, float],
                 router, call, metrics, rng: random.Random | None = None, **kwargs):
        """`served`: the families' ServedModels (what clients see); `variants`: variant name ->
        its ServedModel (what workers run); `family_of`: variant -> family."""
        super().__init__(served, router, call, metrics, **kwargs)
        self.variants, self.family_of, self.accuracy = variants, family_of, accuracy
        self.rng = rng or random.Random()
        self.routes = VariantRoutes({}, None)
        self.controller = None  # the AccuracyController, once ray_accuracy_loop made it: observe() per row
        self.answered: dict[str, int] = {}  # variant -> requests it answered (metrics and tests)

    async def _infer(self, entry, request, received, on_tokens, finish):
        def labelled(result, timeout_s):  # the answer names the variant that gave it
            variant = _ANSWERED_BY.get()
            if variant is not None:
                result.parameters = {**result.parameters, "variant": variant}
            return finish(result, timeout_s)

        token = _ANSWERED_BY.set(None)
        try:
            return await super()._infer(entry, request, received, on_tokens, labelled)
        finally:
            _ANSWERED_BY.reset(token)

    async def _submit(self, entry, inputs: dict, timeout_s, priority, received, initial_state=None,
                      return_state=False, beam_width=None, return_beams=False):
        family = entry.name
        if self.meter is not None:
            self.meter.arrived(family, time_length(entry.model, inputs))
        lanes = entry.model.batch_size(inputs)
        if self.controller is not None:
            for _ in range(max(lanes, 1)):
                self.controller.observe(family)
        tried: list = []
        while True:
            worker, variant = self._choose_variant(family, tried)
            ventry = self.variants[variant]
            call = Call(ventry.engine_name, inputs, None, priority, beam_width=beam_width, return_beams=return_beams)
            try:
                reply = await self._send(ventry, worker, call, lanes, timeout_s, received)
            except WorkerDied as exc:
                self._after_death(worker, exc, tried)
                continue
            answer = self._answer(entry, reply)
            _ANSWERED_BY.set(variant)
            self.answered[variant] = self.answered.get(variant, 0) + 1
            return answer

    def _executions(self) -> dict[str, int]:
        """A family's batched cell steps: its variants' (profiling at start-up included)."""
        by_variant = super()._executions()
        out: dict[str, int] = {}
        for variant, ventry in self.variants.items():
            family = self.model(self.family_of[variant]).engine_name
            out[family] = out.get(family, 0) + by_variant.get(ventry.engine_name, 0)
        return out

    def _served_live(self, family: str) -> bool:
        return any(w.alive and any(self.family_of.get(v) == family for v in w.info.models)
                   for w in self.router.workers.values())

    def _choose_variant(self, family: str, tried: list):
        """(worker, variant): the plan's weighted choice, else the fallback (module docstring)."""
        workers = self.router.workers
        wid = self.routes.pick(family) if not tried else None
        if wid is not None:
            w, v = workers.get(wid), self.routes.placement.get(wid)
            if w is not None and w.alive and v is not None and v in w.info.models and self.family_of.get(v) == family:
                return w, v
        best = None
        for w in workers.values():
            if not w.alive or w in tried:
                continue
            for v in w.info.models:
                if self.family_of.get(v) != family:
                    continue
                key = (w.outstanding, -self.accuracy.get(v, 0.0), w.id)
                if best is None or key < best[0]:
                    best = (key, w, v)
        if best is None:
            why = f"{tried[0].describe()} died with this request, and no" if tried else "no"
            raise Unavailable(f"{why} live worker hosts a variant of family {family!r}")
        return best[1], best[2]
