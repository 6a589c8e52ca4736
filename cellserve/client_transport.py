"""tritonclient over either protocol, for `cellserve infer` (client.py): metadata, the model
configuration, one inference; every failure a ClientError whose message says what the server
or the network said (the server's own message, with the HTTP status or gRPC code)."""

from __future__ import annotations

import numpy as np

from cellserve.decimal_text import ascii_int


class ClientError(Exception):
    """The server or the network refused (exit 1)."""


class Client:
    def __init__(self, protocol: str, url: str, timeout_ms: float | None):
        self.protocol, self.url = protocol, url
        self._where = f"{url} ({protocol})"  # how an unreachable server is named
        # the network timeout outlasts the request's own deadline, so the server's answer is seen
        self.network_timeout_s = max(60.0, (timeout_ms or 0) / 1e3 + 10.0)
        if "://" in url:  # tritonclient takes host:port; its own refusal prints a traceback after ours
            raise ClientError(f"cannot use server address {url!r}: give host:port, without a scheme "
                              f"({url.split('://', 1)[0]}://)")
        _, colon, port = url.rpartition(":")
        if colon and "]" not in port and not 1 <= (ascii_int(port) or 0) <= 65535:  # checked here: tritonclient's
            # own check leaves a half-made client whose __del__ prints a traceback
            raise ClientError(f"cannot use server address {url!r}: port {port!r} is not 1 to 65535")
        if not colon or "]" in port:  # no port: the protocol's own, which a cellserve server does not use
            self._where = (f"{url} ({protocol}, port {443 if protocol == 'grpc' else 80}: the address names no "
                           f"port; cellserve serves {protocol} on {8001 if protocol == 'grpc' else 8000} "
                           "unless told otherwise)")
        try:
            if protocol == "grpc":
                import tritonclient.grpc as module
                self.client = module.InferenceServerClient(url)
            else:
                import tritonclient.http as module
                self.client = module.InferenceServerClient(url, connection_timeout=10.0,
                                                           network_timeout=self.network_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a malformed URL
            raise ClientError(f"cannot use server address {url!r}: {_describe(exc)}") from None
        self.module = module

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass

    def metadata(self, model: str, version: str) -> dict:
        if self.protocol == "grpc":
            meta = self._call(lambda: self.client.get_model_metadata(model, version, as_json=True,
                                                                     client_timeout=self.network_timeout_s))
            for tensor in meta.get("inputs", []) + meta.get("outputs", []):
                tensor["shape"] = [int(d) for d in tensor.get("shape", [])]
            meta.setdefault("outputs", [])
            return meta
        return self._call(lambda: self.client.get_model_metadata(model, version))

    def config(self, model: str, version: str) -> dict | None:
        """The model's configuration (Triton's ModelConfig as JSON), or None when the server
        does not serve the model configuration extension (the model itself exists: its
        metadata came first)."""
        if self.protocol == "grpc":
            def fetch():
                return self.client.get_model_config(model, version, as_json=True,
                                                    client_timeout=self.network_timeout_s).get("config", {})
        else:
            def fetch():
                return self.client.get_model_config(model, version)
        return self._call(fetch, absent=("404", "NOT_FOUND", "UNIMPLEMENTED"))

    def infer(self, model: str, version: str, inputs: dict[str, np.ndarray], metadata: dict,
              timeout_ms: float | None, parameters: dict | None = None,
              all_outputs: bool = False) -> dict[str, np.ndarray]:
        specs = {t["name"]: t for t in metadata["inputs"]}
        tensors = []
        for name, array in inputs.items():
            tensor = self.module.InferInput(name, list(array.shape), specs[name]["datatype"])
            if self.protocol == "grpc":
                tensor.set_data_from_numpy(array)
            else:
                tensor.set_data_from_numpy(array, binary_data=True)
            tensors.append(tensor)
        names = [] if all_outputs else [t["name"] for t in metadata.get("outputs", [])]
        if self.protocol == "grpc":
            requested = [self.module.InferRequestedOutput(n) for n in names] or None
        else:
            requested = [self.module.InferRequestedOutput(n, binary_data=True) for n in names] or None
        kwargs = {"parameters": parameters} if parameters else {}
        if timeout_ms is not None:
            kwargs["timeout"] = max(int(round(timeout_ms * 1e3)), 1)  # microseconds, the protocol's unit
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.network_timeout_s
        result = self._call(lambda: self.client.infer(model, tensors, model_version=version, outputs=requested,
                                                      **kwargs))
        response = result.get_response(as_json=True) if self.protocol == "grpc" else result.get_response()
        return {o["name"]: result.as_numpy(o["name"]) for o in response.get("outputs", [])}

    def _call(self, fn, absent: tuple[str, ...] = ()):
        """fn()'s result; None when it failed with a status in `absent`; any other failure
        as a ClientError whose message says what the server or the network said."""
        from tritonclient.utils import InferenceServerException

        try:
            return fn()
        except InferenceServerException as exc:
            status = exc.status()
            if absent and any(s in str(status) for s in absent):
                return None
            message = exc.message() or str(exc)
            if "UNAVAILABLE" in str(status) and _unreachable(message):
                raise ClientError(f"cannot reach the server at {self._where}: {message}") from None
            if status is None:
                raise ClientError(f"request to {self.url} ({self.protocol}) failed: {message}") from None
            where = f"HTTP {status}" if self.protocol == "http" else str(status).replace("StatusCode.", "")
            raise ClientError(f"{message} ({where})") from None
        except (OSError, TimeoutError) as exc:  # refused, unknown host, network timeout
            raise ClientError(f"cannot reach the server at {self._where}: {_describe(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - e.g. a reply that is not the protocol
            raise ClientError(f"request to {self.url} ({self.protocol}) failed: {_describe(exc)}") from None


def _unreachable(message: str) -> bool:
    return any(s in message for s in ("failed to connect", "errors resolving", "Connection refused",
                                      "DNS resolution failed", "Socket closed"))


def _describe(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"
