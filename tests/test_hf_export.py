"""``export_hf_dense``: a pruned model written in dense shapes that transformers 5.x and 4.x load.

What transformers computes from the exported folders was recorded with the real libraries
(tests/fixtures/check_hf_dense.py, transformers 5.23 and 4.57) in hf_dense/hf_outputs.npz; these
tests need no transformers: they check that today's export writes exactly those folders and that
the pruned model computes what transformers computed from them.
"""
import json
import os

import numpy as np
import pytest
import mindspore as ms
from safetensors.numpy import load_file

from ms_prune.models.bert import BertForSequenceClassification, BertModel
from ms_prune.models.gpt2 import GPT2LMHeadModel

from conftest import FIXTURES, load_script

plans = load_script("export_hf_dense_fixtures", folder=os.path.join("tests", "fixtures"))

REF = np.load(os.path.join(FIXTURES, "reference.npz"))
HF = np.load(os.path.join(FIXTURES, "hf_dense", "hf_outputs.npz"))
GPT2_VALID = REF["gpt2_attention_mask"].astype(bool)  # right padding: HF and we differ there only


def forward(model, name):
    model.set_train(False)
    if name.startswith("bert"):
        args = [ms.Tensor(REF["bert_" + k].astype(np.int32)) for k in ("input_ids", "attention_mask", "token_type_ids")]
        out = model(*args)
        return (out[0] if name == "bert_base" else out).asnumpy()
    args = [ms.Tensor(REF["gpt2_" + k].astype(np.int32)) for k in ("input_ids", "attention_mask")]
    return model(*args).asnumpy()[GPT2_VALID]


def hf_output(version, name):
    out = HF[f"v{version}_{name}"]
    return out[GPT2_VALID] if name.startswith("gpt2") else out


@pytest.mark.parametrize("name", sorted(plans.PLANS))
def test_pruned_model_computes_what_transformers_computes_from_the_export(mode, name):
    pruned = plans.pruned_model(name)
    assert 0 in pruned.heads_per_layer()  # every plan empties a layer
    got = forward(pruned, name)
    for version in (5, 4):
        diff = np.abs(got - hf_output(version, name)).max()
        assert diff < 1e-5, f"transformers {version}.x computed something else from the export: {diff}"


@pytest.mark.parametrize("name", sorted(plans.PLANS))
def test_export_writes_the_verified_folder(tmp_path, name):
    pruned = plans.pruned_model(name)
    pruned.export_hf_dense(str(tmp_path))
    written, verified = (load_file(os.path.join(d, "model.safetensors"))
                         for d in (str(tmp_path), os.path.join(FIXTURES, "hf_dense", name)))
    assert sorted(written) == sorted(verified)
    for key in verified:
        np.testing.assert_array_equal(written[key], verified[key], err_msg=key)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    assert "pruned_heads" not in config and config["architectures"] == [type(pruned).__name__]
    # the model itself stays pruned and its compact checkpoint keeps recording that
    assert pruned.config.pruned_heads == {int(k): v for k, v in plans.PLANS[name][2].items()}


def test_export_is_dense_with_zeroed_heads(tmp_path):
    pruned = plans.pruned_model("gpt2_lm")  # layer 0 keeps heads 1 and 3 of 4, layer 1 none
    pruned.export_hf_dense(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    width, head = 32, 8
    c_attn, c_proj = state["transformer.h.0.attn.c_attn.weight"], state["transformer.h.0.attn.c_proj.weight"]
    assert c_attn.shape == (width, 3 * width) and c_proj.shape == (width, width)
    for h in range(4):
        zero = h in (0, 2)
        for block in range(3):  # Q, K and V of that head
            cols = c_attn[:, block * width + h * head:block * width + (h + 1) * head]
            assert (np.abs(cols).max() == 0) == zero
        assert (np.abs(c_proj[h * head:(h + 1) * head]).max() == 0) == zero
    assert np.abs(state["transformer.h.1.attn.c_attn.weight"]).max() == 0
    assert np.abs(state["transformer.h.1.attn.c_proj.bias"]).max() > 0  # the emptied layer keeps its bias


@pytest.mark.parametrize("cls,name", [(BertForSequenceClassification, "bert_cls"), (BertModel, "bert_base"),
                                      (GPT2LMHeadModel, "gpt2_lm")])
def test_export_reloads_into_ms_prune_as_a_dense_model(tmp_path, cls, name):
    pruned = plans.pruned_model(name)
    pruned.export_hf_dense(str(tmp_path))
    dense = cls.from_pretrained(str(tmp_path))
    assert dense.config.pruned_heads == {} and 0 not in dense.heads_per_layer()
    np.testing.assert_allclose(forward(dense, name), forward(pruned, name), atol=1e-6)
