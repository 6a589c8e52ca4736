"""The message from the scheduler to an executor: which lanes step next, as plain ints."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepBatch:
    """One batched kernel call: lane i uses state slot slots[i] and row rows[i], and its
    row moves by strides[i] per step. Entries with lane id -1 are padding: they compute
    into the scratch slot and row.

    When a policy says it is `stable`, its next batch will be the same lanes one step
    further on, unless a lane finishes or one is added; the engine then runs the batch
    again without asking (see Engine.step)."""

    cell_type: str
    lane_ids: tuple[int, ...]
    slots: tuple[int, ...]
    rows: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.lane_ids)
