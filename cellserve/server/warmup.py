"""Triton's model warm-up: a repository config's `model_warmup` samples, run through the
engine before the model is served, so that its first real requests do not pay for what a
fresh server does once (arenas grown to the sizes asked and their memory first touched, the
step cost model's first figures, lazily built kernels).

A sample, as Triton's ModelWarmup message gives it (a sample of batch_size 0 is skipped, and
one without a name is called by its place, "#0", as Triton does):

    model_warmup [{
      name: "long burst"
      batch_size: 16         # rows of each request (must be 1 when max_batch_size is 0)
      count: 2               # requests made of it, one after the other (0: one)
      inputs { key: "x" value { data_type: TYPE_FP32 dims: [500, 64] random_data: true } }
    }]

Every input of the model is given, with its data type and its dims (without the batch
dimension when max_batch_size > 0, as a config's dims are; then one row of data is repeated
`batch_size` times), filled with zeros (`zero_data`), random values (`random_data`: floats in
[0, 1), token ids within the input's vocabulary, other integers in [0, 100)) or the raw bytes of
a file in the model's `warmup/` folder (`input_data_file`, row-major, at least one row's
bytes; the first row's used). Inputs a config names as sequence_batching control inputs are
ignored (cellserve's sequences take no control tensors). A sample's shape is checked against
the input and the model's limits before its data is made, then the data as a request's
would be (token ranges, values); one that is wrong, or that the engine fails, fails the
model's load, naming the sample, as in Triton. `batch_size` N is one request of N rows. The
samples run one request at a time, before the server says it is ready (at start) or before
a loaded model is served (a load through the repository API or a poll). They are not counted as the model's inferences (its statistics'
successes and inference count, its metrics); the engine's executions include their steps.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from cellserve.engine.request import Request, Status
from cellserve.engine.validation import check_request_limits, validate_inputs
from cellserve.errors import InvalidInput, ModelLoadError
from cellserve.graph.model import Model
from cellserve.server.codec import datatype_of

log = logging.getLogger(__name__)

WARMUP_FOLDER = "warmup"  # beside config.pbtxt, as Triton keeps input_data_file's files
_RANDOM_INT_BOUND = 100  # random_data for an integer input without a vocabulary
# the most clock time one start-up warm-up request may take (a stuck engine raises sooner)
_START_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class WarmupSample:
    """One `model_warmup` entry, its inputs made: `count` requests of these arrays."""

    name: str
    inputs: dict[str, np.ndarray]
    count: int


def warmup_samples(config: mc.ModelConfig, model: Model, model_dir: Path, where: str) -> list[WarmupSample]:
    """The config's warm-up samples for `model` (one version of it), each checked as a
    request is; ModelLoadError naming the sample and what is wrong."""
    samples = []
    # Triton's sequence control tensors (START, END, ...) feed its sequence batcher, not the
    # model: a sample may give them, and they are left out here as cellserve sets no such input
    controls = {c.name for c in config.sequence_batching.control_input}
    for index, entry in enumerate(config.model_warmup):
        name = entry.name or f"#{index}"
        here = f"{where}: model_warmup {name!r}"
        batch = entry.batch_size
        if batch == 0:  # as Triton: a sample of batch 0 is skipped
            log.warning("%s: batch_size 0, skipped (as Triton skips it)", here)
            continue
        if config.max_batch_size == 0 and batch != 1:
            raise ModelLoadError(f"{here}: batch_size {batch} needs a model that batches (max_batch_size > 0); "
                                 "with max_batch_size 0 the dims are the whole shape and batch_size must be 1")
        if 0 < config.max_batch_size < batch:
            raise ModelLoadError(f"{here}: batch_size {batch} is more than max_batch_size {config.max_batch_size}")
        specs = {spec.name: spec for spec in model.inputs}
        unknown = sorted(set(entry.inputs) - set(specs) - controls)
        if unknown:
            raise ModelLoadError(f"{here}: inputs {unknown} are not the model's (its inputs: {sorted(specs)})")
        missing = sorted(set(specs) - set(entry.inputs))
        if missing:
            raise ModelLoadError(f"{here}: gives no data for inputs {missing}; a sample gives every input")
        rows = batch if config.max_batch_size > 0 else None
        for key in sorted(specs):  # the shape first: a sample is only made once it is one a request may have
            _check_shape(entry.inputs[key], specs[key], model, rows, f"{here}: input {key!r}")
        rng = np.random.default_rng(index)
        try:
            arrays = {key: _input(entry.inputs[key], specs[key], model, rows, model_dir, rng,
                                  f"{here}: input {key!r}") for key in sorted(specs)}
        except MemoryError:  # an input whose free dimensions the model does not bound
            raise ModelLoadError(f"{here}: its data does not fit in memory; give it smaller dims") from None
        try:
            arrays = validate_inputs(model, arrays)
        except InvalidInput as exc:
            raise ModelLoadError(f"{here}: {exc}") from None
        samples.append(WarmupSample(name, arrays, max(entry.count, 1)))
    return samples


def published_warmup(config: mc.ModelConfig) -> list[dict]:
    """The config's model_warmup as the published config echoes it (dims as integers, as the
    published input and output dims are)."""
    out = []
    for entry in config.model_warmup:
        inputs = {}
        for key, tensor in sorted(entry.inputs.items()):
            source = tensor.WhichOneof("input_data_type")
            inputs[key] = {"data_type": mc.DataType.Name(tensor.data_type), "dims": [int(d) for d in tensor.dims],
                           source: getattr(tensor, source)}
        out.append({"name": entry.name, "batch_size": entry.batch_size, "inputs": inputs, "count": entry.count})
    return out


def _check_shape(tensor, spec, model: Model, rows: int | None, where: str) -> None:
    """A sample's shape against the input's and the model's limits, before any data is made
    (a sample of 10^11 steps was allocated, 745 GiB, before it was checked)."""
    dims = [int(d) for d in tensor.dims]
    if any(d < 1 for d in dims):
        raise ModelLoadError(f"{where}: dims {dims} must all be sizes of 1 or more (a sample's shape is fixed)")
    shape = tuple(dims) if rows is None else (rows, *dims)
    if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape)):
        raise ModelLoadError(f"{where}: shape {list(shape)} (dims {dims}"
                             + (f" after batch_size {rows}" if rows is not None else "")
                             + f") does not fit the input's {list(spec.shape)} (-1: any size)")
    try:
        check_request_limits(model, spec.name, shape, "its shape")
    except InvalidInput as exc:
        raise ModelLoadError(f"{where}: {exc}") from None


def _input(tensor, spec, model: Model, rows: int | None, model_dir: Path, rng, where: str) -> np.ndarray:
    dims = [int(d) for d in tensor.dims]
    dtype = np.dtype(spec.dtype)
    declared = tensor.data_type
    want = f"TYPE_{datatype_of(dtype)}"
    if declared == mc.TYPE_INVALID:
        raise ModelLoadError(f"{where}: no data_type; the model's input is {want}")
    if mc.DataType.Name(declared) != want:
        raise ModelLoadError(f"{where}: data_type {mc.DataType.Name(declared)}; the model's input is {want}")
    source = tensor.WhichOneof("input_data_type")
    if source is None:
        raise ModelLoadError(f"{where}: says nothing of its data; set zero_data, random_data or input_data_file")
    if source == "zero_data":
        row = np.zeros(dims, dtype)
    elif source == "random_data":
        row = _random(dims, dtype, model, spec.name, rng)
    else:
        row = _from_file(tensor.input_data_file, dims, dtype, model_dir, where)
    return row if rows is None else np.ascontiguousarray(np.broadcast_to(row, (rows, *dims)))


def _random(dims: list[int], dtype: np.dtype, model: Model, name: str, rng) -> np.ndarray:
    if dtype.kind == "f":
        return rng.random(dims).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, dims).astype(bool)
    semantics = model.semantics.get(name)
    bound = semantics.vocab if semantics is not None and semantics.vocab else _RANDOM_INT_BOUND
    return rng.integers(0, bound, dims).astype(dtype)


def _from_file(filename: str, dims: list[int], dtype: np.dtype, model_dir: Path, where: str) -> np.ndarray:
    folder = model_dir / WARMUP_FOLDER
    path = folder / filename
    if not filename:
        raise ModelLoadError(f"{where}: input_data_file is empty; name a file in the model's {WARMUP_FOLDER}/ folder")
    if Path(filename).is_absolute() or ".." in Path(filename).parts:
        raise ModelLoadError(f"{where}: input_data_file {filename!r} must name a file in the model's "
                             f"{WARMUP_FOLDER}/ folder")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{where}: cannot read input_data_file {str(path)!r}: {exc.strerror or exc}") from None
    need = int(np.prod(dims)) * dtype.itemsize
    if len(data) < need:
        raise ModelLoadError(f"{where}: input_data_file {filename!r} holds {len(data)} bytes; dims {dims} of "
                             f"{datatype_of(dtype)} need {need}")
    return np.frombuffer(data[:need], dtype).reshape(dims).copy()


def warm_up_before_serving(engine, engine_name: str, samples: list[WarmupSample], where: str) -> int:
    """Run the samples through an engine that is not serving yet (start-up, before the server
    says it is ready): each request submitted and the engine stepped here until it answers,
    its kernel threads pinned as serving pins them.
    Returns the requests run; ModelLoadError naming the sample the engine failed."""
    run = 0
    with engine.kernel_threads_pinned():  # as they run while serving
        for sample in samples:
            for _ in range(sample.count):
                answers = []
                engine.submit(Request(engine_name, dict(sample.inputs), on_done=answers.append))
                engine.run_until_idle(timeout_s=_START_TIMEOUT_S)
                check_answer(answers[0], sample, where)
                run += 1
    return run


async def warm_up_while_serving(engine, engine_name: str, samples: list[WarmupSample], where: str) -> int:
    """Run the samples through an engine that is serving (a model loaded while it runs, not yet
    served to clients): one request at a time, each awaited on the running event loop. Returns
    the requests run; ModelLoadError naming the sample the engine failed."""
    loop = asyncio.get_running_loop()
    run = 0
    for sample in samples:
        for _ in range(sample.count):
            done = loop.create_future()

            def on_done(response, done=done) -> None:  # the engine thread
                if not loop.is_closed():  # closed: the server stopped, and no one waits for it
                    try:
                        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(response))
                    except RuntimeError:  # closed between the check and the call
                        pass
            engine.submit(Request(engine_name, dict(sample.inputs), on_done=on_done))
            check_answer(await done, sample, where)
            run += 1
    return run


def check_answer(response, sample: WarmupSample, where: str) -> None:
    """ModelLoadError naming the sample when the engine did not answer it."""
    if response.status is not Status.OK:
        raise ModelLoadError(f"{where}: model_warmup {sample.name!r} failed: {response.reason}")
