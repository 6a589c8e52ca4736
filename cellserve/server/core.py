"""What both protocol frontends (HTTP and gRPC) call: health, metadata and inference.

The engine runs in the process's main thread; the frontends run on one asyncio loop in
another. `Core.infer` hands a request to the engine and awaits its one response, which the
engine thread passes back through `call_soon_threadsafe`. Sequences, parameters, deadlines,
admission and metrics are handled here, once, for both protocols.

A request's timeout is a promise, kept from its arrival at the server to its answer being
written: one the engine has not answered by its deadline, or whose encoded answer is ready
only after it, is answered DeadlineExceeded (504 / DEADLINE_EXCEEDED), never a late success.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cellserve import __version__
from cellserve.engine.clock import Clock, MonotonicClock
from cellserve.engine.beam import beams_outputs, optional_outputs
from cellserve.engine.engine import Engine
from cellserve.engine.request import Request, Response, Status
from cellserve.server.classification import check_classifiable, top_classes
from cellserve.server.codec import datatype_of, to_raw
from cellserve.server.errors import (BadRequest, DeadlineExceeded, NotFound, Overloaded, SequenceError,
                                     ServerError, TooLarge, Unavailable)
from cellserve.server.log_settings import ServerLog
from cellserve.server.metrics import Metrics, executions_by_model
from cellserve.server.model_config import model_config
from cellserve.server.model_control import ModelControl
from cellserve.server.repository import ServedModel, repository_models
from cellserve.server.sequences import SequenceStore
from cellserve.server.shared_memory import InSharedMemory, SystemSharedMemory, TensorPlace
from cellserve.server.tracing import Trace, Tracer

log = logging.getLogger(__name__)

# generate: docs/streaming.md; trace: docs/tracing.md; model_configuration: server/model_config.py
EXTENSIONS = ["binary_tensor_data", "classification", "sequence", "priority", "timeout", "generate", "trace",
              "model_configuration", "statistics", "model_repository", "logging", "system_shared_memory"]
# the largest unsigned 64-bit value: what the protocol's uint64 parameters may hold
_UINT64_MAX = (1 << 64) - 1
_EXPIRED = object()  # what a request's deadline timer resolves its engine future with
_VERDICT_GRACE_S = 0.005  # see Core._submit
# gRPC ends a call at the client's deadline; this server's clock, read a moment later or
# earlier, may put that end a hair before it
_CLIENT_DEADLINE_SLACK_S = 0.001


@dataclass
class InferInput:
    """A decoded inference request, whichever protocol it came by."""

    model: str
    version: str  # "" for the default (highest) version
    inputs: dict[str, np.ndarray]
    request_id: str = ""
    parameters: dict = field(default_factory=dict)
    outputs: list[str] | None = None  # requested output names; None for all
    classification: dict[str, int] = field(default_factory=dict)  # output -> top classes asked (classification.py)
    output_places: dict[str, TensorPlace] = field(default_factory=dict)  # outputs to shared memory (shared_memory.py)
    trace: Trace | None = None  # this request's timestamps, when the tracer sampled it (tracing.py)
    # the client's own deadline (a gRPC call's), seconds from arrival: the request's deadline when
    # it is shorter than its timeout parameter (or the model's default), so that admission and the
    # drop check keep it instead of running work no one will read
    client_timeout_s: float | None = None


@dataclass
class InferOutput:
    model: str
    version: str
    request_id: str
    outputs: dict[str, np.ndarray]
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RequestOptions:
    """The protocol's request parameters, checked."""

    sequence_id: int | str | None = None
    sequence_start: bool = False
    sequence_end: bool = False
    priority: int = 0
    timeout_us: int | None = None
    beam_width: int | None = None  # an encoder-decoder's beam width (None: its spec's)
    return_beams: bool = False  # the k best hypotheses and their scores as extra outputs

    @classmethod
    def parse(cls, params: dict) -> "RequestOptions":
        if not isinstance(params, dict):
            raise BadRequest(f"parameters must be an object, got {type(params).__name__}")
        seq = params.get("sequence_id")
        if seq is not None:
            if isinstance(seq, bool) or not isinstance(seq, (int, str)) or (isinstance(seq, int) and not
                                                                           0 <= seq <= _UINT64_MAX):
                raise BadRequest(f"parameter 'sequence_id' must be an integer in [0, 2**64 - 1] or a string, "
                                 f"got {seq!r}")
            if seq in (0, ""):
                seq = None  # tritonclient's "not a sequence"
                if params.get("sequence_start") is True or params.get("sequence_end") is True:
                    raise BadRequest(f"parameter 'sequence_id' {params['sequence_id']!r} means no sequence (as "
                                     "Triton reads it); give a sequence its own non-zero id")
        flags = {}
        for name in ("sequence_start", "sequence_end"):
            value = params.get(name, False)
            if not isinstance(value, bool):
                raise BadRequest(f"parameter {name!r} must be a boolean, got {value!r}")
            flags[name] = value
        if seq is None and (flags["sequence_start"] or flags["sequence_end"]):
            raise BadRequest("parameters 'sequence_start'/'sequence_end' need a 'sequence_id'")
        ints = {}
        for name in ("priority", "timeout"):
            value = params.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= _UINT64_MAX):
                raise BadRequest(f"parameter {name!r} must be an integer in [0, 2**64 - 1], got {value!r}")
            ints[name] = value
        beam_width = params.get("beam_width")
        if beam_width is not None and (isinstance(beam_width, bool) or not isinstance(beam_width, int)
                                       or beam_width < 1):
            raise BadRequest(f"parameter 'beam_width' must be an integer >= 1, got {beam_width!r}")
        return_beams = params.get("return_beams", False)
        if not isinstance(return_beams, bool):
            raise BadRequest(f"parameter 'return_beams' must be a boolean, got {return_beams!r}")
        return cls(seq, flags["sequence_start"], flags["sequence_end"], ints["priority"] or 0,
                   ints["timeout"] or None, beam_width, return_beams)


class Admission:
    """The bound on inference requests in flight, from when a request's headers arrive
    (before its body is read or decoded) until its answer is written; both frontends share it.

    Contract: `full()` is the cheap check a transport makes before it builds anything for a
    request; `enter()` takes a place (a ticket) or raises Overloaded; each ticket is handed
    back exactly once with `leave(ticket, outcome)`.

    The limit adapts between `floor` and `ceiling` (the --max-inflight bound) so that refusals
    happen here, where they cost a canned answer, instead of in the engine after a decode:
    - CONGESTED (the engine refused a request because of the work it already had, or dropped
      one, or its deadline passed), while at least CUT_SHARE of the recent answers (a moving
      average over about 1 / SHARE_WEIGHT of them) were congested and more than `floor`
      requests are in flight, cuts the limit to 90% of what is in flight, however far under
      the limit that is: what was in flight is what the engine could hold within deadlines.
      Only a request that entered after the last cut can cut again, so one burst of refusals
      caused by the old limit cuts once, as TCP cuts once per window. A few refusals among
      many answers (an engine whose estimates spiked for a moment) do not cut: the bound is
      for an engine that refuses much of what reaches it. A refusal of a deadline too short
      even for an idle engine is not congestion (`Overloaded.congestion`), nor is one request
      alone missing its deadline;
    - OK while the limit is three-quarters used grows it by GROWTH / limit, so GROWTH places
      per limit's worth of answers;
    - QUIET_S without congestion at CUT_SHARE doubles it (checked when requests arrive), so
      that a limit cut in an overload that has ended stops refusing within a few QUIET_S, even
      requests that come all at once or carry no deadline. In a lasting overload the engine
      keeps refusing much of what the limit lets in, and the limit stays down.
    Without congestion (requests without deadlines) it stays at the ceiling.
    """

    OK, CONGESTED, OTHER = "ok", "congested", "other"
    GROWTH = 4.0
    QUIET_S = 0.5
    CUT_SHARE = 0.25
    SHARE_WEIGHT = 1 / 32

    def __init__(self, ceiling: int = 4096, floor: int = 8, clock: Clock | None = None):
        self.ceiling, self.floor = ceiling, min(floor, ceiling)
        self.limit = float(ceiling)
        self.in_flight = 0
        self.shed = 0  # refused here, by enter() or by a transport that saw full()
        self.cuts = 0
        self._issued = 0  # tickets handed out
        self._cut_after = 0  # tickets up to this one entered before the last cut
        self._clock = clock or MonotonicClock()
        self._quiet_since = 0.0  # the last congestion, or the last doubling since
        self.congested_share = 0.0  # moving average of answers that were CONGESTED (OK: 0)

    def configure(self, ceiling: int) -> None:
        self.ceiling, self.floor = ceiling, min(self.floor, ceiling)
        self.limit = min(self.limit, float(ceiling)) if self.cuts else float(ceiling)

    def full(self) -> bool:
        if self.in_flight >= int(self.limit):
            self.recover()
        return self.in_flight >= int(self.limit)

    def recover(self) -> None:
        """Apply the doublings owed for quiet time since the last congestion (the frontends'
        loop only: it changes the bound)."""
        self.limit, self._quiet_since = self._owed()

    def limit_now(self) -> float:
        """The limit with the doublings owed so far (read-only: for a scrape from any thread)."""
        return self._owed()[0]

    def _owed(self) -> tuple[float, float]:
        if self.limit >= self.ceiling:
            return self.limit, self._quiet_since
        quiet = int((self._clock.now() - self._quiet_since) / self.QUIET_S)
        if quiet <= 0:
            return self.limit, self._quiet_since
        return min(float(self.ceiling), self.limit * 2.0 ** min(quiet, 64)), self._quiet_since + quiet * self.QUIET_S

    def refusal(self) -> str:
        """The message of a refusal here: what is full, and by which bound."""
        return (f"queue full: {self.in_flight} requests in flight, at the server's limit of {int(self.limit)} "
                f"(adapted to what the engine keeps up with; at most {self.ceiling}, --max-inflight); retry later")

    def enter(self) -> int:
        if self.full():
            self.shed += 1
            raise Overloaded(self.refusal())
        self.in_flight += 1
        self._issued += 1
        return self._issued

    def leave(self, ticket: int, outcome: str) -> None:
        in_flight = self.in_flight
        self.in_flight -= 1
        if outcome != self.OTHER:
            self.congested_share += self.SHARE_WEIGHT * ((outcome == self.CONGESTED) - self.congested_share)
        if outcome == self.CONGESTED and self.congested_share >= self.CUT_SHARE:
            self._quiet_since = self._clock.now()
            if ticket > self._cut_after and in_flight > self.floor:
                self.limit = max(float(self.floor), 0.9 * min(self.limit, in_flight))
                self._cut_after = self._issued
                self.cuts += 1
        elif outcome == self.OK and in_flight >= 0.75 * self.limit:
            self.limit = min(float(self.ceiling), self.limit + self.GROWTH / self.limit)

    @staticmethod
    def outcome(exc: BaseException | None) -> str:
        """How an inference that ended with `exc` (None: answered) counts for the limit."""
        if exc is None:
            return Admission.OK
        if isinstance(exc, DeadlineExceeded) or (isinstance(exc, Overloaded) and exc.congestion):
            return Admission.CONGESTED
        return Admission.OTHER


class Core(ModelControl):
    def __init__(self, served: list[ServedModel], engine: Engine, metrics: Metrics,
                 sequence_idle_s: float = 60.0, max_sequences: int = 100_000, clock: Clock | None = None,
                 tracer: Tracer | None = None, log: ServerLog | None = None, repository: Path | None = None,
                 poll_s: float | None = None, fingerprints: dict[str, tuple] | None = None):
        self.engine = engine
        # the deadline of requests that send none and whose model sets none (--default-timeout):
        # the engine's, which the wait for its answer must keep too (a RayCore's is set by its maker)
        self.default_timeout_s = engine.config.default_timeout_s if engine is not None else None
        # Triton's model control mode EXPLICIT (or POLL, with poll_s) when set: the repository
        # whose models load and unload while serving; None: the models are those it started with
        self.repository = repository
        # mode POLL when set (with `repository`): seconds between two polls of the repository;
        # its folders as the last poll (or the start, `fingerprints`) saw them (model_control.py)
        self.poll_s = poll_s
        self._fingerprints: dict[str, tuple] = dict(fingerprints or {})
        self._changing: dict[str, asyncio.Lock] = {}  # per model: its loads and unloads, one at a time
        self._load_errors: dict[str, str] = {}  # model -> why its last load failed (the index's reason)
        self._reloads = itertools.count(1)  # tags a reload's engine names (model_control.py)
        self.tracer = tracer or Tracer()  # Triton's trace extension; off unless configured
        self.log = log or ServerLog()  # Triton's logging extension (log_settings.py)
        self.shared_memory = SystemSharedMemory()  # regions clients registered (shared_memory.py)
        self.metrics = metrics
        # where the server reads time (deadlines, arrivals); the engine's clock unless a test
        # injects another
        self.clock = clock or engine.clock
        self.admission = Admission(clock=self.clock)
        self.sequence_idle_s = sequence_idle_s
        self.sequences = SequenceStore(max_sequences, clock=self.clock)
        self._models: dict[str, dict[str, ServedModel]] = {}
        for entry in served:
            self._models.setdefault(entry.name, {})[entry.version] = entry
        self.accepting = True  # False once shutdown began: new inference is refused
        # The hand-back of an answer from the engine thread to the asyncio loop, learned as
        # TCP learns round trips (a smoothed mean and mean deviation): the engine gets each
        # timeout less mean + 4 deviations, so that an answer in time there is in time here.
        self._handback_s = self._handback_dev_s = 0.0
        metrics.watch_deadline_margin(lambda: self.handback_margin_s)

    @property
    def handback_margin_s(self) -> float:
        """Seconds to take off each request's timeout before the engine schedules against it:
        the hand-back's smoothed mean plus four mean deviations (where a request is submitted,
        the engine still gets at least half its timeout)."""
        return self._handback_s + 4 * self._handback_dev_s

    # ---- health and metadata ----

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.accepting

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def model(self, name: str, version: str = "") -> ServedModel:
        versions = self._models.get(name)
        if versions is None:
            if self.repository is not None and name in repository_models(self.repository):
                if self.poll_s is None:
                    raise NotFound(f"model {name!r} is not loaded (load it: POST v2/repository/models/{name}/load)")
                raise NotFound(f"model {name!r} is not loaded: " + self._load_errors.get(
                    name, f"its folder is new to the repository, polled every {self.poll_s:g} s"))
            raise NotFound(f"unknown model {name!r}; this server serves "
                           f"{', '.join(self.model_names()) or 'no models'}")
        if not version:
            return versions[max(versions, key=int)]
        entry = versions.get(version)
        if entry is None:
            raise NotFound(f"unknown version {version!r} of model {name!r}; it has version(s) "
                           f"{', '.join(sorted(versions, key=int))}")
        return entry

    def model_ready(self, name: str, version: str = "") -> bool:
        self.model(name, version)
        return self.accepting

    def repository_index(self, ready_only: bool = False) -> list[dict]:
        """Triton's model repository extension, its index: every version served, READY or
        UNAVAILABLE (with why); `ready_only`: the READY ones."""
        index = []
        for entry in self._entries():
            ready = self.model_ready(entry.name, entry.version)
            if ready or not ready_only:
                # a served model whose last reload failed says so: its files on disk are not what it serves
                index.append({"name": entry.name, "version": entry.version,
                              "state": "READY" if ready else "UNAVAILABLE",
                              "reason": self._load_errors.get(entry.name, "") if ready
                              else self._why_unavailable(entry.name)})
        if self.repository is not None and not ready_only:  # model control: the repository's others too
            never = ("unloaded" if self.poll_s is None
                     else f"not loaded yet (the repository is polled every {self.poll_s:g} s)")
            unloaded = [{"name": name, "version": "", "state": "UNAVAILABLE",
                         "reason": self._load_errors.get(name, never)}
                        for name in repository_models(self.repository) if name not in self._models]
            index = sorted(index + unloaded, key=lambda e: e["name"])
        return index

    def _entries(self, name: str = "") -> list[ServedModel]:
        """Every version served of `name` (of every model when empty), in version order;
        NotFound for a model not served."""
        if name:
            self.model(name)
        return [self._models[n][v] for n in ([name] if name else self.model_names())
                for v in sorted(self._models[n], key=int)]

    def _idle_s(self, entry: ServedModel) -> float:
        """Seconds a sequence of the model may stay idle: its config's, else the server's."""
        return entry.settings.sequence_idle_s or self.sequence_idle_s

    def _why_unavailable(self, name: str) -> str:
        return "the server is shutting down"

    def model_statistics(self, name: str = "", version: str = "") -> dict:
        """Triton's statistics extension (server/statistics.py): every version of every model,
        or of `name`, or that one version."""
        from cellserve.server.statistics import statistics

        entries = [self.model(name, version)] if name and version else self._entries(name)
        return statistics(entries, self.metrics, self._executions())

    def _executions(self) -> dict[str, int]:
        """Batched cell steps run per engine model ("name:version")."""
        return executions_by_model(self.engine.stats.steps_by_type)

    def server_metadata(self) -> dict:
        return {"name": "cellserve", "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str = "") -> dict:
        entry = self.model(name, version)

        def tensors(specs):
            return [{"name": s.name, "datatype": datatype_of(s.dtype), "shape": list(s.shape)} for s in specs]

        versions = [entry.version] if version else [e.version for e in self._entries(name)]
        return {"name": name, "versions": versions, "platform": entry.platform,
                "inputs": tensors(entry.model.inputs), "outputs": tensors(entry.model.outputs)}

    def model_config(self, name: str, version: str = "") -> dict:
        """Triton's ModelConfig as JSON (server/model_config.py), with the model's published parameters."""
        entry = self.model(name, version)
        return model_config(name, entry.platform, entry.model, entry.parameters,
                            self._idle_s(entry), entry.max_batch_size, entry.label_files,
                            entry.dynamic_batching, entry.output_dims, entry.warmup_config)

    # ---- inference ----

    def failed_before_infer(self, entry: ServedModel, exc: ServerError, received: float) -> None:
        """Count a request to a served model that failed before `infer` (its body could not be
        read or parsed: a 400 like infer's own), as infer counts its failures."""
        self.metrics.model(entry.name, entry.version).failed(_reason(exc), self.clock.now() - received)

    async def infer(self, request: InferInput, received: float | None = None, encode=None, on_tokens=None):
        """Answer one request: its InferOutput, or `encode(output)` where given (the frontend's
        response, so that the deadline covers the encoding too). `received`: when it reached
        the server, on `self.clock` (default: now). Raises a ServerError to answer instead;
        DeadlineExceeded when its deadline passes before the answer is ready.

        `on_tokens(batch_index, token)`: called on this loop for each token a decoder emits,
        in order and before this returns (see streams_tokens). Cancelled (the client went
        away), the request is cancelled in the engine too: its lanes go at the next step."""
        if received is None:
            received = self.clock.now()
        trace = request.trace
        if trace is not None:
            trace.stamp("REQUEST_START")
        entry = self.model(request.model, request.version)
        metrics = self.metrics.model(entry.name, entry.version)
        if not self.accepting:  # before it counts as pending: one the metrics show arrived is served
            metrics.failed("unavailable", self.clock.now() - received)
            raise Unavailable("the server is shutting down")
        metrics.pending.inc()

        def finish(result: InferOutput, timeout_s: float | None):
            """The answer to send, or DeadlineExceeded: a sequence's state is kept only when this returns."""
            answer = result if encode is None else encode(result)
            if trace is not None:
                trace.stamp("REQUEST_END")
            if timeout_s is not None and self.clock.now() - received > timeout_s:
                metrics.slo_miss.inc()
                raise DeadlineExceeded(f"the answer was ready {(self.clock.now() - received) * 1e3:.1f} ms after "
                                       f"the request arrived, past its deadline of {timeout_s * 1e3:g} ms")
            return answer

        outcome = "error"  # for the verbose log: what the answer was
        try:
            answer = await self._infer(entry, request, received, on_tokens, finish)
            outcome = "ok"
        except ServerError as exc:
            metrics.failed(_reason(exc), self.clock.now() - received)
            outcome = f"{_reason(exc)}: {exc.message}"
            raise
        except asyncio.CancelledError:  # the client went away (a stream cancelled, a connection closed)
            waited = self.clock.now() - received
            if request.client_timeout_s is not None and waited >= request.client_timeout_s - _CLIENT_DEADLINE_SLACK_S:
                metrics.failed("dropped", waited)  # gRPC ended the call at the client's deadline: missed
                outcome = "dropped: the client's deadline passed"
            else:
                metrics.failed("cancelled", waited)
                outcome = "cancelled: the client went away"
            raise
        finally:
            metrics.pending.dec()
            if self.log.verbose:
                log.debug("infer %s version %s id %r: %s, %.3f ms in the server", entry.name, entry.version,
                          request.request_id, outcome, (self.clock.now() - received) * 1e3)
        metrics.answered(self.clock.now() - received)
        return answer

    @property
    def streams_tokens(self) -> bool:
        """Whether `infer`'s on_tokens is called: a core that submits elsewhere (RayCore's
        own _submit) gives only final answers unless it says otherwise."""
        return type(self)._submit is Core._submit

    async def _infer(self, entry: ServedModel, request: InferInput, received: float, on_tokens, finish):
        """Run the request and return `finish(InferOutput, timeout_s)`, which encodes the
        answer and raises DeadlineExceeded when it is late."""
        options = RequestOptions.parse(request.parameters)
        if request.outputs is not None:
            known = {s.name for s in entry.model.outputs} | optional_outputs(entry.model)
            unknown = [o for o in request.outputs if o not in known]
            if unknown:
                raise BadRequest(f"unknown output(s) {unknown} of model {entry.name!r}; it has {sorted(known)}")
            if not options.return_beams and beams_outputs(entry.model) & set(request.outputs):
                options = replace(options, return_beams=True)  # asking for the k best by name asks for them
        for name in request.classification:
            spec = next((s for s in entry.model.outputs if s.name == name), None)
            check_classifiable(spec, name, entry.name)
        timeout_s = options.timeout_us / 1e6 if options.timeout_us else (entry.settings.default_timeout_s
                                                                          or self.default_timeout_s)
        if request.client_timeout_s is not None and (timeout_s is None or request.client_timeout_s < timeout_s):
            timeout_s = request.client_timeout_s
        priority = options.priority or entry.settings.default_priority or (1 << 31)

        def output(response: Response):
            answer = finish(self._output(entry, request, options, response), timeout_s)
            # answered in time: its figures count (nothing between here and the answer can fail)
            self.metrics.model(entry.name, entry.version).inferred(
                entry.model.batch_size(request.inputs), response.queue_s, response.compute_s)
            return answer

        if options.sequence_id is not None:
            return await self._sequence_step(entry, request, options, timeout_s, priority, received, output)
        streaming = {"on_tokens": on_tokens} if on_tokens is not None and self.streams_tokens else {}
        if request.trace is not None and self.streams_tokens:  # a core that submits here: stamped
            streaming["trace"] = request.trace
        if options.beam_width is not None or options.return_beams:
            streaming.update(beam_width=options.beam_width, return_beams=options.return_beams)
        return output(await self._submit(entry, request.inputs, timeout_s, priority, received, **streaming))

    def _output(self, entry: ServedModel, request: InferInput, options: RequestOptions, response) -> InferOutput:
        outputs = response.outputs
        if request.outputs is not None:
            outputs = {name: outputs[name] for name in request.outputs}
        for name, k in request.classification.items():
            outputs[name] = top_classes(outputs[name], k, entry.labels.get(name))
        for name, place in request.output_places.items():  # written where the client asked
            array = np.asarray(outputs[name])
            data = to_raw(array)
            self.shared_memory.write(place, data, f"output {name!r}")
            outputs[name] = InSharedMemory(datatype_of(array.dtype), array.shape, place, len(data))
        parameters = {}
        if options.sequence_id is not None:
            parameters = {"sequence_id": options.sequence_id, "sequence_start": options.sequence_start,
                          "sequence_end": options.sequence_end}
        return InferOutput(entry.name, entry.version, request.request_id, outputs, parameters)

    async def _sequence_step(self, entry: ServedModel, request: InferInput, options: RequestOptions,
                             timeout_s, priority, received, output):
        """One chunk of a sequence, under its lock: `output(response)` (the answer, or it
        raises) decides whether the chunk counts. Only a chunk whose answer is sent changes
        the sequence: its state, its start (a failed first chunk leaves no sequence behind;
        a failed restart leaves the old one as it was) and its end."""
        why = entry.model.why_not_streamable()
        if why is not None:
            raise SequenceError(f"model {entry.name!r} cannot serve sequences: {why}")
        idle_s = self._idle_s(entry)
        key = (entry.name, entry.version, options.sequence_id)
        while True:  # a start that waited behind its id's previous sequence ending starts a new one
            sequence = self.sequences.get(key, options.sequence_start, idle_s)
            sequence.users += 1
            try:
                async with sequence.lock:  # chunks of one sequence run one after another
                    if not self.sequences.holds(sequence):  # it ended while this chunk waited
                        if options.sequence_start:
                            continue  # a fresh sequence under the same id
                        self.sequences.get(key, False, idle_s)  # raises, saying how it ended
                        raise SequenceError(f"{sequence.describe()} was restarted while this request waited")
                    if not options.sequence_start and not sequence.started:
                        raise SequenceError(f"{sequence.describe()} is not active: its first request must set "
                                            "sequence_start (and succeed)")
                    start_from = None if options.sequence_start else sequence.state
                    response, state = await self._sequence_chunk(entry, request, options, sequence, start_from,
                                                                 timeout_s, priority, received)
                    try:
                        answer = output(response)
                    except BaseException:
                        self._drop_state(state, kept=sequence.state)
                        raise
                    old, sequence.state = sequence.state, None if options.sequence_end else state
                    self.sequences.started(sequence)
                    self._replace_state(old, sequence.state)
                    if options.sequence_end:
                        self.sequences.end(sequence, "ended by sequence_end")
                    return answer
            finally:
                sequence.users -= 1
                sequence.last_used = self.sequences.clock.now()
                if sequence.users == 0 and not sequence.started:
                    self.sequences.forget(sequence)  # never started: as if it had not been asked for
                self.count_sequences(entry.name, entry.version)

    def count_sequences(self, name: str, version: str) -> None:
        """Set the model's sequences gauge (one per model, whatever the version) to its active
        sequences now."""
        self.metrics.model(name, version).sequences.set(self.sequences.count(name))

    async def _sequence_chunk(self, entry: ServedModel, request: InferInput, options: RequestOptions, sequence,
                              state, timeout_s, priority, received) -> tuple[Response, object]:
        """Run one chunk of `sequence` from `state` (None: the model's initial state): its
        answer and the state it ends in, which `_sequence_step` keeps only if the answer is
        sent. A failed chunk raises."""
        traced = {"trace": request.trace} if request.trace is not None and self.streams_tokens else {}
        response = await self._submit(entry, request.inputs, timeout_s, priority, received,
                                      initial_state=state, return_state=True, **traced)
        return response, response.state

    def _replace_state(self, old, new) -> None:
        """A sequence's state moved on from `old` to `new` (None: it ended); `old` is let go
        (here, on the host: nothing to do)."""

    def _drop_state(self, state, kept) -> None:
        """The state of a chunk that did not count is let go; `kept` is the sequence's (here,
        on the host: nothing to do)."""

    async def _submit(self, entry: ServedModel, inputs: dict, timeout_s, priority, received,
                      initial_state=None, return_state=False, on_tokens=None, trace: Trace | None = None,
                      beam_width: int | None = None, return_beams: bool = False) -> Response:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        engine_tokens = None
        if on_tokens is not None:
            def engine_tokens(batch_index: int, token: int) -> None:  # the engine thread
                # the same hand-back as on_done's, so every token is called before the answer
                if not loop.is_closed():
                    try:
                        loop.call_soon_threadsafe(_call_if_pending, done, on_tokens, batch_index, token)
                    except RuntimeError:  # closed between the check and the call
                        pass

        def on_done(response: Response) -> None:  # the engine thread
            if loop.is_closed():
                return  # the frontends stopped first: their shutdown answered this request (503)
            try:
                loop.call_soon_threadsafe(_resolve, done, response)
            except RuntimeError:  # closed between the check and the call
                pass

        margin = self.handback_margin_s
        engine_timeout = None if timeout_s is None else max(timeout_s - margin, timeout_s / 2)
        # the deadline runs from when the request reached the server, not the engine
        arrival = self.engine.clock.now() - (self.clock.now() - received)
        request = Request(entry.engine_name, inputs, on_done=on_done, timeout_s=engine_timeout,
                          priority=priority, arrival=arrival, initial_state=initial_state,
                          return_state=return_state, on_tokens=engine_tokens, trace=trace,
                          beam_width=beam_width, return_beams=return_beams)
        if trace is not None:
            trace.stamp("QUEUE_START")
        self.engine.submit(request)
        # Whatever the engine does (a GIL-starved step, an answer stuck behind others in the
        # hand-back), the client hears soon after its deadline; the engine's later answer is
        # ignored. The wait runs past the deadline by the hand-back margin (at least
        # _VERDICT_GRACE_S), so that the engine's refusal of a deadline too short to meet is
        # still answered as one (429, with its reason); a success that late is a 504 anyway.
        timer = None
        if timeout_s is not None:
            wait = received + timeout_s + max(margin, _VERDICT_GRACE_S) - self.clock.now()
            timer = loop.call_later(max(wait, 0.0), _resolve, done, _EXPIRED)
        try:
            response = await done
        except asyncio.CancelledError:  # the client went away: its lanes go at the engine's next step
            self.engine.cancel(request)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if trace is not None:
            trace.stamp("RESPONSE_ON_LOOP")  # the hand-back ends: this coroutine runs again
        if response is _EXPIRED:
            self.engine.cancel(request)  # no one waits for it any more: free its lanes
            self.metrics.model(entry.name, entry.version).slo_miss.inc()
            raise DeadlineExceeded(f"the engine had not answered when the deadline of {timeout_s * 1e3:g} ms "
                                   "passed (counted from the request's arrival at the server)")
        handback = max(self.engine.clock.now() - response.finish, 0.0)
        self._handback_dev_s += 0.25 * (abs(handback - self._handback_s) - self._handback_dev_s)
        self._handback_s += 0.125 * (handback - self._handback_s)
        if response.status is Status.OK:
            return response
        # the engine knows the model as "name:version": say it as the client does
        reason = response.reason.replace(repr(entry.engine_name), repr(entry.name))
        if response.status is Status.ERROR and not self.accepting:
            raise Unavailable(reason)  # answered by the shutdown, not failed
        if response.status is Status.REJECTED:
            raise Overloaded(reason, congestion=response.congestion)
        raise _ERRORS[response.status](reason)


def _resolve(future: asyncio.Future, response) -> None:
    if not future.done():
        future.set_result(response)


def _call_if_pending(future: asyncio.Future, callback, *args) -> None:
    """A token for a request still awaited (none after its deadline passed or it was cancelled)."""
    if not future.done():
        callback(*args)


_ERRORS = {Status.INVALID: BadRequest, Status.REJECTED: Overloaded, Status.DROPPED: DeadlineExceeded,
           Status.ERROR: ServerError, Status.CANCELLED: ServerError}


def _reason(exc: ServerError) -> str:
    return {BadRequest: "invalid", NotFound: "invalid", TooLarge: "invalid", SequenceError: "sequence",
            Overloaded: "rejected", DeadlineExceeded: "dropped", Unavailable: "unavailable"}.get(type(exc), "error")
