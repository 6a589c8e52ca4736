"""How well each host model predicts the engine's time off the device, light load to overload.

For each model: the real engine (cellular, threads pinned as a server pins them) serves the
benchmark trace at SHARES of its closed-loop capacity (4 s each; requests carry a 200 ms
deadline past the light run, as the profiler's do), keeping every step's record
(EngineStats.step_records). Two fits of HostProfile on those records:
- "before": the four terms (per step, per lane, per lane started and finished) fitted to the
  light, busy and near-saturated runs only, as the profiler did up to schema version 2;
- "now": the six terms, with requests taken in and runs the drop check priced, fitted to the
  runs at the profiler's SERVING_SHARES (0.2, 0.6, 0.9, 1.3), as bench/profiler.py does now.
Each run's mean time off the device per step is then compared with each fit's mean
prediction over the same steps. The runs at 1.1 and 1.6 are fitted by neither.

    .venv/bin/python docs/results/sim/host_fit.py [--models lstm-512,gru-256,seq2seq-reverse]

writes docs/results/sim/host-fit/host-fit.json. Measured on this machine, like every figure
in docs/performance.md; nothing here is simulated.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cellserve import heap
from cellserve.bench.engine_runner import replay
from cellserve.bench.profiler import SERVING_SHARES, _fit_host, _nonnegative_lstsq, model_trace
from cellserve.bench.sim_bench import SimBenchConfig, _capacity, load_model, policy_config
from cellserve.engine.engine import Engine

SHARES = (0.2, 0.6, 0.9, 1.1, 1.3, 1.6)
BEFORE_SHARES = (0.2, 0.6, 0.9)
DEADLINE_S = 0.2
HERE = Path(__file__).resolve().parent


def measure(name: str) -> dict:
    model = load_model(name, None)
    capacity = _capacity(model, SimBenchConfig(model=name))
    engine = Engine([model], policy_config("cellular", 64))
    heap.settle()
    runs = {}
    with engine.executors["default"].pinned(engine.config.pin_threads):
        for share in SHARES:
            rate = capacity * share
            trace = model_trace(model, 1000, rate, 4.0)
            replay(engine, model.name, model.inputs[0].name, trace, "cellular", rate,
                   None if share == SHARES[0] else DEADLINE_S)
            runs[share] = np.array(engine.stats.step_records, dtype=np.float64)
    before = _fit_before(np.concatenate([runs[s] for s in BEFORE_SHARES]))
    now = _fit_host(np.concatenate([runs[s] for s in SERVING_SHARES]))
    coef_now = np.array([now.step_s, now.step_s_per_lane, now.lane_start_s, now.lane_finish_s, now.request_s,
                         now.check_s_per_run])
    rows = []
    for share, r in runs.items():
        x = np.column_stack([np.ones(len(r)), r[:, 1:6]])
        real, p_before, p_now = r[:, 0].mean(), (x[:, :4] @ before).mean(), (x @ coef_now).mean()
        rows.append({"share": share, "steps": len(r), "real_us": real * 1e6, "before_us": p_before * 1e6,
                     "now_us": p_now * 1e6, "before_error": (p_before - real) / real, "now_error": (p_now - real) / real,
                     "requests_taken_per_step": r[:, 4].mean(), "runs_checked_per_step": r[:, 5].mean()})
    return {"model": name, "capacity_rps": capacity, "before_us": [c * 1e6 for c in before],
            "now_us": [c * 1e6 for c in coef_now], "shares": rows}


def _fit_before(records: np.ndarray) -> np.ndarray:
    y = records[:, 0]
    keep = y <= np.percentile(y, 99)
    return _nonnegative_lstsq(np.column_stack([np.ones(len(records)), records[:, 1:4]])[keep], y[keep])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="lstm-512,gru-256,seq2seq-reverse")
    ap.add_argument("--json", type=Path, default=HERE / "host-fit" / "host-fit.json")
    args = ap.parse_args()
    report = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "deadline_s": DEADLINE_S,
              "terms": ["step", "per lane", "per lane started", "per lane finished", "per request taken in",
                        "per run a drop check prices"], "models": []}
    for name in args.models.split(","):
        m = measure(name)
        report["models"].append(m)
        print(f"{name}: capacity {m['capacity_rps']:.0f} req/s")
        for r in m["shares"]:
            print(f"  {r['share']:.1f}x: {r['steps']:6d} steps, off the device {r['real_us']:6.1f} us/step; "
                  f"before {r['before_us']:6.1f} ({r['before_error']:+.0%}), now {r['now_us']:6.1f} ({r['now_error']:+.0%})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
