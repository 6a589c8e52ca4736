"""The zoo's second encoder-decoder: dates written in many formats -> ISO `YYYY-MM-DD`.

The task. `date_task(rng, n)` draws dates uniformly from 1950-01-01..2049-12-31 and writes each
in one of `FORMATS` ("3rd of March 1998", "03/03/98", "March 3, 1998", "1998.3.3", "Tue 3 Mar 98",
...). Conventions that keep every input unambiguous: numeric dates with the year last are
day/month/year, with the year first year/month/day; a two-digit year yy means 19yy when yy >= 50
and 20yy otherwise (the range is exactly the century this covers); weekdays are the true ones.
A share (TYPO_RATE) of the examples carry one typo in a word of five letters or more.

The vocabularies. Source: characters, PAD=0 then `SOURCE_CHARS` (ids 1..). Target: PAD=0,
BOS=1, EOS=2, '0'..'9' = 3..12, '-' = 13 (`TARGET_VOCAB` = 14).

The model, as the decoder-step contract's two pieces (docs/zoo_dates.md has the details):

    DatesEncoder     source int64 [B, T] -> memory [B, T, 2H] (bidirectional GRU outputs),
                     init_h [B, D], init_att [B, D] (tanh bridges from both directions' final states)
    DatesDecoderStep token [B], memory [B, S, M], memory_mask [B, S], h [B, D], att [B, D]
                     -> logits [B, V], h_next [B, D], att_next [B, D]

One step: x = cat(embed(token), att) (input feeding); h' = GRU cell(x, h), written out as Gemm
and pointwise ops; Bahdanau scores e_j = v . tanh(W_m m_j + W_q h'), padding pushed to -1e9
by (mask - 1) * 1e9; a = softmax(e); ctx = a @ memory; att' = tanh(W_c cat(ctx, h'));
logits = W_o att'. The encoder takes one request per row with no padding (the engine encodes a
request alone); training pads and packs through `DatesModel.encode`, which agrees on real rows.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cellserve.graph.decode_spec import DecodeSpec
from cellserve.graph.zoo.date_formats import FORMATS, add_typo, write_date
from cellserve.graph.zoo.reference_decode import DecodeResult, decode

PAD, BOS, EOS = 0, 1, 2
SOURCE_CHARS = " ,-./'0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
SOURCE_VOCAB = 1 + len(SOURCE_CHARS)
TARGET_CHARS = "0123456789-"
TARGET_OFFSET = 3
TARGET_VOCAB = TARGET_OFFSET + len(TARGET_CHARS)
TYPO_RATE = 0.3  # share of examples with a misspelt long word ("Febuary", "twenty-thrid")
MAX_OUTPUT_STEPS = 12  # ISO dates are 10 tokens + EOS; one spare step
FIRST_DAY, DAYS = dt.date(1950, 1, 1), (dt.date(2050, 1, 1) - dt.date(1950, 1, 1)).days
WEIGHTS_PATH = Path(__file__).parent / "weights" / "dates.npz"

ENCODER_INPUTS, ENCODER_OUTPUTS = ["source"], ["memory", "init_h", "init_att"]
STEP_INPUTS = ["token", "memory", "memory_mask", "h", "att"]
STEP_OUTPUTS = ["logits", "h_next", "att_next"]

# How the engine decodes it (graph/decode_spec.py). max_length counts decoder steps, the EOS
# step included. Greedy by default; a request may ask for a beam of up to 8 (zoo `dates`,
# dates_served.py).
DECODE_SPEC = DecodeSpec.from_dict({
    "memory": "memory", "init": {"h": "init_h", "att": "init_att"},
    "token_input": "token", "memory_input": "memory", "mask_input": "memory_mask",
    "logits_output": "logits", "states": [["h", "h_next"], ["att", "att_next"]],
    "bos": BOS, "eos": EOS, "pad": PAD, "max_length": MAX_OUTPUT_STEPS,
    "beam_width": 1, "max_beam_width": 8, "length_penalty": 0.6, "output": "date",
})

_SOURCE_IDS = {ch: i + 1 for i, ch in enumerate(SOURCE_CHARS)}


def encode_source(s: str) -> list[int]:
    """'1998.3.3' -> character ids. Raises ValueError naming the first character outside SOURCE_CHARS."""
    if not s:
        raise ValueError("empty date string")
    for i, ch in enumerate(s):
        if ch not in _SOURCE_IDS:
            raise ValueError(f"character {ch!r} at position {i} in {s!r} is not in the dates vocabulary")
    return [_SOURCE_IDS[ch] for ch in s]


def encode_target(iso: str) -> list[int]:
    """'1998-03-03' -> target ids (no BOS/EOS). Raises ValueError on any other character."""
    for i, ch in enumerate(iso):
        if ch not in TARGET_CHARS:
            raise ValueError(f"character {ch!r} at position {i} in {iso!r} is not a target character")
    return [TARGET_CHARS.index(ch) + TARGET_OFFSET for ch in iso]


def decode_target(ids) -> str:
    """Target ids -> text; stops at EOS. Raises ValueError on PAD/BOS or ids outside the vocabulary."""
    out = []
    for i in map(int, ids):
        if i == EOS:
            break
        if not TARGET_OFFSET <= i < TARGET_VOCAB:
            raise ValueError(f"not a target character id: {i} (characters are {TARGET_OFFSET}..{TARGET_VOCAB - 1})")
        out.append(TARGET_CHARS[i - TARGET_OFFSET])
    return "".join(out)


def date_task(rng: np.random.Generator, n: int, typo_rate: float = TYPO_RATE) -> tuple[list[str], list[str]]:
    """n fresh examples: (written dates, their ISO forms); format uniform over FORMATS, and a
    typo (date_formats.add_typo) in a long word of a typo_rate share of them."""
    days = rng.integers(0, DAYS, size=n)
    kinds = rng.integers(0, len(FORMATS), size=n)
    typos = rng.random(size=n) < typo_rate
    srcs, tgts = [], []
    for d, k, typo in zip(days, kinds, typos):
        date = FIRST_DAY + dt.timedelta(days=int(d))
        text = write_date(date, int(k), rng)
        srcs.append(add_typo(text, rng) if typo else text)
        tgts.append(date.isoformat())
    return srcs, tgts


class GRUCellOps(nn.Module):
    """nn.GRUCell's arithmetic (linear_before_reset, as PyTorch and ONNX's GRU default to) as
    Gemm and pointwise ops, one Linear per gate so that export needs no Split/Slice."""

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.ir, self.iz, self.in_ = (nn.Linear(inputs, hidden) for _ in range(3))
        self.hr, self.hz, self.hn = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        r = torch.sigmoid(self.ir(x) + self.hr(h))
        z = torch.sigmoid(self.iz(x) + self.hz(h))
        n = torch.tanh(self.in_(x) + r * self.hn(h))
        return n + z * (h - n)  # = (1 - z) * n + z * h


class DatesEncoder(nn.Module):
    """source int64 [B, T] (unpadded rows) -> (memory [B, T, 2H], init_h [B, D], init_att [B, D])."""

    def __init__(self, embed: int, hidden: int, dec_hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(SOURCE_VOCAB, embed)
        self.rnn = nn.GRU(embed, hidden, batch_first=True, bidirectional=True)
        self.bridge_h = nn.Linear(2 * hidden, dec_hidden)
        self.bridge_att = nn.Linear(2 * hidden, dec_hidden)

    def forward(self, source: torch.Tensor, lengths: torch.Tensor | None = None):
        x = self.embedding(source)
        if lengths is None:
            memory, h_n = self.rnn(x)
        else:  # training: PAD-padded rows, packed so that each direction starts/ends on real positions
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            memory, h_n = self.rnn(packed)
            memory, _ = pad_packed_sequence(memory, batch_first=True, total_length=source.shape[1])
        final = torch.cat([h_n[0], h_n[1]], dim=-1)
        return memory, torch.tanh(self.bridge_h(final)), torch.tanh(self.bridge_att(final))


class DatesDecoderStep(nn.Module):
    """(token [B], memory [B,S,M], memory_mask [B,S], h [B,D], att [B,D]) -> (logits [B,V], h', att')."""

    def __init__(self, memory: int, embed: int, hidden: int, attention: int):
        super().__init__()
        self.embedding = nn.Embedding(TARGET_VOCAB, embed)
        self.cell = GRUCellOps(embed + hidden, hidden)
        self.key = nn.Linear(memory, attention, bias=False)
        self.query = nn.Linear(hidden, attention)
        self.v = nn.Linear(attention, 1, bias=False)
        self.combine = nn.Linear(memory + hidden, hidden)
        self.out = nn.Linear(hidden, TARGET_VOCAB)

    def forward(self, token, memory, memory_mask, h, att):
        h = self.cell(torch.cat([self.embedding(token), att], dim=-1), h)
        energy = torch.tanh(self.key(memory) + self.query(h).unsqueeze(1))      # [B, S, A]
        # Padding goes to -1e9 (exp underflows to exactly 0), real positions get + 0 exactly.
        scores = self.v(energy).squeeze(2) + (memory_mask - 1.0) * 1e9         # [B, S]
        ctx = torch.matmul(torch.softmax(scores, dim=1).unsqueeze(1), memory).squeeze(1)
        att = torch.tanh(self.combine(torch.cat([ctx, h], dim=-1)))
        return self.out(att), h, att


class DatesModel(nn.Module):
    """The encoder and the step together; forward gives teacher-forced logits for training."""

    def __init__(self, embed: int = 32, hidden: int = 64, dec_embed: int = 16,
                 dec_hidden: int = 128, attention: int = 64):
        super().__init__()
        self.config = dict(embed=embed, hidden=hidden, dec_embed=dec_embed,
                           dec_hidden=dec_hidden, attention=attention)
        self.encoder = DatesEncoder(embed, hidden, dec_hidden)
        self.step = DatesDecoderStep(2 * hidden, dec_embed, dec_hidden, attention)

    def forward(self, src, src_lens, tgt_in):
        """src [B, S] PAD-padded, src_lens [B], tgt_in [B, T] (BOS first) -> logits [B, T, V]."""
        memory, h, att = self.encoder(src, src_lens)
        mask = (torch.arange(src.shape[1])[None, :] < src_lens[:, None]).float()
        logits = []
        for t in range(tgt_in.shape[1]):
            step_logits, h, att = self.step(tgt_in[:, t], memory, mask, h, att)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)


def normalise(model: DatesModel, text: str, beam_width: int = 1) -> tuple[str, DecodeResult]:
    """One written date -> (the best hypothesis as text, the whole decode result), decoded by
    the reference search under DECODE_SPEC. A hypothesis holding non-date ids reads as '?'."""
    result = decode(model.encoder, model.step, torch.tensor([encode_source(text)]), DECODE_SPEC,
                    ENCODER_OUTPUTS, beam_width)
    try:
        return decode_target(result.best.tokens), result
    except ValueError:
        return "?", result


def accuracy(model: DatesModel, srcs: list[str], tgts: list[str], beam_width: int = 1) -> float:
    """Exact match of the whole ISO date over the examples."""
    return sum(normalise(model, s, beam_width)[0] == t for s, t in zip(srcs, tgts)) / len(srcs)


def save_weights(model: DatesModel, path: str | Path) -> None:
    """state_dict as float32 arrays named by key, plus config_<name> int64 scalars; no pickle."""
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    config = {f"config_{k}": np.int64(v) for k, v in model.config.items()}
    np.savez(path, **config, **arrays)


def load_trained(path: str | Path = WEIGHTS_PATH) -> DatesModel:
    """The checked-in trained model, in eval mode. Raises ValueError naming a missing array."""
    with np.load(path, allow_pickle=False) as z:
        config = {k[len("config_"):]: int(z[k]) for k in z.files if k.startswith("config_")}
        model = DatesModel(**config)
        missing = [k for k in model.state_dict() if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing weight arrays {missing}")
        model.load_state_dict({k: torch.from_numpy(z[k]) for k in model.state_dict()})
    return model.eval()


def export_onnx(model: DatesModel, directory: str | Path) -> tuple[Path, Path]:
    """Write directory/encoder.onnx and directory/decoder_step.onnx (opset 17, TorchScript
    exporter) with dynamic batch and source length; the names are ENCODER_* and STEP_*."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    enc_path, step_path = directory / "encoder.onnx", directory / "decoder_step.onnx"
    source = torch.tensor([encode_source("3rd of March 1998")])
    with torch.no_grad():
        memory, h, att = model.encoder(source)
    torch.onnx.export(model.encoder, (source,), str(enc_path), dynamo=False, opset_version=17,
                      input_names=ENCODER_INPUTS, output_names=ENCODER_OUTPUTS,
                      dynamic_axes={"source": {0: "batch", 1: "time"}, "memory": {0: "batch", 1: "time"},
                                    "init_h": {0: "batch"}, "init_att": {0: "batch"}})
    step_args = (torch.tensor([BOS]), memory, torch.ones(memory.shape[:2]), h, att)
    batch = {0: "batch"}
    torch.onnx.export(model.step, step_args, str(step_path), dynamo=False, opset_version=17,
                      input_names=STEP_INPUTS, output_names=STEP_OUTPUTS,
                      dynamic_axes={"token": batch, "memory": {0: "batch", 1: "source"},
                                    "memory_mask": {0: "batch", 1: "source"}, "h": batch, "att": batch,
                                    "logits": batch, "h_next": batch, "att_next": batch})
    return enc_path, step_path
