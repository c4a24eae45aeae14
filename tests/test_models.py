"""Model zoo behaviour that Hugging Face parity (test_hf_parity.py) does not cover: configs,
physical head pruning, save/reload, counting and bad input."""
import json
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor
from safetensors.numpy import load_file, save_file

from ms_prune.models.bert import BertConfig, BertForSequenceClassification, BertModel
from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model

BERT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=40, max_position_embeddings=32, num_labels=3)
GPT2 = dict(vocab_size=50, n_embd=32, n_layer=3, n_head=4, n_positions=32)


def bert(**changes):
    ms.set_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**BERT, **changes}))
    model.set_train(False)
    return model


def gpt2(**changes):
    ms.set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**{**GPT2, **changes}))
    model.set_train(False)
    return model


def inputs(seq=6):
    rng = np.random.default_rng(1)
    ids = Tensor(rng.integers(0, 50, (2, seq)), ms.int32)
    mask = Tensor(np.array([[1] * seq, [1] * (seq - 2) + [0] * 2]), ms.int32)
    return ids, mask


def run(model, ids, mask):
    return model(ids, mask).asnumpy()


def remove_contributions(model, heads):
    """Reference for pruning: zero what the heads feed into the output projection."""
    for layer, layer_heads in heads.items():
        attention = model.attention_layers()[layer].heads()
        dense, layout = attention.output_projection(), attention.layout
        weight = dense.weight.asnumpy().copy()
        for h in layer_heads:
            cols = slice(h * attention.head_dim, (h + 1) * attention.head_dim)
            if layout == "linear":
                weight[:, cols] = 0.0
            else:
                weight[cols, :] = 0.0
        dense.weight.set_data(Tensor(weight))


@pytest.mark.parametrize("make", [bert, gpt2], ids=["bert", "gpt2"])
def test_pruned_output_equals_heads_removed(mode, make):
    heads = {0: [1, 3], 1: [0, 1, 2, 3], 2: [2]}  # layer 1 loses every head
    ids, mask = inputs()
    reference = make()
    remove_contributions(reference, heads)
    pruned = make().prune_heads(heads)
    assert pruned.heads_per_layer() == [2, 0, 3]
    expected, got = run(reference, ids, mask), run(pruned, ids, mask)
    if make is gpt2:  # padded query positions are not compared (they attend to nothing real)
        expected, got = expected[:, :4], got[:, :4]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_prune_after_running_recompiles(mode):
    """A model run in graph mode before surgery must not keep its old compiled graph."""
    ids, mask = inputs()
    model = bert()
    before = run(model, ids, mask)
    model.prune_heads({0: [0, 1, 2, 3]})
    after = run(model, ids, mask)
    fresh = bert().prune_heads({0: [0, 1, 2, 3]})
    np.testing.assert_allclose(after, run(fresh, ids, mask), atol=1e-6)
    assert np.abs(after - before).max() > 1e-4


def test_repeated_calls_merge_in_original_numbering():
    ids, mask = inputs()
    once = bert().prune_heads({0: [1, 2], 2: [3]})
    twice = bert().prune_heads({0: [2]}).prune_heads({0: [1, 2], 2: [3]})
    assert twice.config.pruned_heads == {0: [1, 2], 2: [3]}
    assert twice.attention_layers()[0].kept_heads == [0, 3]
    np.testing.assert_allclose(run(twice, ids, mask), run(once, ids, mask), atol=1e-6)


@pytest.mark.parametrize("make,cls", [(bert, BertForSequenceClassification), (gpt2, GPT2LMHeadModel)],
                         ids=["bert", "gpt2"])
def test_pruned_model_saves_and_reloads(tmp_path, mode, make, cls):
    ids, mask = inputs()
    model = make().prune_heads({0: [0], 1: [0, 1, 2, 3]})
    model.save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["pruned_heads"] == {"0": [0], "1": [0, 1, 2, 3]}
    saved = load_file(str(tmp_path / "model.safetensors"))
    names = [name for name, _ in model.parameters_and_names()]
    assert len(set(names)) == len(names)
    assert len([k for k, v in saved.items() if v.size]) == len(names)  # no tensor dropped
    reloaded = cls.from_pretrained(str(tmp_path))
    reloaded.set_train(False)
    assert reloaded.heads_per_layer() == model.heads_per_layer()
    np.testing.assert_array_equal(run(reloaded, ids, mask), run(model, ids, mask))


@pytest.mark.parametrize("heads,message", [
    ({3: [0]}, "layer 3 is out of range"),
    ({-1: [0]}, "layer -1 is out of range"),
    ({0: [4]}, r"head\(s\) \[4\] are out of range"),
    ({0: [-1]}, r"head\(s\) \[-1\] are out of range"),
    ({"3": [1]}, "layer 3 is out of range"),
])
def test_bad_head_indices_are_named(heads, message):
    with pytest.raises(ValueError, match=message):
        bert().prune_heads(heads)


@pytest.mark.parametrize("layer", ["x", "-1", 1.0, None, True])
def test_non_int_layer_keys_are_refused_by_name(layer):
    with pytest.raises(TypeError, match=rf"layer keys must be ints \(or digit strings such as '0'\), got {layer!r}"):
        bert().prune_heads({layer: [0]})


def test_digit_string_layer_keys_from_json_are_layers():
    """A plan read back from JSON has string keys: {"0": [1]} means layer 0."""
    ids, mask = inputs()
    from_json = bert().prune_heads(json.loads(json.dumps({0: [1, 2], 2: [3]})))
    assert from_json.config.pruned_heads == {0: [1, 2], 2: [3]}
    np.testing.assert_array_equal(run(from_json, ids, mask), run(bert().prune_heads({0: [1, 2], 2: [3]}), ids, mask))


def test_bad_head_index_changes_nothing():
    model = bert()
    with pytest.raises(ValueError):
        model.prune_heads({0: [1], 1: [9]})
    assert model.heads_per_layer() == [4, 4, 4] and model.config.pruned_heads == {}


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="hidden_sise"):
        BertConfig(hidden_sise=32)
    with pytest.raises(ValueError, match="not a multiple"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="n_head"):
        GPT2Config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="pruned_heads names layer 5"):
        BertConfig(**BERT, pruned_heads={5: [0]})
    with pytest.raises(ValueError, match="hidden_dropout_prob"):
        BertConfig(hidden_dropout_prob=1.5)


def test_config_json_round_trip_keeps_unknown_hf_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BERT, "num_labels": None, "id2label": {"0": "a", "1": "b"},
                                "architectures": ["BertModel"], "transformers_version": "4.0"}).replace(
        '"num_labels": null, ', ""))
    config = BertConfig.from_json_file(str(path))
    assert config.num_labels == 2 and config.extra["architectures"] == ["BertModel"]
    config.save_pretrained(str(tmp_path / "out"))
    assert BertConfig.from_pretrained(str(tmp_path / "out")) == config


def test_checkpoint_problems_are_named(tmp_path):
    model = bert()
    model.save_pretrained(str(tmp_path))
    weights = str(tmp_path / "model.safetensors")
    state = load_file(weights)

    state_bad = dict(state)
    state_bad["bert.encoder.layer.1.attention.self.key.weight"] = np.zeros((3, 32), np.float32)
    save_file(state_bad, weights)
    with pytest.raises(ValueError, match=r"bert.encoder.layer.1.attention.self.key.weight: checkpoint \(3, 32\)"):
        BertForSequenceClassification.from_pretrained(str(tmp_path))

    state_missing = {k: v for k, v in state.items() if k != "bert.embeddings.LayerNorm.bias"}
    save_file(state_missing, weights)
    with pytest.raises(ValueError, match="bert.embeddings.LayerNorm.bias"):
        BertForSequenceClassification.from_pretrained(str(tmp_path))

    save_file({**state, "bert.extra.weight": np.ones((2,), np.float32)}, weights)
    with pytest.raises(ValueError, match="bert.extra.weight"):
        BertForSequenceClassification.from_pretrained(str(tmp_path))
    lenient = BertForSequenceClassification.from_pretrained(str(tmp_path), strict=False)
    assert lenient.loading_info["unexpected"] == ["bert.extra.weight"]

    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        BertForSequenceClassification.from_pretrained(str(tmp_path))


def test_backbone_checkpoint_into_task_model_reports_new_head(tmp_path):
    backbone = BertModel(BertConfig(**BERT))
    backbone.save_pretrained(str(tmp_path))
    model = BertForSequenceClassification.from_pretrained(str(tmp_path))
    assert model.loading_info["newly_initialized"] == ["classifier.weight", "classifier.bias"]
    np.testing.assert_array_equal(model.bert.encoder.layer[0].output.dense.weight.asnumpy(),
                                  backbone.encoder.layer[0].output.dense.weight.asnumpy())


def test_counting_follows_the_structure():
    config = BertConfig(**BERT)
    model = bert()
    h, i, L, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    per_layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    embeddings = (v + config.max_position_embeddings + config.type_vocab_size) * h + 2 * h
    head = (h * h + h) + (h * config.num_labels + config.num_labels)
    assert model.num_parameters() == embeddings + L * per_layer + head

    seq = 16
    layer_flops = 2 * seq * (4 * h * h + 2 * h * i) + 4 * seq * seq * h
    head_flops = 2 * (h * h + h * config.num_labels)
    assert model.forward_flops(seq) == L * layer_flops + head_flops
    model.prune_heads({0: [0, 1]})
    head_dim = h // 4
    saved = 2 * (2 * seq * 4 * h * head_dim + 4 * seq * seq * head_dim)
    assert model.forward_flops(seq) == L * layer_flops + head_flops - saved
    assert model.num_parameters() == embeddings + L * per_layer + head - 2 * (4 * h * head_dim + 3 * head_dim)


def test_gpt2_counts_the_tied_lm_head_once():
    model = gpt2()
    base = GPT2Model(model.config)
    assert model.num_parameters() == base.num_parameters()
    seq = 8
    assert model.forward_flops(seq) == base.forward_flops(seq) + 2 * 32 * 50 * seq


def test_pre_layer_norm_bert_runs(mode):
    model = BertModel(BertConfig(**BERT, pre_layer_norm=True))
    model.set_train(False)
    ids, mask = inputs()
    sequence_output, pooled = model(ids, mask)
    assert sequence_output.shape == (2, 6, 32) and pooled.shape == (2, 32)
    assert "encoder.LayerNorm.weight" in [n for n, _ in model.parameters_and_names()]
