"""One cost model (``ms_prune.cost``) for every model and every pruning axis, against counts written
out from the architecture alone: our Llama (grouped-query, tied and untied LM head) and a foreign
grouped-query decoder (tests/test_surgery.py) before and after pruning heads within groups, whole
key/value groups and FFN neurons; random-LTD's kept tokens; GradNAS's CostModel predictions. (BERT and
GPT-2: tests/test_models.py, test_counting_follows_the_structure and the GPT-2 tied head.)"""
import pytest
import mindspore as ms

from ms_prune import cost, protocol
from ms_prune.cost import CostModel
from ms_prune.models.llama import LlamaConfig, LlamaForCausalLM
from ms_prune.token_drop import convert_to_random_ltd, forward_flops_with_ltd

from test_surgery import DIM, FFN, HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, QwenAdapter, QwenModel, qwen

S, B = 12, 3


def decoder_flops(hidden, dims, seq, lm_head_vocab=0):
    """2 x multiply-adds of a pre-LN decoder from its per-layer widths: dims = [(query heads, key/value
    heads, head_dim, FFN width)], one forward of one sequence."""
    flops = 2 * hidden * lm_head_vocab * seq
    for heads, kv_heads, head_dim, ffn in dims:
        per_token = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * ffn
        flops += 2 * per_token * seq + 4 * seq * seq * heads * head_dim
    return flops


def decoder_params(hidden, dims, vocab, untied_head, biases):
    params = vocab * hidden * (2 if untied_head else 1) + hidden  # embeddings, final norm
    for heads, kv_heads, head_dim, ffn in dims:
        params += 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * ffn + 2 * hidden
        params += biases * ((heads + 2 * kv_heads) * head_dim + hidden)  # q/k/v and o_proj biases
    return params


@pytest.mark.parametrize("tied", [True, False])
def test_llama_counts_before_and_after_pruning(tied):
    ms.set_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=20, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tied,
                         attention_bias=not tied)
    model = LlamaForCausalLM(config)
    dims = [(6, 2, 8, 20)] * 2
    assert model.forward_flops(S, B) == B * decoder_flops(48, dims, S, lm_head_vocab=40)
    assert model.num_parameters() == cost.num_parameters(model) == decoder_params(48, dims, 40, not tied, not tied)
    model.prune_heads({0: [0, 1, 2], 1: [1, 2, 4, 5]})  # a whole group; one head in each group
    dims = [(3, 1, 8, 20), (2, 2, 8, 20)]
    assert model.forward_flops(S, B) == B * decoder_flops(48, dims, S, lm_head_vocab=40)
    assert model.num_parameters() == decoder_params(48, dims, 40, not tied, not tied)


def test_foreign_grouped_query_model_counts_from_its_declaration():
    model = qwen()
    dims = [(HEADS, KV_HEADS, DIM, FFN)] * LAYERS
    adapter = protocol.adapter(model)
    # its LM head is outside the layers and not declared: not counted unless the adapter says so
    assert cost.forward_flops(model, S, B) == adapter.forward_flops(S, B) == B * decoder_flops(HIDDEN, dims, S)
    layer_norms = 2 * 2 * HIDDEN  # nn.LayerNorm has weight and bias
    biases = (HEADS + 2 * KV_HEADS) * DIM  # q/k/v biases, no o_proj bias
    expected = decoder_params(HIDDEN, dims, VOCAB, True, 0) + LAYERS * (biases + layer_norms - 2 * HIDDEN) + HIDDEN
    assert cost.num_parameters(model) == expected

    class WithHead(QwenAdapter):
        def extra_flops(self, seq_len, batch_size=1):
            return 2 * HIDDEN * VOCAB * seq_len * batch_size

    assert cost.forward_flops(WithHead(model), S, B) == B * decoder_flops(HIDDEN, dims, S, lm_head_vocab=VOCAB)
    adapter.prune_heads({0: [0, 1], 1: [1, 3]})
    adapter.prune_ffn_neurons({0: list(range(10)), 1: [0]})
    dims = [(2, 1, DIM, FFN - 10), (2, 2, DIM, FFN - 1)]
    assert cost.forward_flops(model, S, B) == B * decoder_flops(HIDDEN, dims, S)


def test_random_ltd_counts_each_layer_on_its_kept_tokens():
    model = qwen()
    full = cost.forward_flops(model, S, B)
    convert_to_random_ltd(model, layer_ids=[1], kept_length=5)
    dims = [(HEADS, KV_HEADS, DIM, FFN)]
    assert forward_flops_with_ltd(model, S, B) == B * (decoder_flops(HIDDEN, dims, S) + decoder_flops(HIDDEN, dims, 5))
    assert cost.forward_flops(model, S, B) == full  # the model's own count runs every token


@pytest.mark.parametrize("metric", ["flops", "params"])
def test_the_cost_model_predicts_what_is_counted(metric):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=20, num_hidden_layers=3,
                                         num_attention_heads=6, num_key_value_heads=2))
    costs = CostModel(model, metric, S)
    plan = {0: [0, 1, 2], 1: [1, 2, 4, 5], 2: list(range(6))}
    model.prune_heads(plan)
    heads, kv = model.heads_per_layer(), [a.num_kv_heads for a in model.attention_layers()]
    assert (heads, kv) == ([3, 2, 0], [1, 2, 0])
    assert costs.cost_of(heads, model.neurons_per_layer(), kv_heads=kv) == cost.measure(model, metric, S)
    model.prune_ffn_neurons({0: list(range(5)), 2: list(range(20))})
    assert costs.cost_of(heads, [15, 20, 0], kv_heads=kv) == cost.measure(model, metric, S)
    assert costs.floor < costs.base  # every head gone takes the key/value heads along
    emptied = model.config.copy(pruned_heads={i: list(range(6)) for i in range(3)},
                                pruned_ffn_neurons={i: list(range(20)) for i in range(3)})
    assert costs.floor == cost.measure(LlamaForCausalLM(emptied), metric, S)
