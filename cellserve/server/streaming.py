"""A request answered as a stream: each token a decoder emits as it is produced, then the
final answer. Shared by gRPC's ModelStreamInfer (streaming_grpc.py) and HTTP's
generate_stream (streaming_http.py); the formats are in docs/streaming.md.

Contract of `TokenStream`: iterating it yields `Token`s (for a decoder model whose token
output the client asked for; per batch row in the order the row emitted them) and then
exactly one final item, the request's answer as `Core.infer` gives it (encoded where an
`encode` is given); a failed request raises its ServerError instead of the final item, after
the tokens sent before the failure. `close()` (always call it: a frontend's `finally`) cancels
a request still running: the core cancels it in the engine, whose next step releases its
lanes; an iteration still going then raises StreamClosed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from cellserve.server.core import Core, InferInput

class StreamClosed(Exception):
    """Raised by a TokenStream's iteration once `close()` cancelled its request."""


_END = object()  # the request's task is done: its result (or error) comes next


@dataclass(frozen=True)
class Token:
    """One token a decoder emitted: row `batch_index` of the request to model `model`
    version `version`, its `position`-th token (0 first), to be sent as tensor `output`."""

    model: str
    version: str
    output: str
    batch_index: int
    position: int
    token: int


def token_output(model) -> str | None:
    """The model output a decoder's tokens go to, or None when the model has no decoder
    whose output is one of the model's outputs (its answers are not streamed token by token)."""
    names = {spec.name for spec in model.outputs}
    for step in model.recurrent_steps():
        output = getattr(step, "output", None)  # decoders name their token output; layers do not
        if isinstance(output, str) and output in names:
            return output
    return None


class TokenStream:
    """One request's tokens, then its answer (see the module docstring). Starts the request
    at once, on the running loop."""

    def __init__(self, core: Core, request: InferInput, received: float, encode=None, tokens: bool = True):
        entry = core.model(request.model, request.version)  # NotFound before anything runs
        output = token_output(entry.model)
        # a classified output is answered whole (its classes), not as tokens of another type first
        wanted = (tokens and output is not None and (request.outputs is None or output in request.outputs)
                  and output not in request.classification)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._positions: dict[int, int] = {}
        on_tokens = None
        if wanted:
            def on_tokens(batch_index: int, token: int) -> None:  # the loop, in emission order
                position = self._positions.get(batch_index, 0)
                self._positions[batch_index] = position + 1
                self._queue.put_nowait(Token(entry.name, entry.version, output, batch_index, position, token))
        self._task = asyncio.ensure_future(core.infer(request, received, encode=encode, on_tokens=on_tokens))
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Future) -> None:
        if not task.cancelled():
            task.exception()  # retrieved here: a client gone before its error was read is not a loop warning
        self._queue.put_nowait(_END)

    def __aiter__(self):
        return self._events()

    async def _events(self):
        while True:
            item = await self._queue.get()
            if item is _END:
                break
            yield item
        if self._task.cancelled():
            raise StreamClosed("the request was cancelled: its client went away")
        yield self._task.result()  # the answer, or its ServerError raised

    def close(self) -> None:
        """Cancel the request if it still runs (the client went away, or the frontend stops)."""
        if not self._task.done():
            self._task.cancel()
