"""Time a model's first recurrent cell type on each threading of the fused step (OpenMP's team
of two, the elastic team, one thread) beside a burner process on core 1, with a busy gap or a
sleep between steps. A quick look at what `cellserve profile-versions` measures in full.

    .venv/bin/python scripts/version_steps.py lstm-512 0,0.25,0.5,1
"""

import sys
import time

import numpy as np

from cellserve.bench.burner import Burner
from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine
from cellserve.executor.versions import ThreadSwitch
from cellserve.server.repository import load_model

BATCHES = (1, 4, 16, 64)


def mean_step_us(executor, cell_type, batch: int, gap: str, seconds: float = 0.3) -> float:
    kernel = executor.kernels[cell_type]
    lanes = [executor.dummy_lane(cell_type, 32) for _ in range(batch)]
    slots = np.array([lane.slot for lane in lanes])
    rows = np.array([lane.base for lane in lanes])
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        kernel.step_batch(slots, rows)
        times.append(time.perf_counter() - t0)
        if gap == "busy":  # about the engine's own work per step under load
            t1 = time.perf_counter()
            while time.perf_counter() - t1 < 1e-4:
                pass
        else:  # light load: the workers go to sleep
            time.sleep(0.001)
    for lane in lanes:
        kernel.release(lane)
    return float(np.mean(times)) * 1e6


def main() -> None:
    model = load_model(sys.argv[1], None)
    duties = [float(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0.0, 0.5]
    engine = Engine([model], EngineConfig(profile=False, backend="fused"))
    executor = engine.executors["default"]
    cell_type = next(iter(executor.kernels))
    with executor.pinned(True):
        switch = ThreadSwitch(2, (0, 1))
        for duty in duties:
            with Burner(1, duty):
                for gap in ("busy", "sleep"):
                    cells = []
                    for version in ("openmp-2", "elastic-2", "openmp-1"):
                        switch.use(version)
                        cells.append(f"{version} " + " ".join(f"B{b}:{mean_step_us(executor, cell_type, b, gap):5.0f}"
                                                            for b in BATCHES))
                    print(f"burner {duty:.2f} gap {gap:5s} | " + " | ".join(cells), flush=True)
        switch.close()


if __name__ == "__main__":
    main()
