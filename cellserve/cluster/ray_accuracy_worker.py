"""The engine worker of `serve --ray --accuracy-scaling`: an EngineWorker whose models are the
zoo's family variants (graph/zoo/families.py), named as the variants, instead of zoo or
repository models. Everything else (the engine thread, load/unload with draining, snapshots)
is EngineWorker's."""

from __future__ import annotations

from cellserve.cluster.ray_worker import EngineWorker


class AccuracyWorker(EngineWorker):
    def _read_models(self, names: list[str]) -> list:
        from cellserve.cluster.ray_accuracy import served_variants

        try:
            return served_variants(names, self.spec.default_slo_ms)
        except KeyError as exc:
            raise ValueError(f"worker {self.spec.worker_id}: {exc.args[0]}") from None
