"""The engine's books on work in flight: a request being run (_Run), where each of its lanes
lives (_LaneRef), and a batch being executed (_Work). Plain records, shared by the step loop
(engine.py), admission (admission.py), the request's walk (walk.py) and the decoders' walk
(decoding.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cellserve.engine.beam import BeamLanes
from cellserve.engine.request import Request
from cellserve.executor.base import Executor
from cellserve.executor.batch import StepBatch
from cellserve.graph.model import Model
from cellserve.kernels.cell import LaneStorage


@dataclass(eq=False)
class _LaneRef:
    """Where one of a request's lanes lives, and where its results go."""

    cell_type: str
    executor: Executor
    storage: LaneStorage
    direction: int
    batch_index: int
    tokens: list[int] | None = None  # a decoder lane's output so far
    max_tokens: int = 0  # a decoder lane's most tokens (its spec's limit at its source length)
    source_length: int = 0  # a decoder lane's memory positions
    beam: BeamLanes | None = None  # a beam-search lane: its row (engine/beam.py)


@dataclass(eq=False)
class _Run:
    """A request in flight: its tensors, where it is in the program, its running lanes."""

    request: Request
    model: Model
    env: dict
    deadline: float
    rounds_plan: list[int]  # expected steps of each recurrent step of the program
    batch: int  # sequences in the request: lanes per cell type (per row, a decoder's beam width)
    pc: int = 0
    layer: int = 0  # recurrent steps of the program completed
    lanes: dict[int, _LaneRef] = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)  # of the current recurrent step: per layer name, or per decoder row
    state: dict = field(default_factory=dict)  # final (h, c) per layer, when the request asks
    admitted: float | None = None
    responded: bool = False
    probe: bool = False  # admitted by an idle engine against its estimate, to measure (see _admit)
    priced_s: float | None = None  # admission's predicted latency, when it priced the request
    waiting: int = 0  # lanes of the current recurrent step waiting for their busy executor to start them
    # with several executors: tensor name -> executors that computed it (none: the request's
    # inputs and the model's constants, on the host), and the (tensor, executor) moves counted
    producers: dict = field(default_factory=dict)
    moved: set = field(default_factory=set)
    extra_outputs: dict = field(default_factory=dict)  # response tensors beyond the model's (beam search)
    width: int = 1  # a decoder's lanes per row: the beam width it decodes with (engine/beam.py)
    lane_bytes: int = 0  # the lane storage admission counted it for (Engine._lane_bytes_held)
    # set from the fields above once made (__post_init__): the drop check reads them for every
    # run in flight, every check
    urgency: tuple = field(init=False, default=())  # (priority, deadline, arrival): most urgent first
    rounds_after: list[int] = field(init=False, default_factory=list)  # per recurrent step k: sum(rounds_plan[k + 1:])

    def __post_init__(self) -> None:
        self.urgency = (self.request.priority, self.deadline, self.request.arrival)
        after, total = [], 0
        for rounds in reversed(self.rounds_plan):
            after.append(total)
            total += rounds
        self.rounds_after = after[::-1]


@dataclass(eq=False)
class _Work:
    """A batch being run: the scheduler's StepBatch and where its lanes are now."""

    batch: StepBatch
    slots: np.ndarray
    rows: np.ndarray
    strides: np.ndarray
    started: float  # clock time the step began
    lanes_started: int  # the engine's counts (EngineStats) when it began: lanes started and finished,
    lanes_finished: int  # requests taken in and runs the drop check priced
    requests_taken: int = 0
    runs_checked: int = 0
    lone_steps: int = 0
    # of the time since `started`, the part spent admitting arrivals (and the drop check)
    # before the batch ran: per-request work, priced apart from the per-step overhead
    admitting_s: float = 0.0
