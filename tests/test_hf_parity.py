"""Parity of ms_prune's BERT / GPT-2 with Hugging Face transformers on tiny checkpoints.

The fixtures under tests/fixtures/ were written by tests/fixtures/make_hf_fixtures.py (see the
README there): HF checkpoints plus the HF outputs in reference.npz. Every forward comparison runs
in both GRAPH_MODE and PYNATIVE_MODE.
"""
import json
import os
import shutil

import mindspore as ms
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ms_prune.models.bert import BertForSequenceClassification, BertModel
from ms_prune.models.gpt2 import GPT2LMHeadModel, GPT2Model

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
REF = dict(np.load(os.path.join(FIXTURES, "reference.npz")))
ATOL = 1e-4
GPT2_VALID = REF["gpt2_attention_mask"].astype(bool)  # right padding: compare valid positions
BERT_PRUNINGS = {  # fixture suffix -> heads HF pruned (original head ids)
    "pruned": {0: [1, 2], 1: [0, 3]},
    "pruned_full": {0: [1, 2], 1: [0, 1, 2, 3]},  # layer 1 keeps no head at all
}
GPT2_PRUNING = {0: [0], 1: [1, 3]}


def fixture(name):
    return os.path.join(FIXTURES, name)


@pytest.fixture(params=[ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def mode(request):
    previous = ms.get_context("mode")
    ms.set_context(mode=request.param, device_target="CPU")
    yield request.param
    ms.set_context(mode=previous)


@pytest.fixture
def pynative():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    yield
    ms.set_context(mode=previous)


def _numpy(out):
    if isinstance(out, (tuple, list)):
        return tuple(o.asnumpy() for o in out)
    return out.asnumpy()


def bert_forward(model, with_token_types=True):
    model.set_train(False)
    args = [REF["bert_input_ids"], REF["bert_attention_mask"]]
    if with_token_types:
        args.append(REF["bert_token_type_ids"])
    return _numpy(model(*[ms.Tensor(a.astype(np.int32)) for a in args]))


def gpt2_forward(model):
    model.set_train(False)
    out = model(ms.Tensor(REF["gpt2_input_ids"].astype(np.int32)),
                ms.Tensor(REF["gpt2_attention_mask"].astype(np.int32)))
    return _numpy(out)


def assert_close(actual, key, valid=None, atol=ATOL):
    expected = REF[key]
    assert actual.shape == expected.shape, f"{key}: shape {actual.shape} != {expected.shape}"
    if valid is not None:
        actual, expected = actual[valid], expected[valid]
    diff = float(np.abs(actual - expected).max())
    assert diff <= atol, f"{key}: max abs diff {diff:.3g} > {atol}"


def saved_shapes(directory):
    with safe_open(os.path.join(directory, "model.safetensors"), "np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# ----------------------------------------------------------------------------------- BERT

def test_bert_base_checkpoint(mode):
    seq, pooled = bert_forward(BertModel.from_pretrained(fixture("bert_tiny_base")))
    assert_close(seq, "bert_sequence_output")
    assert_close(pooled, "bert_pooled_output")


def test_bert_cls_checkpoint(mode):
    logits = bert_forward(BertForSequenceClassification.from_pretrained(fixture("bert_tiny_cls")))
    assert_close(logits, "bert_logits")


def test_bert_backbone_from_cls_checkpoint_strict_rejects_classifier():
    with pytest.raises(ValueError, match=r"classifier\.weight"):
        BertModel.from_pretrained(fixture("bert_tiny_cls"), strict=True)
    with pytest.raises(ValueError, match=r"classifier\.bias"):
        BertModel.from_pretrained(fixture("bert_tiny_cls"))  # strict is the default


def test_bert_backbone_from_cls_checkpoint(pynative):  # graph path: test_bert_base_checkpoint
    model = BertModel.from_pretrained(fixture("bert_tiny_cls"), strict=False)
    assert sorted(model.loading_info["unexpected"]) == ["classifier.bias", "classifier.weight"]
    seq, pooled = bert_forward(model)
    assert_close(seq, "bert_sequence_output")
    assert_close(pooled, "bert_pooled_output")


@pytest.mark.parametrize("variant", sorted(BERT_PRUNINGS))
def test_bert_pruned_checkpoint(mode, variant):
    logits = bert_forward(BertForSequenceClassification.from_pretrained(fixture(f"bert_tiny_{variant}")))
    assert_close(logits, f"bert_{variant}_logits")


@pytest.mark.parametrize("variant", sorted(BERT_PRUNINGS))
def test_bert_pruned_checkpoint_backbone(pynative, variant):
    backbone = BertModel.from_pretrained(fixture(f"bert_tiny_{variant}"), strict=False)
    assert sorted(backbone.loading_info["unexpected"]) == ["classifier.bias", "classifier.weight"]
    seq, _ = bert_forward(backbone)
    assert_close(seq, f"bert_{variant}_sequence_output")


@pytest.mark.parametrize("variant", sorted(BERT_PRUNINGS))
def test_bert_prune_heads_matches_hf(mode, variant):
    model = BertForSequenceClassification.from_pretrained(fixture("bert_tiny_cls"))
    model.prune_heads(BERT_PRUNINGS[variant])
    assert_close(bert_forward(model), f"bert_{variant}_logits")


def test_bert_prune_heads_uses_original_head_ids(pynative):
    """Like HF: ids always refer to the unpruned layer, so pruning in steps == pruning at once."""
    model = BertForSequenceClassification.from_pretrained(fixture("bert_tiny_cls"))
    model.prune_heads({0: [2], 1: [3]})
    model.prune_heads({0: [1, 2], 1: [0]})  # head 2 of layer 0 is already gone
    assert_close(bert_forward(model), "bert_pruned_logits")


@pytest.mark.parametrize("variant", sorted(BERT_PRUNINGS))
def test_bert_pruned_save_load_round_trip(pynative, tmp_path, variant):
    model = BertForSequenceClassification.from_pretrained(fixture("bert_tiny_cls"))
    model.prune_heads(BERT_PRUNINGS[variant])
    before = bert_forward(model)
    model.save_pretrained(str(tmp_path))
    # the saved checkpoint is laid out exactly like HF's pruned one
    assert saved_shapes(str(tmp_path)) == saved_shapes(fixture(f"bert_tiny_{variant}"))
    with open(tmp_path / "config.json") as f:
        pruned = {int(k): sorted(v) for k, v in json.load(f)["pruned_heads"].items()}
    assert pruned == BERT_PRUNINGS[variant]
    after = bert_forward(BertForSequenceClassification.from_pretrained(str(tmp_path)))
    np.testing.assert_array_equal(after, before)
    assert_close(after, f"bert_{variant}_logits")


# ---------------------------------------------------------------------------------- GPT-2

def test_gpt2_lm_checkpoint(mode):
    logits = gpt2_forward(GPT2LMHeadModel.from_pretrained(fixture("gpt2_tiny_lm")))
    assert_close(logits, "gpt2_logits", valid=GPT2_VALID)


def test_gpt2_base_checkpoint(mode):
    hidden = gpt2_forward(GPT2Model.from_pretrained(fixture("gpt2_tiny_base")))
    assert_close(hidden, "gpt2_hidden", valid=GPT2_VALID)


def test_gpt2_backbone_from_lm_checkpoint(pynative):
    # the LM checkpoint holds only transformer.* tensors (lm_head is tied, not saved)
    hidden = gpt2_forward(GPT2Model.from_pretrained(fixture("gpt2_tiny_lm"), strict=True))
    assert_close(hidden, "gpt2_hidden", valid=GPT2_VALID)


def test_gpt2_pruned_checkpoint(mode):
    logits = gpt2_forward(GPT2LMHeadModel.from_pretrained(fixture("gpt2_tiny_pruned")))
    assert_close(logits, "gpt2_pruned_logits", valid=GPT2_VALID)


def test_gpt2_prune_heads_matches_hf(mode):
    model = GPT2LMHeadModel.from_pretrained(fixture("gpt2_tiny_lm"))
    model.prune_heads(GPT2_PRUNING)
    assert_close(gpt2_forward(model), "gpt2_pruned_logits", valid=GPT2_VALID)


def test_gpt2_pruned_save_load_round_trip(pynative, tmp_path):
    model = GPT2LMHeadModel.from_pretrained(fixture("gpt2_tiny_lm"))
    model.prune_heads(GPT2_PRUNING)
    before = gpt2_forward(model)
    model.save_pretrained(str(tmp_path))
    assert saved_shapes(str(tmp_path)) == saved_shapes(fixture("gpt2_tiny_pruned"))
    after = gpt2_forward(GPT2LMHeadModel.from_pretrained(str(tmp_path)))
    np.testing.assert_array_equal(after, before)
    assert_close(after, "gpt2_pruned_logits", valid=GPT2_VALID)


# ------------------------------------------------------------------------- bad checkpoints

def _edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return dst


@pytest.mark.parametrize("cls, name, key", [
    (BertForSequenceClassification, "bert_tiny_cls", "bert.encoder.layer.1.attention.self.key.weight"),
    (GPT2LMHeadModel, "gpt2_tiny_lm", "transformer.h.0.attn.c_attn.weight"),
])
def test_wrong_shape_is_reported(pynative, tmp_path, cls, name, key):
    def edit(tensors):
        tensors[key] = np.ascontiguousarray(tensors[key][:, :-1])
    directory = _edited_copy(fixture(name), str(tmp_path / name), edit)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        cls.from_pretrained(directory)


@pytest.mark.parametrize("cls, name, key", [
    (BertForSequenceClassification, "bert_tiny_cls", "bert.encoder.layer.0.output.LayerNorm.bias"),
    (BertModel, "bert_tiny_base", "encoder.layer.1.attention.self.value.bias"),
    (GPT2LMHeadModel, "gpt2_tiny_lm", "transformer.h.1.mlp.c_fc.bias"),
])
def test_missing_tensor_is_reported(pynative, tmp_path, cls, name, key):
    directory = _edited_copy(fixture(name), str(tmp_path / name), lambda t: t.pop(key))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        cls.from_pretrained(directory)


def test_missing_pooler_is_newly_initialized(pynative, tmp_path):
    """Like HF, a backbone checkpoint without pooler loads; the pooler is reported as new."""
    directory = _edited_copy(fixture("bert_tiny_base"), str(tmp_path / "no_pooler"),
                             lambda t: [t.pop("pooler.dense.weight"), t.pop("pooler.dense.bias")])
    model = BertModel.from_pretrained(directory)
    assert any("pooler" in name for name in model.loading_info["newly_initialized"])
    seq, _ = bert_forward(model)
    assert_close(seq, "bert_sequence_output")
