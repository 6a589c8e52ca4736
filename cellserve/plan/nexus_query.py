"""Query analysis: a query's end-to-end SLO split among its models to minimise devices.

A query is a tree of models; a request passes root to leaf, so the shares of the SLO along
every root-to-leaf path must sum to at most the query's SLO. A node with share L and rate r
needs about r / T(L) devices, T(L) the best throughput of its model at a batch b with
2 * l(b) <= L (nexus.max_batch_for_slo). The split minimising the sum over nodes is found by
dynamic programming over the SLO cut into `grid` equal steps: f(node, t) = the fewest devices
for the node's subtree within t steps = min over s of cost(node, s) + sum over children of
f(child, t - s). Shares are whole steps, so the split is optimal on the grid and within one step
per node of the continuous optimum; O(nodes * grid^2).
"""

from __future__ import annotations

import bisect
import math

from cellserve.plan.nexus import Costs, Query, QueryNode

DEFAULT_GRID = 100
INF = math.inf


def best_throughput(table: tuple[float, ...]) -> list[float]:
    """[b] -> the best requests/s of any batch up to b (from a latency table; [0] = 0)."""
    out = [0.0]
    for b in range(1, len(table)):
        out.append(max(out[-1], b * 1000.0 / table[b]))
    return out


def split_query(query: Query, costs: Costs, grid: int = DEFAULT_GRID) -> dict[str, float] | None:
    """Model -> its share of the query's SLO (ms), minimising fractional devices; None when no
    split on the grid serves every node (the SLO is too tight for the path's batch-1 latencies)."""
    step = query.slo_ms / grid
    best: dict[str, list[float]] = {}

    def cost_row(node: QueryNode) -> list[float]:
        """cost[s]: devices for the node at share s steps (non-increasing in s)."""
        table = costs.table(node.model)
        if node.model not in best:
            best[node.model] = best_throughput(table)
        thr = best[node.model]
        row = [INF]
        for s in range(1, grid + 1):
            b = bisect.bisect_right(table, s * step / 2.0 + 1e-9, lo=1) - 1  # max_batch_for_slo
            row.append(node.rate_rps / thr[b] if b >= 1 else INF)
        return row

    choice: dict[int, list[int]] = {}  # id(node) -> [t] -> share chosen

    def solve(node: QueryNode) -> list[float]:
        below = [0.0] * (grid + 1)
        for child in node.children:
            f_child = solve(child)
            below = [a + b for a, b in zip(below, f_child)]
        cost = cost_row(node)
        f, pick = [INF] * (grid + 1), [0] * (grid + 1)
        for t in range(1, grid + 1):
            # smallest total first; ties go to the larger share for this node (the root takes slack)
            for s in range(t, 0, -1):
                v = cost[s] + below[t - s]
                if v < f[t] - 1e-12:
                    f[t], pick[t] = v, s
        choice[id(node)] = pick
        return f

    f_root = solve(query.root)
    if f_root[grid] == INF:
        return None
    split: dict[str, float] = {}

    def assign(node: QueryNode, t: int) -> None:
        s = choice[id(node)][t]
        split[node.model] = s * step
        for child in node.children:
            assign(child, t - s)
    assign(query.root, grid)
    return split


def path_budget_ok(query: Query, split: dict[str, float]) -> bool:
    """Every root-to-leaf path's shares sum to at most the query's SLO."""
    return all(sum(split[n.model] for n in path) <= query.slo_ms * (1 + 1e-9) for path in query.paths())
