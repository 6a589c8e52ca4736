"""Hypothesis strategies shared by the engine tests and the simulator's (tests/sim puts this
directory on the path, as for helpers_engine)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

# The engine tests' small models (helpers_engine.Models) that requests below are drawn for
MIX = ["lstm", "gru", "tagger", "seq2seq-reverse"]


@st.composite
def timed_requests(draw, min_timeout_s: float = 1e-4):
    """(model name, inputs, timeout or None, engine steps to run before submitting it): a
    request of one of MIX's models, 1-2 rows of 1-10 valid token ids."""
    name = draw(st.sampled_from(MIX))
    rows, length = draw(st.integers(1, 2)), draw(st.integers(1, 10))
    low, high, key = (3, 12, "digits") if name == "seq2seq-reverse" else (0, 49, "tokens")
    ids = np.array(draw(st.lists(st.integers(low, high), min_size=rows * length, max_size=rows * length)))
    timeout = draw(st.one_of(st.none(), st.floats(min_timeout_s, 0.5)))
    return name, {key: ids.reshape(rows, length)}, timeout, draw(st.integers(0, 2))
