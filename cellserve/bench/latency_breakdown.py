"""Where a request's time goes: stages between the trace stamps of docs/tracing.md, as
percentiles and as shares of the client's end-to-end time (`cellserve bench latency`).

Contract: `breakdown(traces, client_s)` takes trace objects as tracing.read_trace_files returns
them (each with "timestamps" [{"name", "ns"}] and the client's "request_id") and the client's
end-to-end seconds by request id. A stage counts the requests whose trace holds both its
stamps; consecutive stages tile the server's time from its first stamp to its last, so their
means add up to the server's mean (over requests that have every stamp). A share is the
stage's mean over the mean client end-to-end time of the same traced requests that the client
timed (over the server's time when it timed none). Pure arithmetic: no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (stage, from stamp, to stamp), in the order a request meets them; "{recv}" and "{send}" are
# the protocol's first and last stamps
_ENGINE_SIDE = [
    ("decode", "{recv}", "REQUEST_START"),
    ("core: parameters, sequences", "REQUEST_START", "QUEUE_START"),
    ("hand-off + wake-up", "QUEUE_START", "ENGINE_ADMIT"),
    ("admission", "ENGINE_ADMIT", "COMPUTE_START"),
    ("plain ops before", "COMPUTE_START", "COMPUTE_INPUT_END"),
    ("projection", "COMPUTE_INPUT_END", "PROJECTION_END"),
    ("wait for a batch", "PROJECTION_END", "FIRST_STEP_START"),
    ("steps", "FIRST_STEP_START", "LAST_STEP_END"),
    ("read back", "LAST_STEP_END", "COMPUTE_OUTPUT_START"),
    ("plain ops after", "COMPUTE_OUTPUT_START", "PLAIN_OPS_END"),
    ("respond", "PLAIN_OPS_END", "COMPUTE_END"),
    ("hand-back", "COMPUTE_END", "RESPONSE_ON_LOOP"),
    ("encode", "RESPONSE_ON_LOOP", "REQUEST_END"),
]
PROTOCOL_STAMPS = {"http": ("HTTP_RECV_START", "HTTP_RECV_END", "HTTP_SEND_START", "HTTP_SEND_END"),
                   "grpc": ("GRPC_WAITREAD_END", "GRPC_WAITREAD_END", "GRPC_SEND_START", "GRPC_SEND_END")}


def stages(protocol: str) -> list[tuple[str, str, str]]:
    """The stages of a request over `protocol` ("http" or "grpc"), in order."""
    if protocol not in PROTOCOL_STAMPS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOL_STAMPS)}, got {protocol!r}")
    first, received, send_start, last = PROTOCOL_STAMPS[protocol]
    out = [("receive", first, received)] if first != received else []
    out += [(name, a.replace("{recv}", received), b) for name, a, b in _ENGINE_SIDE]
    out += [("frontend", "REQUEST_END", send_start), ("send", send_start, last)]
    return out


def protocol_of(trace: dict) -> str:
    names = {s["name"] for s in trace.get("timestamps", [])}
    return "grpc" if "GRPC_WAITREAD_END" in names else "http"


@dataclass
class Row:
    """One line of the breakdown: microseconds, and the share of the client's end-to-end mean."""

    stage: str
    start: str  # the stamp it runs from ("" for the client's own rows)
    end: str
    count: int
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    share: float | None  # of the client end-to-end mean; None when not defined


def _row(stage: str, start: str, end: str, values_s: list[float], reference_s: float | None) -> Row:
    if not values_s:
        return Row(stage, start, end, 0, float("nan"), float("nan"), float("nan"), float("nan"), None)
    us = np.asarray(values_s) * 1e6
    p50, p90, p99 = np.percentile(us, [50, 90, 99])
    mean = float(us.mean())
    share = mean / (reference_s * 1e6) if reference_s else None
    return Row(stage, start, end, len(us), float(p50), float(p90), float(p99), mean, share)


def breakdown(traces: list[dict], client_s: dict[str, float] | None = None,
              protocol: str | None = None) -> list[Row]:
    """Rows per stage, then the server's whole time, the client's end-to-end time and their
    difference (time outside the server: the network, the client's own work). Traces of
    another protocol than `protocol` (default: the first trace's) are left out."""
    client_s = client_s or {}
    if not traces:
        return []
    protocol = protocol or protocol_of(traces[0])
    chosen = [t for t in traces if protocol_of(t) == protocol]
    stamps = [{s["name"]: s["ns"] for s in t["timestamps"]} for t in chosen]
    first, last = PROTOCOL_STAMPS[protocol][0], PROTOCOL_STAMPS[protocol][3]
    server = {i: (st[last] - st[first]) / 1e9 for i, st in enumerate(stamps) if first in st and last in st}
    timed = [i for i, t in enumerate(chosen) if str(t.get("request_id", "")) in client_s]
    clients = [client_s[str(chosen[i]["request_id"])] for i in timed]
    reference = float(np.mean(clients)) if clients else (float(np.mean(list(server.values()))) if server else None)
    rows = []
    for name, a, b in stages(protocol):
        values = [(st[b] - st[a]) / 1e9 for st in stamps if a in st and b in st]
        rows.append(_row(name, a, b, values, reference))
    rows.append(_row(f"server ({first} -> {last})", first, last, list(server.values()), reference))
    if clients:
        rows.append(_row("client end-to-end", "", "", clients, reference))
        outside = [client_s[str(chosen[i]["request_id"])] - server[i] for i in timed if i in server]
        rows.append(_row("outside the server (client - server)", "", "", outside, reference))
    return rows


def format_table(rows: list[Row]) -> str:
    """The rows as a fixed-width table (microseconds, share in percent)."""
    width = max([len(r.stage) for r in rows] + [5])
    lines = [f"{'stage':<{width}}  {'n':>5}  {'p50 us':>9}  {'p90 us':>9}  {'p99 us':>9}  {'mean us':>9}  {'share':>6}"]
    for r in rows:
        share = f"{r.share * 100:5.1f}%" if r.share is not None else "     -"
        lines.append(f"{r.stage:<{width}}  {r.count:>5}  {r.p50_us:>9.1f}  {r.p90_us:>9.1f}  {r.p99_us:>9.1f}  "
                     f"{r.mean_us:>9.1f}  {share:>6}")
    return "\n".join(lines)


def format_markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table, for docs/performance.md."""
    lines = ["| stage | stamps | n | p50 us | p90 us | p99 us | mean us | share |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        span = f"{r.start} -> {r.end}" if r.start else ""
        share = f"{r.share * 100:.1f}%" if r.share is not None else "-"
        lines.append(f"| {r.stage} | {span} | {r.count} | {r.p50_us:.0f} | {r.p90_us:.0f} | {r.p99_us:.0f} | "
                     f"{r.mean_us:.0f} | {share} |")
    return "\n".join(lines)
