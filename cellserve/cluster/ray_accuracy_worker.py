"""The engine worker of `serve --ray --accuracy-scaling`: an EngineWorker whose models are the
zoo's family variants (graph/zoo/families.py), named as the variants, instead of zoo or
repository models. Everything else (the engine thread, load/unload with draining, snapshots)
is EngineWorker's.

At start, before it serves anything, the worker measures each of its variants' latency
profile l(b) on its idle engine (ray_accuracy_profile.measure_points: the family's typical
request at b = 1, 2, 4, ... to the batch cap) and keeps it: `snapshot()` carries it as
"variant_profiles" (variant -> [[b, ms], ...]), the same figures for the worker's life. The
driver reads them once, from the start-up snapshot, for its capacities."""

from __future__ import annotations

from cellserve.cluster.ray_worker import EngineWorker


class AccuracyWorker(EngineWorker):
    def __init__(self, spec):
        self._variants: dict[str, object] = {}  # variant -> its ServedModel (filled by _read_models)
        super().__init__(spec)
        self.variant_profiles = self._profile_variants()

    def _read_models(self, names: list[str]) -> list:
        from cellserve.cluster.ray_accuracy import served_variants

        try:
            served = served_variants(names, self.spec.default_slo_ms)
        except KeyError as exc:
            raise ValueError(f"worker {self.spec.worker_id}: {exc.args[0]}") from None
        self._variants.update({s.name: s for s in served})
        return served

    def _profile_variants(self) -> dict[str, list[tuple[int, float]]]:
        from cellserve.cluster.ray_accuracy_profile import ProfilingError, measure_points, typical_rows

        out = {}
        for name, served in sorted(self._variants.items()):
            model = served.model
            try:
                _, rows = typical_rows(model, max(self.engine.policy.max_batch, 1))
                out[name] = measure_points(self.engine, served.engine_name, model.inputs[0].name, rows)
            except ProfilingError as exc:
                raise ValueError(f"worker {self.spec.worker_id}: {exc}") from None
        return out

    def snapshot(self) -> dict:
        snap = super().snapshot()
        snap["variant_profiles"] = self.variant_profiles
        return snap
