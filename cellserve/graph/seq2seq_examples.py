"""Small PyTorch encoder-decoders written to the decoder-step contract (docs/decoders.md),
with the plain greedy loop they are checked against.

`AdditiveSeq2Seq` is the documentation's example: a GRU encoder and a GRU decoder with
Bahdanau (additive) attention and input feeding (the previous attentional vector is a
state). `ReverserEncoder` / `ReverserStep` wrap the zoo's trained digit reverser
(graph/zoo/seq2seq.py: LSTM, Luong dot attention) as the two modules the importer takes.
`greedy_reference` decodes one source row with the two modules directly, in PyTorch: what
the engine's answers must equal token for token.
"""

from __future__ import annotations

import torch
from torch import nn

from cellserve.graph.decode_spec import DecodeSpec, MaxLength


class AdditiveSeq2Seq(nn.Module):
    """GRU encoder, GRU decoder with additive attention and input feeding.

    encode(source [B, S]) -> memory [B, S, H], h0 [B, H]
    step(token [B], memory [B, S, H], memory_mask [B, S] (1.0 real, 0.0 padding), h [B, H],
         feed [B, H]) -> logits [B, V], h, feed
    """

    def __init__(self, vocab: int = 20, embed: int = 16, hidden: int = 32):
        super().__init__()
        self.src_embedding = nn.Embedding(vocab, embed)
        self.encoder = nn.GRU(embed, hidden, batch_first=True)
        self.tgt_embedding = nn.Embedding(vocab, embed)
        self.cell = nn.GRUCell(embed + hidden, hidden)
        self.query = nn.Linear(hidden, hidden, bias=False)
        self.key = nn.Linear(hidden, hidden)
        self.energy = nn.Linear(hidden, 1, bias=False)
        self.combine = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, vocab)

    def encode(self, source: torch.Tensor):
        memory, h = self.encoder(self.src_embedding(source))
        return memory, h[0]

    def step(self, token, memory, memory_mask, h, feed):
        h = self.cell(torch.cat([self.tgt_embedding(token), feed], dim=1), h)
        energy = self.energy(torch.tanh(self.key(memory) + self.query(h).unsqueeze(1))).squeeze(2)  # [B, S]
        energy = energy + (memory_mask - 1.0) * 1e9  # padding gets no weight, whatever the batch
        context = torch.bmm(torch.softmax(energy, dim=1).unsqueeze(1), memory).squeeze(1)
        feed = torch.tanh(self.combine(torch.cat([context, h], dim=1)))
        return self.out(feed), h, feed


class AdditiveEncoder(nn.Module):
    def __init__(self, model: AdditiveSeq2Seq):
        super().__init__()
        self.model = model

    def forward(self, source):
        memory, h0 = self.model.encode(source)
        return memory, h0, torch.zeros_like(h0)


class AdditiveStep(nn.Module):
    def __init__(self, model: AdditiveSeq2Seq):
        super().__init__()
        self.model = model

    def forward(self, token, memory, memory_mask, h, feed):
        return self.model.step(token, memory, memory_mask, h, feed)


def additive_spec(max_length: MaxLength = MaxLength(ratio=2.0, constant=3), bos: int = 1,
                  eos: int = 2) -> DecodeSpec:
    """The spec of `AdditiveEncoder` (outputs memory, h0, feed0) and `AdditiveStep`."""
    return DecodeSpec(memory="memory", states=(("h", "h_next"), ("feed", "feed_next")),
                      init=(("h", "h0"), ("feed", "feed0")), bos=bos, eos=eos, max_length=max_length,
                      output="tokens")


def load_additive(model: AdditiveSeq2Seq, spec: DecodeSpec | None = None, name: str = "add"):
    """`model` served through the decoder-step path (load_torch_seq2seq): its encoder and
    step exported in memory, wired by `spec` (default additive_spec())."""
    from cellserve.graph.seq2seq_import import load_torch_seq2seq

    return load_torch_seq2seq(AdditiveEncoder(model), AdditiveStep(model), spec or additive_spec(), name,
                              (torch.zeros((1, 3), dtype=torch.long),), ["source"], ["memory", "h0", "feed0"])


class ReverserEncoder(nn.Module):
    """The zoo digit reverser's encoder: digits [B, S] -> memory [B, S, H], h0, c0 [B, H]
    (every row of a request has S digits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, digits):
        memory, (h, c) = self.model.encoder(self.model.src_embedding(digits))
        return memory, h[0], c[0]


class ReverserStep(nn.Module):
    """The zoo digit reverser's decoder step (masking padding with the mask input)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, token, memory, memory_mask, h, c):
        logits, (h, c) = self.model.step(token, (h, c), memory, memory_mask > 0.5)
        return logits, h, c


@torch.no_grad()
def greedy_reference(encoder: nn.Module, step: nn.Module, spec: DecodeSpec, source: torch.Tensor,
                     outputs: list[str]) -> list[int]:
    """Greedy decode of one source row [S] (batch of one, no padding): BOS first, argmax fed
    back until EOS or the spec's max length. Returns the tokens without the EOS.
    `outputs` names the encoder's outputs in order."""
    produced = dict(zip(outputs, encoder.eval()(source.unsqueeze(0))))
    memory = produced[spec.memory]
    mask = torch.ones(memory.shape[:2], dtype=memory.dtype)
    states = [produced[spec.init_of(s)] if spec.init_of(s) else None for s in spec.state_inputs]
    if any(s is None for s in states):
        raise ValueError("greedy_reference needs every state initialised by the encoder")
    token, tokens = torch.tensor([spec.bos]), []
    for _ in range(spec.max_length.limit(memory.shape[1])):
        logits, *states = step.eval()(token, memory, mask, *states)
        t = int(torch.argmax(logits, dim=1))
        if t == spec.eos:
            break
        tokens.append(t)
        token = torch.tensor([t])
    return tokens
