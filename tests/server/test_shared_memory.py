"""Triton's system shared memory extension (server/shared_memory.py) with tritonclient's own
shared memory module and clients, HTTP and gRPC, on the zoo server: inputs read from a region,
outputs written to one and answered with where, the regions' status and unregistering, and
every misuse refused naming the region and what is wrong. CUDA shared memory is refused."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from zoo_reference import token_reference

TOKENS = np.random.default_rng(3).integers(1, 5000, (2, 7)).astype(np.int64)
CLASSES = 8  # lstm-512's


class Regions:
    """Shared memory objects made for one test, unregistered and destroyed after it."""

    def __init__(self, client):
        self.client, self.handles, self.names = client, [], []

    def make(self, byte_size: int, register: bool = True) -> tuple[str, str, object]:
        name = f"test-{uuid.uuid4().hex[:8]}"
        key = f"/cellserve-{name}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        self.handles.append(handle)
        if register:
            self.client.register_system_shared_memory(name, key, byte_size)
            self.names.append(name)
        return name, key, handle

    def close(self) -> None:
        for name in self.names:
            try:
                self.client.unregister_system_shared_memory(name)
            except InferenceServerException:
                pass  # the test unregistered it itself
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)


@pytest.fixture(params=["http", "grpc"])
def client(request, zoo_server):
    module = httpclient if request.param == "http" else grpcclient
    with module.InferenceServerClient(zoo_server.http if request.param == "http" else zoo_server.grpc) as c:
        regions = Regions(c)
        yield module, c, regions
        regions.close()


def status(module, client, name: str = "") -> dict:
    """The server's regions by name: {name: (key, offset, byte_size)}."""
    if module is grpcclient:
        found = client.get_system_shared_memory_status(name, as_json=True).get("regions", {})
        return {n: (r["key"], int(r.get("offset", 0)), int(r["byte_size"])) for n, r in found.items()}
    return {r["name"]: (r["key"], r["offset"], r["byte_size"]) for r in client.get_system_shared_memory_status(name)}


def test_inputs_from_and_outputs_to_shared_memory(client):
    module, c, regions = client
    in_name, _, in_handle = regions.make(TOKENS.nbytes)
    out_bytes = TOKENS.shape[0] * CLASSES * 4
    out_name, _, out_handle = regions.make(out_bytes + 16)
    shm.set_shared_memory_region(in_handle, [TOKENS])
    tokens = module.InferInput("tokens", list(TOKENS.shape), "INT64")
    tokens.set_shared_memory(in_name, TOKENS.nbytes)
    probabilities = module.InferRequestedOutput("probabilities")
    probabilities.set_shared_memory(out_name, out_bytes, offset=16)
    label = module.InferRequestedOutput("label")
    result = c.infer("lstm-512", [tokens], outputs=[probabilities, label])

    described = result.get_output("probabilities")
    if module is grpcclient:
        params = {k: v.int64_param or v.string_param for k, v in described.parameters.items()}
        shape, datatype = list(described.shape), described.datatype
    else:
        params, shape, datatype = described["parameters"], described["shape"], described["datatype"]
    assert (shape, datatype) == ([2, CLASSES], "FP32")
    assert params == {"shared_memory_region": out_name, "shared_memory_byte_size": out_bytes,
                      "shared_memory_offset": 16}
    got = shm.get_contents_as_numpy(out_handle, np.float32, [2, CLASSES], offset=16)
    want = token_reference("lstm-512", TOKENS)
    np.testing.assert_allclose(got, want["probabilities"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), want["label"])  # beside it, as usual

    assert status(module, c, in_name) == {in_name: (f"/cellserve-{in_name}", 0, TOKENS.nbytes)}
    assert {in_name, out_name} <= set(status(module, c))
    c.unregister_system_shared_memory(in_name)
    assert in_name not in status(module, c) and out_name in status(module, c)
    with pytest.raises(InferenceServerException) as err:
        c.infer("lstm-512", [tokens])
    assert f"input 'tokens': shared memory region '{in_name}' is not registered" in err.value.message()


def test_misuse_is_refused_naming_the_region(client):
    module, c, regions = client
    name, key, handle = regions.make(64, register=False)
    for args, words in (((name, "/cellserve-no-such-key", 64), "cannot open key '/cellserve-no-such-key'"),
                        ((name, key, 65), "offset 0 + byte_size 65 is past the end of key"),
                        ((name, key, 64, 8), "offset 8 + byte_size 64 is past the end of key"),
                        ((name, "/../etc/passwd", 64), "key must name a POSIX shared memory object")):
        with pytest.raises(InferenceServerException) as err:
            c.register_system_shared_memory(*args)
        assert f"shared memory region '{name}'" in err.value.message() and words in err.value.message()
    c.register_system_shared_memory(name, key, 64)
    regions.names.append(name)
    with pytest.raises(InferenceServerException) as err:
        c.register_system_shared_memory(name, key, 64)
    assert f"shared memory region '{name}' is already registered" in err.value.message()

    shm.set_shared_memory_region(handle, [TOKENS[:1]])
    tokens = module.InferInput("tokens", [1, 7], "INT64")
    tokens.set_shared_memory(name, 48)  # 7 tokens are 56 bytes
    with pytest.raises(InferenceServerException) as err:
        c.infer("lstm-512", [tokens])
    assert "input 'tokens': shape [1, 7] of INT64 needs 56 bytes, got 48" in err.value.message()
    tokens.set_shared_memory(name, 56, offset=16)
    with pytest.raises(InferenceServerException) as err:
        c.infer("lstm-512", [tokens])
    assert f"shared_memory_offset 16 + shared_memory_byte_size 56 is past the end of region '{name}'" \
        in err.value.message()
    tokens = module.InferInput("tokens", [1, 7], "INT64")  # tritonclient keeps an offset once set
    tokens.set_shared_memory(name, 56)
    small = module.InferRequestedOutput("probabilities")
    small.set_shared_memory(name, 8)  # one row of 8 floats needs 32 bytes
    with pytest.raises(InferenceServerException) as err:
        c.infer("lstm-512", [tokens], outputs=[small])
    assert "output 'probabilities': the answer takes 32 bytes, more than shared_memory_byte_size 8" \
        in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        c.get_system_shared_memory_status("no-such-region")
    assert "no shared memory region 'no-such-region' is registered" in err.value.message()


def test_cuda_shared_memory_is_refused_saying_why(client):
    module, c, _ = client
    if module is grpcclient:
        assert not c.get_cuda_shared_memory_status(as_json=True).get("regions")
        request = grpcclient.service_pb2.CudaSharedMemoryRegisterRequest(name="gpu", raw_handle=b"x", byte_size=8)
        with pytest.raises(Exception) as err:
            c._client_stub.CudaSharedMemoryRegister(request)
        assert "CUDA shared memory is not supported" in str(err.value)
    else:
        assert c.get_cuda_shared_memory_status() == []
        with pytest.raises(InferenceServerException) as err:
            c.register_cuda_shared_memory("gpu", b"eA==", 0, 8)
        assert err.value.status() == "400" and "CUDA shared memory is not supported" in err.value.message()


def test_an_output_goes_to_the_region_its_request_named_whatever_happens_to_the_name_after():
    """The server's registry itself, on real shared memory objects: an output's region is held
    from the request's parse to its answer. Unregistered meanwhile, the answer still lands
    there (the work is not lost); registered anew under the same name on another object, the
    new object is left alone. Unregistering a name twice is no error (as Triton's)."""
    from cellserve.server.shared_memory import SystemSharedMemory

    memory = SystemSharedMemory()
    first = shm.create_shared_memory_region("first", "/cellserve-test-first", 16)
    second = shm.create_shared_memory_region("second", "/cellserve-test-second", 16)
    try:
        shm.set_shared_memory_region(second, [np.full(4, 7.0, np.float32)])
        memory.register("out", "/cellserve-test-first", 0, 16)
        place = memory.output_place({"shared_memory_region": "out", "shared_memory_byte_size": 16}, "output 'p'")
        memory.unregister("out")
        memory.unregister("out")
        memory.register("out", "/cellserve-test-second", 0, 16)
        memory.write(place, np.arange(4, dtype=np.float32).tobytes(), "output 'p'")
        np.testing.assert_array_equal(shm.get_contents_as_numpy(first, np.float32, [4]), np.arange(4))
        np.testing.assert_array_equal(shm.get_contents_as_numpy(second, np.float32, [4]), np.full(4, 7.0))
        memory.close()
    finally:
        shm.destroy_shared_memory_region(first)
        shm.destroy_shared_memory_region(second)
