"""`cellserve infer MODEL TEXT` turning text into a token model's input (client._inputs_from_text):
integers are token ids for any model; words are hashed to ids only for the zoo's seeded
classifiers, and refused for a model of the user's own, which never learnt those ids."""

from __future__ import annotations

import numpy as np
import pytest

from cellserve.client import UsageError, _inputs_from_text, token_ids


def metadata(platform: str) -> dict:
    return {"name": "clf", "platform": platform, "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [-1, -1]}]}


@pytest.mark.parametrize("platform", ["onnxruntime_onnx", "cellserve_zoo"])
def test_integers_are_token_ids_for_any_model(platform):
    got = _inputs_from_text("12 7 093", metadata(platform))
    np.testing.assert_array_equal(got["tokens"], [[12, 7, 93]])
    assert got["tokens"].dtype == np.int64


def test_words_are_hashed_for_the_zoos_classifiers_only():
    np.testing.assert_array_equal(_inputs_from_text("the cells", metadata("cellserve_zoo"))["tokens"],
                                  [token_ids("the cells")])
    with pytest.raises(UsageError, match=r"model 'clf' publishes no text vocabulary, so words cannot be turned "
                                         r"into its token ids: give the ids themselves \(cellserve infer clf '12 7 93'\)"):
        _inputs_from_text("the cells", metadata("onnxruntime_onnx"))
    with pytest.raises(UsageError, match="the text is empty"):
        _inputs_from_text("  ", metadata("onnxruntime_onnx"))
