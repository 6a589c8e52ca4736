"""Triton's statistics extension: per model version, what it has done since the server started,
over HTTP (`GET /v2/models[/{m}[/versions/{v}]]/stats`, the JSON form) and gRPC
(`ModelStatistics`), as tritonclient's `get_inference_statistics` reads it.

No model named: every version of every model; a model without a version: all its versions.
Per version (ModelMetrics' plain counts, kept with the Prometheus series):
- `inference_count`: sequences answered in time (a request of batch B counts B);
  `execution_count`: batched cell steps run for the model (cellular batching runs a request
  over many steps, each shared with others: the ratio tells how well batching works);
- `inference_stats.success` / `.fail`: requests answered / answered with an error, and their
  end-to-end time from arrival at the server; `.queue`: of the requests answered (as Triton,
  successes only: not one the engine ran but answered 504), the time from arrival to
  admission; `.compute_infer`: from admission to answer. cellserve has
  no separate input and output phases: `compute_input` and `compute_output` are zero.
- `last_inference`: wall-clock milliseconds since the epoch of the last answer (0: none).
- `batch_stats` is empty: batches are formed per cell step, not per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from google.protobuf import json_format
from tritonclient.grpc import service_pb2

from cellserve.server.metrics import Duration, Metrics

EXTENSION = "statistics"
_ZERO = Duration()


def statistics(entries: Iterable, metrics: Metrics, executions: Mapping[str, int]) -> dict:
    """The statistics response for these ServedModels; `executions`: served model
    ("name:version") -> batched cell steps run for it (metrics.executions_by_model)."""
    stats = []
    for entry in entries:
        m = metrics.model(entry.name, entry.version)
        stats.append({
            "name": entry.name, "version": entry.version, "last_inference": m.last_inference_ms,
            "inference_count": m.rows, "execution_count": int(executions.get(f"{entry.name}:{entry.version}", 0)),
            "inference_stats": {"success": m.success_time.as_json(), "fail": m.fail_time.as_json(),
                                "queue": m.queue_time.as_json(), "compute_input": _ZERO.as_json(),
                                "compute_infer": m.compute_time.as_json(), "compute_output": _ZERO.as_json(),
                                "cache_hit": _ZERO.as_json(), "cache_miss": _ZERO.as_json()},
            "batch_stats": []})
    return {"model_stats": stats}


def statistics_message(response: dict) -> service_pb2.ModelStatisticsResponse:
    """The JSON form as gRPC's ModelStatisticsResponse."""
    return json_format.ParseDict(response, service_pb2.ModelStatisticsResponse())
