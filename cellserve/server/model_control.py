"""Triton's model control modes EXPLICIT and POLL (a mixin of server.core.Core): the models
of a repository loaded and unloaded while serving, through the repository API (EXPLICIT) or
as their folders change (POLL: `poll_repository`, called every --repository-poll-secs).

A load reads the model's folder off the event loop, adds every version its config chooses
to the engine between two steps (`Engine.between_steps`: the engine's tables belong to its
stepping thread) and runs its config's warm-up samples (server/warmup.py) before serving
them; an unload takes the model out of service at once, ends its sequences, lets
its requests already in the engine finish (`Engine.remove_model` refuses while any are queued
or in flight) and then removes it. Loads and unloads of one model run one at a time, in the
order asked. A reload serves the new versions as soon as they are added (beside the old
ones, under engine names of their own) and retires the old ones once their requests in flight
are answered: no request is told the model is not loaded, as Triton reloads without a loss
of availability. Core holds the state read here: `repository` (None: mode NONE, every load and
unload refused), `poll_s` (set: mode POLL, the API's loads and unloads refused),
`_fingerprints`, `_models`, `engine`, `sequences`, `_changing`, `_load_errors` and `_reloads`
(and its `count_sequences`).

A poll compares each model folder's files (names, sizes, modification times) with what the
last poll saw: a new folder loads, a changed one reloads (a reload that fails leaves the
versions served as they were, and says why in the index), a removed one unloads. A folder
that failed to load is tried again only once it changes again.
"""

from __future__ import annotations

import asyncio
import logging

from cellserve.errors import ModelLoadError
from cellserve.server.errors import BadRequest, NotFound
from cellserve.server.metrics import RELOAD_TAG
from cellserve.server.repository import load_repository_model, repository_fingerprints, repository_models
from cellserve.server.warmup import warm_up_while_serving

log = logging.getLogger(__name__)

_DRAIN_POLL_S = 0.01  # how often an unload looks again whether its model's requests are done


class ModelControl:
    """Core's loads and unloads (see the module docstring)."""

    async def load_model(self, name: str, unload: bool = False, parameters: dict | None = None) -> None:
        """Triton's repository load/unload. With model control (`repository`, --model-control-mode
        explicit): a load reads the model's folder now and adds every version to the engine
        between two steps (a model already served is reloaded: its new versions serve at once, the
        old ones finish their requests in flight); an unload
        takes it out of service at once (a request is told it is not loaded, its sequences
        end), lets its requests in flight finish, then removes it from the engine. Without
        model control, or when the server polls its repository (`poll_s`): refused, naming why."""
        action = "unload" if unload else "load"
        if self.repository is None:
            raise BadRequest(f"cannot {action} model {name!r}: this server serves the models it started with "
                             "(as Triton's model control mode NONE); start it with --model-control-mode explicit "
                             "to load and unload models while serving")
        if self.poll_s is not None:
            raise BadRequest(f"cannot {action} model {name!r}: this server polls its model repository "
                             f"(--model-control-mode poll, every {self.poll_s:g} s): add, change or remove the "
                             "model's folder to load, reload or unload it")
        # Triton's overrides (config, file:...) are refused, not silently dropped; unload_dependents
        # (tritonclient sends it with every unload) has nothing to act on: no model here has dependents
        overrides = sorted(set(parameters or {}) - ({"unload_dependents"} if unload else set()))
        if overrides:
            raise BadRequest(f"cannot {action} model {name!r} with parameters {overrides}: this server reads the "
                             "model from the repository as it is (no config or file overrides)")
        # A client that gives up (its deadline, a closed connection) or a server shutting down
        # does not cut a load or unload short: half done, the engine and the served models
        # would disagree. It goes on to its end; only the wait for it is cancelled.
        await asyncio.shield(self._change(name, unload, "asked through the repository API"))

    async def _change(self, name: str, unload: bool, cause: str) -> str:
        """Load (or reload) or unload `name`, one change of a model at a time, in the order
        asked (as Triton queues them); logged, with `cause`, and the log line returned. A
        failed load raises BadRequest (logged too), and the index shows why until the model
        loads or is unloaded."""
        async with self._changing.setdefault(name, asyncio.Lock()):
            served = name in self._models
            try:
                await (self._unload(name) if unload else self._load(name))
                self._load_errors.pop(name, None)
                done = ("unloaded" if served else "nothing to unload, not loaded") if unload else (
                    "reloaded" if served else "loaded")
                line = f"model {name!r} {done}: {cause}"
                log.info("%s", line)
                return line
            except BadRequest as exc:
                if unload:
                    raise
                message = exc.message + ("; the versions loaded before are still served" if served else "")
                log.error("%s (%s)", message, cause)
                self._load_errors[name] = message  # the index says why, until it loads or is unloaded
                raise BadRequest(message) from None

    async def _load(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        try:  # reading and checking ONNX files takes a while: off the event loop
            served = await loop.run_in_executor(None, load_repository_model, self.repository, name)
        except ModelLoadError as exc:
            raise BadRequest(f"cannot load model {name!r}: {exc}") from None
        old = self._models.get(name)
        if old is not None:  # a reload: the new versions are added beside the old under engine names of
            tag = next(self._reloads)  # their own, and take over at once (no request told "not loaded")
            for entry in served:
                entry.model.name = f"{entry.model.name}{RELOAD_TAG}{tag}"

        def add() -> None:
            for entry in served:  # a reloaded version takes its old self's learnt costs, if alike
                like = old.get(entry.version) if old is not None else None
                self.engine.add_model(entry.model, like=like.engine_name if like is not None else None)
        await asyncio.wrap_future(self.engine.between_steps(add))
        try:
            await self._warm_up(served)
        except BadRequest:  # the new versions never served: out of the engine again
            await self._retire(served, superseded=True)
            raise
        self._models[name] = {entry.version: entry for entry in served}
        if old is not None:  # the old versions' requests in flight finish on them; their sequences end
            self._end_sequences(name, old, "ended: its model was reloaded")
            await self._retire(old.values(), superseded=True)

    async def _warm_up(self, served) -> None:
        """The versions' config.pbtxt warm-up samples (server/warmup.py), run before the versions
        are served; BadRequest naming the sample that failed."""
        for entry in served:
            if not entry.warmup:
                continue
            started = self.clock.now()
            try:
                run = await warm_up_while_serving(self.engine, entry.engine_name, entry.warmup,
                                                  f"version {entry.version}")
            except ModelLoadError as exc:
                raise BadRequest(f"cannot load model {entry.name!r}: {exc}") from None
            log.info("model %r version %s warmed up: %d request(s) of %d model_warmup sample(s) in %.2f s",
                     entry.name, entry.version, run, len(entry.warmup), self.clock.now() - started)

    async def _unload(self, name: str) -> None:
        versions = self._models.pop(name, None)  # from now on, a request for it is told it is not loaded
        if versions is None:
            if name not in repository_models(self.repository):
                raise NotFound(f"cannot unload model {name!r}: it is not in the model repository")
            return  # not loaded: nothing to do (as Triton answers)
        self._end_sequences(name, versions, "ended: its model was unloaded")
        await self._retire(versions.values())

    def _end_sequences(self, name: str, versions, why: str) -> None:
        """End the model's sequences, and say so in its sequences gauge at once."""
        self.sequences.end_model(name, why)
        self.count_sequences(name, next(iter(versions)))

    async def _retire(self, entries, superseded: bool = False) -> None:
        """Remove versions no longer served from the engine once their requests in flight are
        answered (the engine refuses before). A superseded version's learnt step costs go too:
        its engine name is never served again."""
        for entry in entries:
            while True:
                try:
                    await asyncio.wrap_future(self.engine.between_steps(
                        lambda engine_name=entry.engine_name: self.engine.remove_model(
                            engine_name, forget_costs=superseded)))
                    break
                except ValueError:  # "has N requests queued or in flight"
                    await asyncio.sleep(_DRAIN_POLL_S)

    async def poll_repository(self) -> list[str]:
        """One look at the repository (mode POLL): load the models whose folders appeared,
        reload those that changed, unload those removed, since the last look (the first look
        is taken at start, `_fingerprints`). Returns what it did, one line per model (each
        logged by _change). A repository that cannot be read changes nothing (logged)."""
        loop = asyncio.get_running_loop()
        try:  # a folder's listing and its files' times: off the event loop
            seen = await loop.run_in_executor(None, repository_fingerprints, self.repository)
        except (ModelLoadError, OSError) as exc:
            log.error("polling the model repository: %s; the models served stay as they are", exc)
            return []
        done = []
        for name in sorted(set(seen) | set(self._fingerprints)):
            now, before = seen.get(name), self._fingerprints.get(name)
            if now == before:
                continue
            if now is None:
                del self._fingerprints[name]
                if name in self._models:  # shielded as load_model's: never cut short
                    done.append(await asyncio.shield(self._change(name, True, "its folder left the repository")))
                self._load_errors.pop(name, None)
            else:
                self._fingerprints[name] = now
                try:
                    done.append(await asyncio.shield(self._change(
                        name, False, f"its folder {'changed' if before is not None else 'appeared'}")))
                except BadRequest as exc:
                    done.append(exc.message)
        return done
