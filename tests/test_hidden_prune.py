"""Hidden-size pruning (Minitron's embedding channels): the protocol's ``HiddenChannels`` declaration
and its one surgery ``slice_hidden``, through ``ms_prune.prune(model, {"hidden_size": N})``: dead
channels removed without changing the logits, the activation scores against a numpy count, tied and
untied LM heads, save/reload and the standard config, a foreign model declared by its adapter, and
the errors. Both modes."""
import json

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import ms_prune
from ms_prune import cost, protocol
from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
from ms_prune.models.llama import LlamaForCausalLM
from ms_prune.structured import hidden_scores

from test_structured_prune import SEQ, calibration, llama
from test_surgery import HIDDEN, LAYERS, QwenAdapter, QwenModel, qwen

DEAD = [1, 4, 5, 11, 20, 31]
KEPT = [c for c in range(32) if c not in DEAD]


def logits(model, ids):
    model.set_train(False)
    return model(Tensor(ids)).asnumpy()


def set_array(param, change):
    array = param.asnumpy().copy()
    change(array)
    param.set_data(Tensor(array))


def with_dead_channels(tied):
    """Channels DEAD are zero in the residual stream: zero embedding columns, and no layer writes them
    (zero rows of o_proj and down_proj), so every projection reading them reads zeros."""
    model = llama(tie_word_embeddings=tied)

    def kill_columns(a):
        a[:, DEAD] = 0.0

    def kill_rows(a):
        a[DEAD] = 0.0
    set_array(model.model.embed_tokens.weight, kill_columns)
    for layer in model.model.layers:
        set_array(layer.self_attn.o_proj.weight, kill_rows)
        set_array(layer.mlp.down_proj.weight, kill_rows)
    return protocol.refresh(model)


def renormalised(model, kept, total):
    """The dense model whose RMSNorms compute what the pruned ones do: a norm over ``kept`` of
    ``total`` channels divides by the mean square over ``kept`` channels, i.e. with the dead ones at 0,
    rsqrt(s / kept + eps) = sqrt(kept / total) ** -1 * rsqrt(s / total + eps * kept / total); so
    weights times sqrt(kept / total) and eps times kept / total, exactly."""
    ratio = kept / total
    for _, cell in model.cells_and_names():
        if type(cell).__name__ == "LlamaRMSNorm":
            set_array(cell.weight, lambda a: a.__imul__(np.float32(np.sqrt(ratio))))
            cell.eps = cell.eps * ratio
    return protocol.refresh(model)


def test_dead_channels_are_sliced_without_changing_the_logits(mode):
    dead_channels_are_sliced_exactly(tied=True, method="activation")


def test_dead_channels_are_sliced_from_an_untied_model_by_magnitude():
    dead_channels_are_sliced_exactly(tied=False, method="magnitude")


def dead_channels_are_sliced_exactly(tied, method):
    data = calibration()
    ids = data[0][0]
    expected = logits(renormalised(with_dead_channels(tied), len(KEPT), 32), ids)
    model = with_dead_channels(tied)
    logits(model, ids)  # a graph compiled before the surgery must not run after it
    report = ms_prune.prune(model, {"hidden_size": len(KEPT)}, data, method=method, verbose=False)
    assert report.kept_hidden_channels == KEPT and report.hidden_method == method
    assert (report.hidden_size_before, report.hidden_size_after, model.config.hidden_size) == (32, 26, 26)
    assert model.config.head_dim == 8 and report.heads_per_layer == [4, 4]  # heads untouched
    np.testing.assert_allclose(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    assert tuple(model.model.embed_tokens.weight.shape) == (40, 26)
    if not tied:
        assert tuple(model.lm_head.weight.shape) == (40, 26) and model.lm_head.in_features == 26
    assert report.params_after == model.num_parameters() == cost.num_parameters(model) < report.params_before


class Recorder(protocol.LayerWrapper):
    """PyNative only: keeps a norm's outputs."""

    def __init__(self, layer, store):
        super().__init__(layer)
        object.__setattr__(self, "store", store)

    def construct(self, x):
        y = self.layer(x)
        self.store.append(y.asnumpy().reshape(-1, y.shape[-1]).astype(np.float64))
        return y


def test_activation_channel_scores_equal_a_numpy_count(mode):
    model, data = llama(), calibration()
    scores = hidden_scores(model, "activation", data)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    norms = protocol.hidden_of(model).norms
    assert len(norms) == 4  # each layer's two norms
    stores = []
    for path in norms:
        owner, name = protocol.resolve_path(model, path)
        stores.append([])
        setattr(owner, name, Recorder(getattr(owner, name), stores[-1]))
    protocol.refresh(model)
    for (ids,) in data:
        logits(model, ids)
    expected = sum(np.abs(np.concatenate(store)).mean(0) for store in stores)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    embedding = model.model.embed_tokens.weight.asnumpy().astype(np.float64)
    np.testing.assert_allclose(hidden_scores(model, "magnitude"), np.linalg.norm(embedding, axis=0), rtol=1e-6)


def test_with_the_other_target_keys_saves_reloads_and_gives_a_standard_config(tmp_path, capsys):
    model, data = llama(tie_word_embeddings=False), calibration()
    ids = data[0][0]
    report = ms_prune.prune(model, {"hidden_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1,
                                    "intermediate_size": 10}, data, method="flap")
    assert "hidden size 32 -> 24" in capsys.readouterr().out and report.hidden_method == "activation"
    assert report.heads_per_layer == [2, 2] and report.neurons_per_layer == [10, 10]
    before = logits(model, ids)
    model.save_pretrained(str(tmp_path / "compact"))
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "compact"))
    np.testing.assert_allclose(logits(reloaded, ids), before, atol=1e-6)
    model.save_pretrained(str(tmp_path / "standard"), standard=True)
    with open(tmp_path / "standard" / "config.json") as f:
        config = json.load(f)
    assert (config["hidden_size"], config["head_dim"], config["num_attention_heads"], config["intermediate_size"]) \
        == (24, 8, 2, 10)
    assert "pruned_heads" not in config and "pruned_ffn_neurons" not in config
    standard = LlamaForCausalLM.from_pretrained(str(tmp_path / "standard"))
    np.testing.assert_allclose(logits(standard, ids), before, atol=1e-6)
    # counted from the shapes: the pruned model costs what a model built at that shape costs
    assert cost.forward_flops(model, SEQ) == cost.forward_flops(standard, SEQ) == report.flops_after
    assert cost.num_parameters(model) == cost.num_parameters(standard) == report.params_after


# ---- a foreign decoder (nn.Dense, nn.LayerNorm, nn.Embedding) declared by its adapter alone ----
class HiddenQwen(QwenModel):
    pass


class HiddenQwenAdapter(QwenAdapter):
    size_attributes = ("embed_tokens.embedding_size",)  # nn.Embedding reshapes its output with it

    def hidden_channels(self):
        parameters = {"embed_tokens.embedding_table": 1, "norm.gamma": 0, "norm.beta": 0, "lm_head.weight": 1}
        norms = []
        for i in range(len(self.model.layers)):
            base = f"layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                parameters.update({f"{base}{norm}.gamma": 0, f"{base}{norm}.beta": 0})
                norms.append(base + norm)
            parameters.update({base + p: 1 for p in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                     "self_attn.v_proj.weight", "gate_proj.weight", "up_proj.weight")})
            parameters.update({base + "self_attn.o_proj.weight": 0, base + "down_proj.weight": 0})
        return protocol.HiddenChannels(self.model.embed_tokens.embedding_size, parameters, norms=norms,
                                       embedding="embed_tokens.embedding_table", attributes=self.size_attributes)


protocol.register_adapter(HiddenQwen, HiddenQwenAdapter)


def test_a_foreign_model_declared_by_its_adapter(mode):
    ms.set_seed(0)
    model = HiddenQwen()
    data = [(np.random.default_rng(i).integers(0, 40, (2, 6)).astype(np.int32),) for i in range(2)]
    report = ms_prune.prune(model, {"hidden_size": 20, "num_attention_heads": 2}, data, verbose=False)
    assert (report.hidden_size_before, report.hidden_size_after) == (HIDDEN, 20)
    hidden = protocol.hidden_of(model)
    for path, axis in hidden.parameters.items():
        owner, name = protocol.resolve_path(model, path)
        assert getattr(owner, name).shape[axis] == 20, path
    assert model.lm_head.weight.shape[1] == 20 and model.layers[0].self_attn.num_heads == 2
    out = logits(model, data[0][0])
    assert out.shape == (2, 6, 40) and np.all(np.isfinite(out))


def test_an_undeclared_size_attribute_is_restored_by_the_probe():
    ms.set_seed(0)
    model = HiddenQwen()
    ids = np.arange(12, dtype=np.int32).reshape(2, 6) % 40
    before = logits(model, ids)
    protocol.remember_inputs(model, (ids,))
    HiddenQwenAdapter.size_attributes = ()
    try:
        with pytest.raises(protocol.SurgeryError, match=r"slice_hidden.*HiddenChannels\(attributes="):
            protocol.slice_hidden(model, list(range(16)))
    finally:
        HiddenQwenAdapter.size_attributes = ("embed_tokens.embedding_size",)
    assert model.embed_tokens.embedding_table.shape == (40, HIDDEN)
    np.testing.assert_array_equal(logits(model, ids), before)


@pytest.mark.parametrize("value, error, match", [
    (0, ValueError, r"constraints\['hidden_size'\] must be an int in \[1"),
    (33, ValueError, r"hidden_size'\] must be in 1..32"),
    (16.0, TypeError, "must be an int"),
])
def test_bad_hidden_sizes_are_named(value, error, match):
    with pytest.raises(error, match=match):
        ms_prune.prune(llama(), {"hidden_size": value}, method="random", seq_len=SEQ, verbose=False)


def test_models_that_declare_no_hidden_channels_are_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="GPT2LMHeadModel cannot be hidden-pruned.*declare_hidden"):
        ms_prune.prune(gpt2, {"hidden_size": 8}, method="random", seq_len=SEQ, verbose=False)
    with pytest.raises(ValueError, match="QwenModel cannot be hidden-pruned.*declares no hidden_channels"):
        protocol.slice_hidden(qwen(), [0, 1])
    for keep, match in (([], "at least one"), ([3, 1], "sorted"), ([0, 32], r"out of range: \[32\]")):
        with pytest.raises(ValueError, match=match):
            protocol.slice_hidden(llama(), keep)
    assert LAYERS == 2
