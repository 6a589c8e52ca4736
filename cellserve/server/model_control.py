"""Triton's model control mode EXPLICIT (a mixin of server.core.Core): the models of a
repository loaded and unloaded while serving, through the repository API.

A load reads the model's folder off the event loop and adds every version its config chooses
to the engine between two steps (`Engine.between_steps`: the engine's tables belong to its
stepping thread); an unload takes the model out of service at once, ends its sequences, lets
its requests already in the engine finish (`Engine.remove_model` refuses while any are queued
or in flight) and then removes it. Loads and unloads of one model run one at a time, in the
order asked. Core holds the state read here: `repository` (None: mode NONE, every load and
unload refused), `_models`, `engine`, `sequences`, `_changing` and `_load_errors`.
"""

from __future__ import annotations

import asyncio

from cellserve.errors import ModelLoadError
from cellserve.server.errors import BadRequest, NotFound
from cellserve.server.repository import load_repository_model, repository_models

_DRAIN_POLL_S = 0.01  # how often an unload looks again whether its model's requests are done


class ModelControl:
    """Core's loads and unloads (see the module docstring)."""

    async def load_model(self, name: str, unload: bool = False, parameters: dict | None = None) -> None:
        """Triton's repository load/unload. With model control (`repository`, --model-control-mode
        explicit): a load reads the model's folder now and adds every version to the engine
        between two steps (a model already served is unloaded first: a reload); an unload
        takes it out of service at once (a request is told it is not loaded, its sequences
        end), lets its requests in flight finish, then removes it from the engine. Without:
        refused, naming why."""
        action = "unload" if unload else "load"
        if self.repository is None:
            raise BadRequest(f"cannot {action} model {name!r}: this server serves the models it started with "
                             "(as Triton's model control mode NONE); start it with --model-control-mode explicit "
                             "to load and unload models while serving")
        # Triton's overrides (config, file:...) are refused, not silently dropped; unload_dependents
        # (tritonclient sends it with every unload) has nothing to act on: no model here has dependents
        overrides = sorted(set(parameters or {}) - ({"unload_dependents"} if unload else set()))
        if overrides:
            raise BadRequest(f"cannot {action} model {name!r} with parameters {overrides}: this server reads the "
                             "model from the repository as it is (no config or file overrides)")
        # one at a time per model, in the order asked (as Triton queues them)
        async with self._changing.setdefault(name, asyncio.Lock()):
            try:
                await (self._unload(name) if unload else self._load(name))
                self._load_errors.pop(name, None)
            except BadRequest as exc:
                if not unload:  # the index says why it is not served, until it loads or is unloaded
                    self._load_errors[name] = exc.message
                raise

    async def _load(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        try:  # reading and checking ONNX files takes a while: off the event loop
            served = await loop.run_in_executor(None, load_repository_model, self.repository, name)
        except ModelLoadError as exc:
            raise BadRequest(f"cannot load model {name!r}: {exc}") from None
        await self._unload(name)  # a reload: the old versions go first (nothing to do for a new model)

        def add() -> None:
            for entry in served:
                self.engine.add_model(entry.model)
        await asyncio.wrap_future(self.engine.between_steps(add))
        self._models[name] = {entry.version: entry for entry in served}

    async def _unload(self, name: str) -> None:
        versions = self._models.pop(name, None)  # from now on, a request for it is told it is not loaded
        if versions is None:
            if name not in repository_models(self.repository):
                raise NotFound(f"cannot unload model {name!r}: it is not in the model repository")
            return  # not loaded: nothing to do (as Triton answers)
        self.sequences.end_model(name, "ended: its model was unloaded")
        for entry in versions.values():
            while True:  # its requests in flight finish first (the engine refuses to remove it before)
                try:
                    await asyncio.wrap_future(self.engine.between_steps(
                        lambda engine_name=entry.engine_name: self.engine.remove_model(engine_name)))
                    break
                except ValueError:  # "has N requests queued or in flight"
                    await asyncio.sleep(_DRAIN_POLL_S)
