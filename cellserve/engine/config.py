"""The engine's configuration: typed, validated once when built."""

from __future__ import annotations

from dataclasses import dataclass

from cellserve.engine.scheduler import POLICIES
from cellserve.kernels.cell import BACKENDS


@dataclass
class EngineConfig:
    policy: str = "cellular"  # cellular | cellular-edf | padded | none
    max_batch: int | None = None  # per cell type; policy default when None
    batch_timeout_s: float = 0.005  # padded: wait this long after the oldest request
    device: str = "cpu"
    backend: str | None = None  # cell step: fused | onednn | blas | torch | None (the best for the device)
    admission: bool = True  # refuse a request whose predicted finish misses its deadline
    admission_headroom: float = 0.8  # admit only if predicted to finish within this share of its time
    drop_late: bool = True  # drop an admitted request that can no longer make its deadline
    default_timeout_s: float | None = None  # deadline for requests that set none
    max_active: int = 4096  # requests in the engine at once; more are refused
    profile: bool = True  # measure step costs at start-up to seed the cost model
    pin_threads: bool = True  # serve_forever pins the kernels' OpenMP threads, one per core (see kernels/affinity.py)
    stack_layers: bool = True  # step layers that feed each other as one cell type (see graph/stacking.py)

    def __post_init__(self) -> None:
        problems = []
        if self.policy not in POLICIES:
            problems.append(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.max_batch is not None and self.max_batch < 1:
            problems.append(f"max_batch must be >= 1, got {self.max_batch}")
        if self.batch_timeout_s < 0:
            problems.append(f"batch_timeout_s must be >= 0, got {self.batch_timeout_s}")
        if self.backend not in (None,) + BACKENDS:
            problems.append(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if not 0 < self.admission_headroom <= 1:
            problems.append(f"admission_headroom must be in (0, 1], got {self.admission_headroom}")
        if self.default_timeout_s is not None and self.default_timeout_s <= 0:
            problems.append(f"default_timeout_s must be > 0, got {self.default_timeout_s}")
        if self.max_active < 1:
            problems.append(f"max_active must be >= 1, got {self.max_active}")
        if problems:
            raise ValueError("invalid EngineConfig: " + "; ".join(problems))
