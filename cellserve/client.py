"""`cellserve infer`: one inference request to a running server, with tritonclient as the client.

It asks the server for the model's metadata, builds the input from text (digits for a model
whose input is named "digits", such as seq2seq-reverse; words hashed to token ids for the
token models) or from `--json`, sends it over HTTP or gRPC, and prints the answer readably.
Every failure is one line on stderr: exit 1 for what the server or the network said, 2 for
a usage error (no input, a bad --json, text the model cannot take).
"""

from __future__ import annotations

import json
import sys
import zlib

import numpy as np

# Token ids made from words: the vocabulary size is not in the model metadata, so ids are
# kept in [1, TOKEN_ID_BOUND), which every zoo model accepts (their vocabularies are 5000 and
# 10000). A word always maps to the same id (crc32 is stable across processes, unlike hash()).
TOKEN_ID_BOUND = 1000

_INTEGER_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


class UsageError(Exception):
    """The request cannot be built from what was given (exit 2)."""


class ClientError(Exception):
    """The server or the network refused (exit 1)."""


def infer_command(args) -> int:
    try:
        _check_args(args)
        return _run(args)
    except UsageError as exc:
        print(f"cellserve infer: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except ClientError as exc:
        print(f"cellserve infer: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("cellserve infer: interrupted", file=sys.stderr, flush=True)
        return 130


def token_ids(text: str) -> list[int]:
    """Words -> token ids in [1, TOKEN_ID_BOUND): a stable hash of the lower-cased word."""
    return [zlib.crc32(word.lower().encode("utf-8")) % (TOKEN_ID_BOUND - 1) + 1 for word in text.split()]


# ---- arguments ----

def _check_args(args) -> None:
    if args.text is None and args.json_input is None:
        raise UsageError("give the input as text (e.g. `cellserve infer seq2seq-reverse 12345`) or with --json")
    if args.text is not None and args.json_input is not None:
        raise UsageError("give the input as text or with --json, not both")
    if args.timeout_ms is not None and not args.timeout_ms > 0:
        raise UsageError(f"--timeout-ms must be positive, got {args.timeout_ms:g}")
    if args.model_version and not str(args.model_version).isdigit():
        raise UsageError(f"--model-version must be a version number, got {args.model_version!r}")


def _url(args) -> str:
    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    for scheme in ("http://", "grpc://"):  # tritonclient wants host:port
        if url.startswith(scheme):
            url = url[len(scheme):]
    return url.rstrip("/")


# ---- the request ----

def _run(args) -> int:
    url = _url(args)
    client = _Client(args.protocol, url, args.timeout_ms)
    try:
        metadata = client.metadata(args.model, args.model_version)
        inputs = _inputs_from_json(args.json_input, metadata) if args.json_input is not None \
            else _inputs_from_text(args.text, metadata)
        outputs = client.infer(args.model, args.model_version, inputs, metadata, args.timeout_ms)
    finally:
        client.close()
    for line in format_outputs(metadata, outputs):
        print(line)
    return 0


def _inputs_from_text(text: str, metadata: dict) -> dict[str, np.ndarray]:
    name = metadata["name"]
    if len(metadata["inputs"]) != 1:
        names = [t["name"] for t in metadata["inputs"]]
        raise UsageError(f"model {name!r} takes {len(names)} inputs ({', '.join(names)}): give them with --json")
    (spec,) = metadata["inputs"]
    if spec["datatype"] not in _INTEGER_TYPES:
        raise UsageError(f"model {name!r} takes input {spec['name']!r} as {spec['datatype']}, not token ids: "
                         "give it with --json")
    if spec["name"] == "digits":
        from cellserve.graph.zoo.seq2seq import encode_digits

        try:
            ids = encode_digits(text.strip())
        except ValueError as exc:
            raise UsageError(f"model {name!r} takes a digit string: {exc}") from None
        if not ids:
            raise UsageError(f"model {name!r} takes a digit string; the text is empty")
    else:
        ids = token_ids(text)
        if not ids:
            raise UsageError(f"model {name!r} takes words; the text is empty")
    rank = len(spec["shape"])
    if rank not in (1, 2):
        raise UsageError(f"model {name!r} takes input {spec['name']!r} of rank {rank}: give it with --json")
    array = np.array([ids] if rank == 2 else ids)
    return {spec["name"]: array.astype(_np_dtype(spec["datatype"]))}


def _inputs_from_json(text: str, metadata: dict) -> dict[str, np.ndarray]:
    name = metadata["name"]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--json is not valid JSON: {exc}") from None
    specs = {t["name"]: t for t in metadata["inputs"]}
    if not isinstance(data, dict) or not data:
        raise UsageError('--json must be an object of inputs, e.g. {"%s": [[1, 2, 3]]}' % next(iter(specs), "INPUT"))
    unknown = sorted(set(data) - set(specs))
    if unknown:
        raise UsageError(f"--json names input(s) {unknown} that model {name!r} does not have; "
                         f"its inputs are {sorted(specs)}")
    missing = sorted(set(specs) - set(data))
    if missing:
        raise UsageError(f"--json lacks input(s) {missing} of model {name!r}")
    inputs = {}
    for key, value in data.items():
        datatype = specs[key]["datatype"]
        if not isinstance(value, list):
            raise UsageError(f"--json input {key!r} must be a (nested) list, got {type(value).__name__}")
        try:
            if datatype == "BYTES":
                array = np.array(value, dtype=np.object_)
                array = np.vectorize(lambda v: v.encode("utf-8") if isinstance(v, str) else v,
                                     otypes=[np.object_])(array) if array.size else array
            else:
                try:
                    array = np.array(value)
                except ValueError:
                    array = np.array(None, dtype=np.object_)
                if array.dtype == np.object_:
                    raise ValueError("the nested lists are ragged or hold something other than numbers")
                if datatype in _INTEGER_TYPES and array.size and not np.issubdtype(array.dtype, np.integer) \
                        and not np.issubdtype(array.dtype, np.bool_):
                    raise ValueError(f"it holds non-integers ({array.dtype}); the input is {datatype}")
                if array.dtype.kind in "US":
                    raise ValueError(f"it holds strings; the input is {datatype}")
                array = array.astype(_np_dtype(datatype))
        except (ValueError, TypeError, OverflowError) as exc:
            raise UsageError(f"--json input {key!r} is not a valid {datatype} tensor: {exc}") from None
        want_rank = len(specs[key]["shape"])
        if array.ndim != want_rank:
            raise UsageError(f"--json input {key!r} has rank {array.ndim} (shape {list(array.shape)}); "
                             f"model {name!r} takes shape {specs[key]['shape']} (-1: any size)")
        inputs[key] = array
    return inputs


def _np_dtype(datatype: str):
    from tritonclient.utils import triton_to_np_dtype

    dtype = triton_to_np_dtype(datatype)
    if dtype is None:
        raise UsageError(f"data type {datatype} is not supported by this client")
    return dtype


# ---- printing ----

def format_outputs(metadata: dict, outputs: dict[str, np.ndarray]) -> list[str]:
    """seq2seq: the decoded string per row; classifiers: label and probabilities per row;
    anything else: each output's name, datatype, shape and values."""
    input_names = {t["name"] for t in metadata["inputs"]}
    if "digits" in input_names and set(outputs) == {"reversed"}:
        lines = _decoded_digits(outputs["reversed"])
        if lines is not None:
            return lines
    if {"label", "probabilities"} <= set(outputs):
        labels, probabilities = np.asarray(outputs["label"]), np.asarray(outputs["probabilities"])
        if labels.ndim == 1 and probabilities.ndim == 2 and len(labels) == len(probabilities):
            lines = []
            for row, (label, probs) in enumerate(zip(labels, probabilities)):
                prefix = f"[{row}] " if len(labels) > 1 else ""
                lines.append(f"{prefix}label: {int(label)}  (p={probs[int(label)]:.4f})"
                             if 0 <= int(label) < len(probs) else f"{prefix}label: {int(label)}")
                lines.append(f"{prefix}probabilities: " + " ".join(f"{p:.4f}" for p in probs))
            rest = {k: v for k, v in outputs.items() if k not in ("label", "probabilities")}
            return lines + _generic(metadata, rest)
    return _generic(metadata, outputs)


def _decoded_digits(tokens: np.ndarray) -> list[str] | None:
    from cellserve.graph.zoo.seq2seq import EOS, PAD, decode_digits

    rows = np.atleast_2d(np.asarray(tokens))
    lines = []
    for row in rows:
        ids = [int(t) for t in row if int(t) not in (PAD, EOS)]
        try:
            lines.append(decode_digits(ids))
        except ValueError:
            return None  # not digit tokens: print them as they are
    return lines


def _generic(metadata: dict, outputs: dict[str, np.ndarray]) -> list[str]:
    types = {t["name"]: t["datatype"] for t in metadata.get("outputs", [])}
    lines = []
    for name, value in outputs.items():
        value = np.asarray(value)
        text = np.array2string(value, precision=4, suppress_small=True, threshold=200, max_line_width=100)
        lines.append(f"{name} {types.get(name, str(value.dtype))} shape {list(value.shape)}:")
        lines += ["  " + line for line in text.splitlines()]
    return lines


# ---- tritonclient over either protocol ----

class _Client:
    def __init__(self, protocol: str, url: str, timeout_ms: float | None):
        self.protocol, self.url = protocol, url
        # the network timeout outlasts the request's own deadline, so the server's answer is seen
        self.network_timeout_s = max(60.0, (timeout_ms or 0) / 1e3 + 10.0)
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

    def infer(self, model: str, version: str, inputs: dict[str, np.ndarray], metadata: dict,
              timeout_ms: float | None) -> dict[str, np.ndarray]:
        specs = {t["name"]: t for t in metadata["inputs"]}
        tensors = []
        for name, array in inputs.items():
            tensor = self.module.InferInput(name, list(array.shape), specs[name]["datatype"])
            if self.protocol == "grpc":
                tensor.set_data_from_numpy(array)
            else:
                tensor.set_data_from_numpy(array, binary_data=True)
            tensors.append(tensor)
        names = [t["name"] for t in metadata.get("outputs", [])]
        if self.protocol == "grpc":
            requested = [self.module.InferRequestedOutput(n) for n in names] or None
        else:
            requested = [self.module.InferRequestedOutput(n, binary_data=True) for n in names] or None
        kwargs = {}
        if timeout_ms is not None:
            kwargs["timeout"] = max(int(round(timeout_ms * 1e3)), 1)  # microseconds, the protocol's unit
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.network_timeout_s
        result = self._call(lambda: self.client.infer(model, tensors, model_version=version, outputs=requested,
                                                      **kwargs))
        response = result.get_response(as_json=True) if self.protocol == "grpc" else result.get_response()
        return {o["name"]: result.as_numpy(o["name"]) for o in response.get("outputs", [])}

    def _call(self, fn):
        from tritonclient.utils import InferenceServerException

        try:
            return fn()
        except InferenceServerException as exc:
            status = exc.status()
            message = exc.message() or str(exc)
            if "UNAVAILABLE" in str(status) and _unreachable(message):
                raise ClientError(f"cannot reach the server at {self.url} ({self.protocol}): {message}") from None
            if status is None:
                raise ClientError(f"request to {self.url} ({self.protocol}) failed: {message}") from None
            where = f"HTTP {status}" if self.protocol == "http" else str(status).replace("StatusCode.", "")
            raise ClientError(f"{message} ({where})") from None
        except (OSError, TimeoutError) as exc:  # refused, unknown host, network timeout
            raise ClientError(f"cannot reach the server at {self.url} ({self.protocol}): {_describe(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - e.g. a reply that is not the protocol
            raise ClientError(f"request to {self.url} ({self.protocol}) failed: {_describe(exc)}") from None


def _unreachable(message: str) -> bool:
    return any(s in message for s in ("failed to connect", "errors resolving", "Connection refused",
                                      "DNS resolution failed", "Socket closed"))


def _describe(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"
