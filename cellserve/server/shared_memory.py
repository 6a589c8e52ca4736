"""Triton's system shared memory extension: a client on the same machine registers a POSIX
shared memory object (`/dev/shm/KEY`, as tritonclient.utils.shared_memory creates them) as a
named region, then names the region in a tensor's parameters instead of sending its bytes.

- Register: HTTP `POST /v2/systemsharedmemory/region/NAME/register` `{"key", "offset",
  "byte_size"}`, gRPC `SystemSharedMemoryRegister`; the region is bytes [offset, offset +
  byte_size) of the object, which must hold them. A name is registered once.
- Status: `GET /v2/systemsharedmemory[/region/NAME]/status`, gRPC `SystemSharedMemoryStatus`:
  `[{"name", "key", "offset", "byte_size"}]`.
- Unregister: `POST /v2/systemsharedmemory[/region/NAME]/unregister`, gRPC
  `SystemSharedMemoryUnregister` (no name: every region). A name not registered is no error
  (as Triton's: unregistering twice is safe). The name goes at once; a request already
  holding the region (an output to be written there) keeps it until it is answered, when the
  mapping goes with the last reference to it, as Triton unregisters a region in use once its
  requests complete.
- An input with parameters `shared_memory_region`, `shared_memory_byte_size` (and optionally
  `shared_memory_offset`, from the region's start) is read from the region when the request
  arrives (copied: the client may reuse the region at once). An output requested with them is
  written there once answered, to the region the name meant when the request arrived (a
  region unregistered or registered anew under the name meanwhile changes nothing for it),
  and answered with those parameters instead of its data.

CUDA shared memory is refused: this server has no GPU memory to share. Every error names the
region and what is wrong (HTTP 400, gRPC INVALID_ARGUMENT; an unknown region in a status call:
NOT_FOUND as Triton's).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field, replace

from cellserve.server.errors import BadRequest, NotFound

SHM_DIR = "/dev/shm"
TENSOR_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    memory: mmap.mmap

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


@dataclass(frozen=True)
class TensorPlace:
    """Where a tensor lies in a region: `byte_size` bytes from `offset` (within the region)."""

    region: str
    byte_size: int
    offset: int = 0
    # an output's region, held from the request's arrival to its answer (see output_place)
    held: Region | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class InSharedMemory:
    """An output answered in shared memory: what the response says in place of its data."""

    datatype: str
    shape: tuple[int, ...]
    place: TensorPlace
    byte_size: int  # the bytes written

    def parameters(self) -> dict:
        params = {"shared_memory_region": self.place.region, "shared_memory_byte_size": self.byte_size}
        if self.place.offset:
            params["shared_memory_offset"] = self.place.offset
        return params


def _int(value: object, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadRequest(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def tensor_place(parameters, where: str) -> TensorPlace | None:
    """The shared memory place a tensor's parameters name (None: they name none), checked.
    `parameters` maps names to plain values (HTTP's JSON; gRPC's, already unwrapped)."""
    if not any(key in parameters for key in TENSOR_PARAMS):
        return None
    region = parameters.get("shared_memory_region")
    if not isinstance(region, str) or not region:
        raise BadRequest(f"{where}: shared_memory_region must name a registered region, got {region!r}")
    if "shared_memory_byte_size" not in parameters:
        raise BadRequest(f"{where}: shared_memory_region needs shared_memory_byte_size")
    size = _int(parameters["shared_memory_byte_size"], f"{where}: shared_memory_byte_size", 0)
    offset = _int(parameters.get("shared_memory_offset", 0), f"{where}: shared_memory_offset", 0)
    return TensorPlace(region, size, offset)


class SystemSharedMemory:
    """The regions registered with this server (module docstring). Used from the frontends'
    event loop only."""

    def __init__(self, directory: str = SHM_DIR):
        self.directory = directory
        self._regions: dict[str, Region] = {}

    def register(self, name: object, key: object, offset: object, byte_size: object) -> None:
        if not isinstance(name, str) or not name:
            raise BadRequest(f"a shared memory region needs a name, got {name!r}")
        if not isinstance(key, str) or not key.strip("/") or "/" in key.strip("/") or key.strip("/") in (".", "..") \
                or "\0" in key:
            raise BadRequest(f"shared memory region {name!r}: key must name a POSIX shared memory object "
                             f"(as '/name'), got {key!r}")
        offset = _int(offset, f"shared memory region {name!r}: offset", 0)
        byte_size = _int(byte_size, f"shared memory region {name!r}: byte_size", 1)
        if name in self._regions:
            raise BadRequest(f"shared memory region {name!r} is already registered; unregister it first")
        path = os.path.join(self.directory, key.strip("/"))
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise BadRequest(f"shared memory region {name!r}: cannot open key {key!r}: "
                             f"{exc.strerror or exc}") from None
        try:
            length = os.fstat(fd).st_size
            if offset + byte_size > length:
                raise BadRequest(f"shared memory region {name!r}: offset {offset} + byte_size {byte_size} is past "
                                 f"the end of key {key!r}, which holds {length} bytes")
            memory = mmap.mmap(fd, length)
        finally:
            os.close(fd)
        self._regions[name] = Region(name, key, offset, byte_size, memory)

    def status(self, name: str = "") -> list[dict]:
        if name:
            return [self._region(name).status()]
        return [region.status() for region in self._regions.values()]

    def unregister(self, name: str = "") -> None:
        # not closed here: a request holding the region writes its answer there first, and
        # the mapping is unmapped with the last reference to it (mmap's own dealloc)
        if name:
            self._regions.pop(name, None)
        else:
            self._regions.clear()

    def read(self, place: TensorPlace, where: str) -> bytes:
        """A copy of the bytes at `place`."""
        region = self._within(place, where)
        start = region.offset + place.offset
        return region.memory[start:start + place.byte_size]

    def write(self, place: TensorPlace, data: bytes, where: str) -> None:
        """Put `data` at `place`, which must hold it: in the region it holds (output_place's),
        else in the one registered under its name now."""
        region = place.held or self._within(place, where)
        if len(data) > place.byte_size:
            raise BadRequest(f"{where}: the answer takes {len(data)} bytes, more than shared_memory_byte_size "
                             f"{place.byte_size}")
        start = region.offset + place.offset
        region.memory[start:start + len(data)] = data

    def close(self) -> None:
        self.unregister()

    def _region(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"no shared memory region {name!r} is registered"
                           + (f"; registered: {sorted(self._regions)}" if self._regions else ""))
        return region

    def output_place(self, parameters, where: str) -> TensorPlace | None:
        """Where a requested output's parameters ask it written (None: nowhere), checked
        against the regions now, before the request runs, and holding the region named: the
        answer goes there whatever is registered under the name by then."""
        place = tensor_place(parameters, where)
        if place is not None:
            place = replace(place, held=self._within(place, where))
        return place

    def _within(self, place: TensorPlace, where: str) -> Region:
        region = self._regions.get(place.region)
        if region is None:
            raise BadRequest(f"{where}: shared memory region {place.region!r} is not registered")
        if place.offset + place.byte_size > region.byte_size:
            raise BadRequest(f"{where}: shared_memory_offset {place.offset} + shared_memory_byte_size "
                             f"{place.byte_size} is past the end of region {place.region!r} "
                             f"({region.byte_size} bytes)")
        return region
