"""``ms_prune.prune``: activation and FLAP scores against a numpy count of the same activations,
budgets met exactly-or-under with equal key/value groups, uniform and target shapes, our Llama and a
foreign grouped-query decoder, both modes."""
import json

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import ms_prune
from ms_prune import protocol
from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
from ms_prune.models.llama import LlamaConfig, LlamaForCausalLM
from ms_prune.structured import activation_scores, layer_scores, score_units

from test_surgery import qwen

VOCAB, SEQ = 40, 8


def llama(seed=0, **changes):
    ms.set_seed(seed)
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    config.update(changes)
    return LlamaForCausalLM(LlamaConfig(**config))


def calibration(count=2, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, VOCAB, (2, SEQ)).astype(np.int32),) for _ in range(count)]


class Recorder(nn.Cell):
    """PyNative only: keeps what flows into an output projection, to count the scores in numpy."""

    def __init__(self, store):
        super().__init__()
        self.store = store

    def construct(self, x):
        self.store.append(x.asnumpy().reshape(-1, x.shape[-2], x.shape[-1]).astype(np.float64))
        return x


def recorded(model, data):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    per_layer = {"head": [], "neuron": []}
    for kind, chunks in per_layer.items():
        def make(layer, _, chunks=chunks):
            chunks.append([])
            return Recorder(chunks[-1])
        protocol.attach_gates(model, kind, make)
    model.set_train(False)
    for (ids,) in data:
        model(Tensor(ids))
    protocol.detach_gates(model, "head")
    protocol.detach_gates(model, "neuron")
    return {kind: [np.concatenate(chunks) for chunks in per_layer[kind]] for kind in per_layer}


def test_activation_and_flap_scores_equal_a_numpy_count(mode):
    model, data = llama(), calibration()
    scores = {method: activation_scores(model, data, method) for method in ("activation", "flap")}
    x = recorded(model, data)  # per layer (tokens, units, width)
    for layer in range(2):
        heads, neurons = x["head"][layer], x["neuron"][layer]
        np.testing.assert_allclose(scores["activation"].heads[layer], (heads ** 2).mean(0).sum(1), rtol=1e-4)
        np.testing.assert_allclose(scores["activation"].neurons[layer], (neurons ** 2).mean(0)[:, 0], rtol=1e-4)
        o_proj = model.attention_layers()[layer].o_proj.weight.asnumpy().astype(np.float64)  # (out, in)
        column_norms = (o_proj ** 2).sum(0).reshape(4, -1)
        np.testing.assert_allclose(scores["flap"].heads[layer], (heads.var(0) * column_norms).sum(1), rtol=1e-3)
        down = model.ffn_layers()[layer].down_proj.weight.asnumpy().astype(np.float64)
        np.testing.assert_allclose(scores["flap"].neurons[layer], neurons.var(0)[:, 0] * (down ** 2).sum(0), rtol=1e-3)
    assert scores["flap"].num_batches == 2


@pytest.mark.parametrize("method", ["activation", "flap", "magnitude"])
def test_a_parameter_budget_is_met_with_equal_groups(mode, method):
    model, data = llama(), calibration()
    before = model(Tensor(data[0][0])).asnumpy()
    report = ms_prune.prune(model, {"params": "85%"}, data, method=method, verbose=False)
    assert report.params_ratio <= 0.85 and report["params_after"] == model.num_parameters()
    assert report.params_after < report.params_before and report.flops_ratio < 1.0 and report.seq_len == SEQ
    for attention in model.attention_layers():
        assert attention.num_heads >= 1 and attention.num_heads % attention.num_kv_heads == 0
    assert min(model.neurons_per_layer()) >= 1  # no layer emptied unless allowed
    after = model(Tensor(data[0][0])).asnumpy()
    assert after.shape == before.shape and np.all(np.isfinite(after))


def test_uniform_pruning_gives_one_shape_in_every_layer(mode):
    model, data = llama(num_hidden_layers=3), calibration()
    report = ms_prune.prune(model, {"flops": "70%"}, data, uniform=True, verbose=False)
    assert report.flops_ratio <= 0.70
    assert len(set(report.heads_per_layer)) == len(set(report.kv_heads_per_layer)) == 1
    assert len(set(report.neurons_per_layer)) == 1 and report.neurons_per_layer[0] < 24


def test_a_uniformly_pruned_llama_saves_as_a_standard_model(tmp_path):
    model, data = llama(), calibration()
    ms_prune.prune(model, {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 10}, data,
                   verbose=False)
    ids = Tensor(data[0][0])
    model.set_train(False)
    before = model(ids).asnumpy()
    model.save_pretrained(str(tmp_path), standard=True)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"],
            config["head_dim"]) == (2, 1, 10, 8)
    assert "pruned_heads" not in config and "pruned_ffn_neurons" not in config
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path))
    assert reloaded.config.pruned_heads == {} and reloaded.heads_per_layer() == [2, 2]
    reloaded.set_train(False)
    np.testing.assert_allclose(reloaded(ids).asnumpy(), before, atol=1e-6)
    model.prune_ffn_neurons({0: [model.ffn_layers()[0].kept_neurons[0]]})  # per-layer widths: no standard form
    with pytest.raises(ValueError, match=r"one shape for every layer.*\(2, 1, 9\), \(2, 1, 10\)"):
        model.save_pretrained(str(tmp_path / "again"), standard=True)
    with pytest.raises(NotImplementedError, match="export_hf_dense"):
        GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2)).standard_config()


def test_a_target_shape(mode):
    model, data = llama(), calibration()
    report = ms_prune.prune(model, {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 10},
                            data, method="flap", verbose=False)
    assert report.heads_per_layer == [2, 2] and report.kv_heads_per_layer == [1, 1]
    assert report.neurons_per_layer == [10, 10] and model.neurons_per_layer() == [10, 10]
    assert all(a.num_kv_heads == 1 for a in model.attention_layers())


def test_a_foreign_grouped_query_model(mode):
    model = qwen()
    data = [(np.random.default_rng(i).integers(0, 40, (2, 6)).astype(np.int32),) for i in range(2)]
    report = ms_prune.prune(model, {"flops": "60%"}, data, method="flap", verbose=False)
    assert report.flops_ratio <= 0.6 and report.seq_len == 6
    for layer in model.layers:
        cell = layer.self_attn
        assert cell.num_heads == cell.num_key_value_heads * cell.num_key_value_groups >= 1


def test_scores_reused_for_several_copies_give_the_same_result():
    data = calibration()
    scores = score_units(llama(), "activation", data)
    first, second = llama(), llama()
    ms_prune.prune(first, {"params": "80%"}, scores=scores, method="activation", seq_len=SEQ, verbose=False)
    ms_prune.prune(second, {"params": "80%"}, scores=scores, method="activation", seq_len=SEQ, verbose=False)
    assert first.heads_per_layer() == second.heads_per_layer()
    assert first.neurons_per_layer() == second.neurons_per_layer()


def test_the_report_prints_a_table(capsys):
    model = llama()
    report = ms_prune.prune(model, {"params": "90%"}, method="random", seq_len=SEQ)
    printed = capsys.readouterr().out
    assert "kv heads" in printed and f"x{report.params_ratio:.3f}" in printed and "FLOPs/sequence" in printed
    assert report.pruned_heads or report.pruned_neurons


@pytest.mark.parametrize("constraints, match", [
    ({"hidden_size": 33}, r"hidden_size.. must be in 1..32"),
    ({"params": "80%", "intermediate_size": 8}, "not both"),
    ({"num_attention_heads": 3}, "equal groups"),
    ({"params": "1%"}, "reachable"),
    ({"intermediate_size": 99}, "intermediate_size must be in 1..24"),
])
def test_bad_constraints_are_named(constraints, match):
    with pytest.raises(ValueError, match=match):
        ms_prune.prune(llama(), constraints, method="random", seq_len=SEQ, verbose=False)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="method"):
        ms_prune.prune(llama(), {"params": "80%"}, method="taylor", seq_len=SEQ)
    with pytest.raises(ValueError, match="method='activation' needs data: calibration batches of the model's inputs"):
        ms_prune.prune(llama(), {"params": "80%"}, method="activation", seq_len=SEQ)
    with pytest.raises(ValueError, match="depth needs data"):
        ms_prune.prune(llama(), {"num_hidden_layers": 1}, method="random", seq_len=SEQ)
    with pytest.raises(ValueError, match="units entries"):
        ms_prune.prune(llama(), {"params": "80%"}, method="random", units=("blocks",), seq_len=SEQ)


# ---- depth ---------------------------------------------------------------------------------------
class InOut(protocol.LayerWrapper):
    """PyNative only: keeps a layer's input and output hidden states, to count block influence in numpy."""

    def __init__(self, layer, store):
        super().__init__(layer)
        object.__setattr__(self, "store", store)

    def construct(self, hidden, *args):
        out = self.layer(hidden, *args)
        self.store.append((hidden.asnumpy().reshape(-1, hidden.shape[-1]), out.asnumpy().reshape(-1, out.shape[-1])))
        return out


def test_block_influence_equals_a_numpy_count(mode):
    model, data = llama(num_hidden_layers=3), calibration()
    scores = layer_scores(model, data)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    layers, stores = model.transformer_layers(), []
    originals = [layers[i] for i in range(3)]
    for i in range(3):
        stores.append([])
        layers[i] = InOut(originals[i], stores[-1])
    protocol.refresh(model)
    model.set_train(False)
    for (ids,) in data:
        model(Tensor(ids))
    for i, store in enumerate(stores):
        x = np.concatenate([a for a, _ in store]).astype(np.float64)
        y = np.concatenate([b for _, b in store]).astype(np.float64)
        cosine = (x * y).sum(1) / np.sqrt((x * x).sum(1) * (y * y).sum(1))
        np.testing.assert_allclose(scores[i], 1.0 - cosine.mean(), rtol=1e-4, atol=1e-6)


def test_removed_layers_compute_what_identity_layers_compute(mode, tmp_path):
    """A pre-LN layer whose o_proj and down_proj are zero adds nothing: the model without it must
    compute exactly that; the config's depth and per-layer records follow, and it reloads."""
    data = calibration()
    ids = Tensor(data[0][0])
    reference = llama(num_hidden_layers=3)
    for cell in (reference.attention_layers()[1].o_proj, reference.ffn_layers()[1].down_proj):
        cell.weight.set_data(Tensor(np.zeros(cell.weight.shape, np.float32)))
    reference.set_train(False)
    expected = reference(ids).asnumpy()
    model = llama(num_hidden_layers=3)
    model.prune_heads({2: [0, 1]})
    model.prune_ffn_neurons({0: [3]})
    model.remove_layers([1])
    assert model.config.num_hidden_layers == 2 and model.heads_per_layer() == [4, 2]
    assert model.config.pruned_heads == {1: [0, 1]} and model.config.pruned_ffn_neurons == {0: [3]}
    assert "model.layers.1.self_attn.q_proj.weight" in dict(model.parameters_and_names())
    unpruned = llama(num_hidden_layers=3)
    unpruned.remove_layers([1])
    unpruned.set_train(False)
    np.testing.assert_allclose(unpruned(ids).asnumpy(), expected, atol=1e-5)
    model.save_pretrained(str(tmp_path))
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path))
    model.set_train(False)
    reloaded.set_train(False)
    np.testing.assert_array_equal(reloaded(ids).asnumpy(), model(ids).asnumpy())
    with pytest.raises(ValueError, match="would leave no transformer layer"):
        model.remove_layers([0, 1])
    with pytest.raises(ValueError, match="layers 0..1"):
        model.remove_layers([5])


def test_prune_to_a_depth_and_width_shape(mode):
    model, data = llama(num_hidden_layers=3), calibration()
    influence = layer_scores(model, data)
    report = ms_prune.prune(model, {"num_hidden_layers": 2, "intermediate_size": 12}, data, verbose=False)
    assert report.layers_removed == [int(np.argmin(influence))]
    assert model.config.num_hidden_layers == 2 and report.neurons_per_layer == [12, 12]
    assert report.params_ratio < 1.0


def test_a_budget_met_by_removing_layers_alone(mode):
    model, data = llama(num_hidden_layers=4), calibration()
    report = ms_prune.prune(model, {"params": "90%"}, data, units=("layers",), verbose=False)
    assert report.params_ratio <= 0.9 and len(report.layers_removed) >= 1
    assert model.heads_per_layer() == [4] * (4 - len(report.layers_removed))
    assert model.neurons_per_layer() == [24] * (4 - len(report.layers_removed))
    with pytest.raises(ValueError, match="layers and width together"):
        ms_prune.prune(llama(), {"params": "90%"}, data, units=("layers", "heads"))


def test_gpt2_and_bert_count_their_layers_after_removal():
    from ms_prune.models.bert import BertConfig, BertModel
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=3, n_head=2))
    gpt2.remove_layers([0, 2])
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=8, max_position_embeddings=16))
    bert.remove_layers([1])
    assert gpt2.config.n_layer == 1 and len(gpt2.transformer_layers()) == 1
    assert bert.config.num_hidden_layers == 2 and len(bert.transformer_layers()) == 2


@pytest.mark.parametrize("uniform", [False, True])
def test_refit_brings_the_pruned_model_closer_to_the_unpruned_one(uniform):
    """The least-squares refit lowers every layer's reconstruction error on the calibration data,
    and with it the distance of the pruned model's logits from the unpruned model's."""
    data = calibration(4)
    ids = Tensor(data[0][0])
    reference = llama()
    reference.set_train(False)
    want = reference(ids).asnumpy()
    scores = score_units(llama(), "activation", data)
    distance, reports = {}, {}
    for refit in (False, True):
        model = llama()
        reports[refit] = ms_prune.prune(model, {"params": "85%"}, data, scores=scores, uniform=uniform, refit=refit,
                                        verbose=False)
        model.set_train(False)
        distance[refit] = float(np.square(model(ids).asnumpy() - want).mean())
    refit = reports[True].refit
    assert reports[False].refit is None and reports[True].heads_per_layer == reports[False].heads_per_layer
    for kind in ("head", "neuron"):  # least squares never does worse than the plain kept units
        assert all(a >= b - 1e-9 for a, b in zip(refit[f"{kind}_error"], refit[f"{kind}_error_refit"]))
    errors = [sum(sum(refit[f"{kind}_error{suffix}"]) for kind in ("head", "neuron")) for suffix in ("", "_refit")]
    assert errors[1] < errors[0] and errors[0] > 0, refit
    assert distance[True] < distance[False], distance
