"""`cellserve infer`: one inference request to a running server, with tritonclient as the client.

It asks the server for the model's metadata, builds the input from text or from `--json`,
sends it over HTTP or gRPC, and prints the answer readably. Text: a model that publishes a
text vocabulary in its configuration (text_vocab.py; the zoo's `dates`) gets the text encoded
with it, fetched from the server, and its answer is printed as text (client_text.py);
otherwise digits for a model whose input is named "digits", such as seq2seq-reverse; token ids
given as integers ("12 7 93") for any model of token ids; and, for the zoo's seeded
classifiers only, words hashed to token ids (another model's words would become ids it never
learnt: refused). `--beam-width`/`--return-beams` are sent as
the request parameters of the same names. Every failure is one line on stderr: exit 1 for
what the server or the network said, 2 for a usage error (no input, a bad --json, text the
model cannot take, a character outside the vocabulary: named before anything is sent).
"""

from __future__ import annotations

import json
import sys
import zlib

import numpy as np

from cellserve.decimal_text import ascii_int
from cellserve.client_text import PublishedVocabularyError, format_text, published_vocabulary, text_inputs
from cellserve.client_transport import Client, ClientError
from cellserve.text_vocab import VocabularyError

# Token ids made from words: the vocabulary size is not in the model metadata, so ids are
# kept in [1, TOKEN_ID_BOUND), which every zoo model accepts (their vocabularies are 5000 and
# 10000). A word always maps to the same id (crc32 is stable across processes, unlike hash()).
TOKEN_ID_BOUND = 1000

_INTEGER_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


class UsageError(Exception):
    """The request cannot be built from what was given (exit 2)."""


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
    _resolve_model_and_text(args)
    if args.text is None and args.json_input is None:
        raise UsageError("give the input as text (e.g. `cellserve infer seq2seq-reverse 12345`, "
                         "`cellserve infer --model dates --text '3 March 2021'`) or with --json")
    if args.text is not None and args.json_input is not None:
        raise UsageError("give the input as text or with --json, not both")
    if args.timeout_ms is not None and not args.timeout_ms > 0:
        raise UsageError(f"--timeout-ms must be positive, got {args.timeout_ms:g}")
    if args.model_version and ascii_int(str(args.model_version)) is None:
        raise UsageError(f"--model-version must be a version number, got {args.model_version!r}")
    beam_width = getattr(args, "beam_width", None)
    if beam_width is not None and beam_width < 1:
        raise UsageError(f"--beam-width must be at least 1, got {beam_width}")


def _resolve_model_and_text(args) -> None:
    """`infer MODEL [TEXT]` or `infer --model MODEL [--text TEXT | TEXT]`: args.model and
    args.text set from whichever was given; each at most once."""
    model_flag, text_flag = getattr(args, "model_flag", None), getattr(args, "text_flag", None)
    if model_flag is not None:
        if args.text is not None:  # `infer --model M A B`: two positionals besides --model
            raise UsageError(f"the model is given by --model {model_flag!r}; extra arguments "
                             f"{args.model!r} {args.text!r}")
        if args.model is not None:  # `infer --model M TEXT`: argparse put TEXT first
            args.text = args.model
        args.model = model_flag
    if text_flag is not None:
        if args.text is not None:
            raise UsageError(f"give the text once: --text {text_flag!r} and {args.text!r}")
        args.text = text_flag
    if not args.model:
        raise UsageError("give the model: `cellserve infer MODEL TEXT` or `cellserve infer --model MODEL --text TEXT`")


def _url(args) -> str:
    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    for scheme in ("http://", "grpc://"):  # tritonclient wants host:port
        if url.startswith(scheme):
            url = url[len(scheme):]
    return url.rstrip("/")


# ---- the request ----

def _run(args) -> int:
    url = _url(args)
    client = Client(args.protocol, url, args.timeout_ms)
    return_beams = bool(getattr(args, "return_beams", False))
    parameters = {"beam_width": args.beam_width} if getattr(args, "beam_width", None) is not None else {}
    if return_beams:
        parameters["return_beams"] = True
    try:
        metadata = client.metadata(args.model, args.model_version)
        vocab = None
        if args.json_input is not None:
            inputs = _inputs_from_json(args.json_input, metadata)
        else:
            vocab = _published(client.config(args.model, args.model_version), metadata)
            inputs = _inputs_from_vocabulary(vocab, args.text, metadata) if vocab is not None \
                else _inputs_from_text(args.text, metadata)
        # the beams are outputs beyond the metadata's: ask for all outputs to get them
        outputs = client.infer(args.model, args.model_version, inputs, metadata, args.timeout_ms, parameters,
                               all_outputs=return_beams)
        lines = _text_lines(vocab, outputs) if vocab is not None else format_outputs(metadata, outputs)
    finally:
        client.close()
    for line in lines:
        print(line)
    return 0


def _published(config: dict | None, metadata: dict):
    try:
        return published_vocabulary(config, metadata)
    except PublishedVocabularyError as exc:
        raise ClientError(str(exc)) from None


def _inputs_from_vocabulary(vocab, text: str, metadata: dict) -> dict[str, np.ndarray]:
    try:
        return text_inputs(vocab, text, metadata, _np_dtype)
    except VocabularyError as exc:
        raise UsageError(f"model {metadata['name']!r}: {exc}; nothing was sent") from None


def _text_lines(vocab, outputs: dict[str, np.ndarray]) -> list[str]:
    try:
        return format_text(vocab, outputs)
    except PublishedVocabularyError as exc:
        raise ClientError(str(exc)) from None


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
        words = text.split()
        if not words:
            raise UsageError(f"model {name!r} takes words or token ids; the text is empty")
        ids = [ascii_int(word) for word in words]  # integers: token ids as they are
        if None in ids and metadata.get("platform") == "cellserve_zoo":  # the zoo's seeded classifiers: any words do
            ids = token_ids(text)
        elif None in ids:  # hashed words would be ids the model never learnt, with an answer that looks real
            raise UsageError(f"model {name!r} publishes no text vocabulary, so words cannot be turned into its "
                             f"token ids: give the ids themselves (cellserve infer {name} '12 7 93') or --json")
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
