"""Parameters and FLOPs of any model of the protocol, counted in one place from its declarations.

FLOPs are 2 per multiply-add of one forward pass: every projection inside the transformer layers
(a sub-Cell with a 2-D ``weight``) on every token the layer sees, the attention matmuls (QK^T and
PV) of the declared heads, and what the adapter declares outside the layers
(``TransformerAdapter.extra_flops``: an LM head on every token, a classifier once per sequence;
0 unless declared). Elementwise work is not counted. Parameters: every Parameter of the model.

The models' ``forward_flops``/``num_parameters``, the adapters', random-LTD's accounting of kept
tokens (``tokens_per_layer``) and GradNAS's budgets all count here. The cost of a model is linear
in its heads and neurons per layer: ``cost = base + sum_l heads_l * head_cost_l + sum_l neurons_l *
neuron_cost_l`` (:class:`CostModel`), with the unit costs from the shapes of the declared
projections (a head's slice of Q/K/V and of the output projection, plus its attention matmuls; a
neuron's row of the FFN input projection(s) and column of the output projection), so predicted and
counted costs agree exactly.

Grouped-query attention: a key/value head goes only with its whole group of query heads, so a
query head is charged its Q and output slices and its attention matmuls; the key/value heads stay
in ``base`` for the selectors (which treat them as kept), ``cost_of(..., kv_heads=)`` subtracts those
that went with their whole group, and ``floor`` (the least a model can cost) counts them gone where
a layer may lose every head.
"""
import numpy as np
from mindspore import nn

from ms_prune.protocol import adapter, attention_flops, resolve_cell

__all__ = ["CostModel", "forward_flops", "layer_flops", "num_parameters", "projections"]


def projections(cell):
    """The projections below ``cell``: sub-Cells (``cell`` included) with a 2-D ``weight``
    Parameter of their own, each once (a wrapper that shares its layer's weight is the same one);
    embedding tables are lookups, not projections."""
    seen, found = set(), []
    for _, sub in cell.cells_and_names():
        weight = sub._params.get("weight")  # pylint: disable=protected-access
        if weight is None or len(weight.shape) != 2 or isinstance(sub, nn.Embedding) or id(weight) in seen:
            continue
        seen.add(id(weight))
        found.append(weight)
    return found


def layer_flops(layer, attention, tokens, batch_size=1):
    """FLOPs of one transformer layer on ``tokens`` tokens per sequence: its projections on each
    token, and the declared attention's matmuls (``attention``: its ``AttentionHeads``, or None)."""
    flops = sum(2 * int(np.prod(w.shape)) for w in projections(layer)) * tokens * batch_size
    if attention is not None:
        flops += attention_flops(attention.num_heads, attention.head_dim, tokens) * batch_size
    return flops


def forward_flops(model, seq_len, batch_size=1, tokens_per_layer=None):
    """FLOPs of one forward pass of ``batch_size`` sequences of ``seq_len`` tokens (see the module
    docstring). ``tokens_per_layer``: how many tokens each layer sees, where fewer than ``seq_len``
    (random-LTD's kept tokens)."""
    model_adapter = adapter(model)
    layers = model_adapter.layers()
    tokens_per_layer = tokens_per_layer or [seq_len] * len(layers)
    flops = int(model_adapter.extra_flops(seq_len, batch_size))
    for i, tokens in enumerate(tokens_per_layer):
        flops += layer_flops(layers[i], _attention_or_none(model_adapter, i), tokens, batch_size)
    return int(flops)


def _attention_or_none(model_adapter, layer):
    try:
        return model_adapter.attention(layer)
    except NotImplementedError:  # a model declared for token or layer dropping only
        return None


def num_parameters(model):
    """Every Parameter of the model, each once."""
    seen = {}
    for param in model.get_parameters():
        seen[id(param)] = int(np.prod(param.shape))
    return int(sum(seen.values()))


def measure(model, metric, seq_len):
    """The model's ``metric`` ('flops' of one ``seq_len``-token sequence, or 'params')."""
    return forward_flops(model, seq_len) if metric == "flops" else num_parameters(model)


def _dims(cell, layout):
    """(in_features, out_features, has_bias) of a projection Cell from its weight's shape."""
    rows, cols = cell.weight.shape
    has_bias = 1 if getattr(cell, "bias", None) is not None else 0
    return (cols, rows, has_bias) if layout == "linear" else (rows, cols, has_bias)


def _cost(weights, biases, metric, seq_len):
    """Parameters, or FLOPs (2 per weight per token; biases are elementwise work)."""
    return 2 * weights * seq_len if metric == "flops" else weights + biases


def head_cost(heads, metric, seq_len):
    """What one head of ``heads`` (an ``AttentionHeads``) costs: its slice of the query (and, without
    grouping, key and value) projections with their bias, its columns of the output projection
    (whose bias stays), and its attention matmuls."""
    dim, layout = heads.head_dim, heads.layout
    cost = attention_flops(1, dim, seq_len) if metric == "flops" else 0
    if heads.qkv is not None:
        inputs, _, bias = _dims(resolve_cell(heads.cell, heads.qkv), layout)
        cost += _cost(3 * dim * inputs, 3 * dim * bias, metric, seq_len)
    else:
        paths = (heads.query,) if heads.num_kv_heads != heads.num_heads else (heads.query, heads.key, heads.value)
        for path in paths:
            inputs, _, bias = _dims(resolve_cell(heads.cell, path), layout)
            cost += _cost(dim * inputs, dim * bias, metric, seq_len)
    _, outputs, _ = _dims(heads.output_projection(), layout)
    return cost + _cost(dim * outputs, 0, metric, seq_len)


def grouped(heads):
    return heads.qkv is None and heads.num_kv_heads != heads.num_heads


def kv_head_cost(heads, metric, seq_len):
    """What one key/value head of a grouped-query attention costs: its rows of the key and value
    projections (and their bias); 0 without grouping (a head's key and value are its own)."""
    if not grouped(heads) or not heads.num_heads:
        return 0
    cost = 0
    for path in (heads.key, heads.value):
        inputs, _, bias = _dims(resolve_cell(heads.cell, path), heads.layout)
        cost += _cost(heads.head_dim * inputs, heads.head_dim * bias, metric, seq_len)
    return cost


def kv_heads_per_layer(model):
    """Key/value heads per layer (0 for fused QKV). Counted whether or not the layer is grouped NOW: a
    grouped layer pruned to one query head per key/value head is no longer ``grouped`` but still
    has those key/value heads (layers not grouped when the CostModel was built have kv cost 0)."""
    return [a.num_kv_heads if a.qkv is None else 0 for a in adapter(model).attentions()]


def neuron_cost(ffn, metric, seq_len):
    """What one FFN neuron costs: a row of each input projection (and its bias), a column of the
    output projection."""
    cost = 0
    for path in ffn.inputs:
        inputs, _, bias = _dims(resolve_cell(ffn.cell, path), ffn.layout)
        cost += _cost(inputs, bias, metric, seq_len)
    _, outputs, _ = _dims(ffn.output_projection(), ffn.layout)
    return cost + _cost(outputs, 0, metric, seq_len)


class CostModel:
    """Exact cost of the model for any heads/neurons per layer (see the module's docstring)."""

    def __init__(self, model, metric, seq_len):
        self.metric, self.seq_len = metric, seq_len
        model_adapter = adapter(model)
        attentions, ffns = model_adapter.attentions(), model_adapter.ffns() or []
        self.head_costs = [head_cost(a, metric, seq_len) if a.num_heads else 0 for a in attentions]
        self.neuron_costs = [neuron_cost(f, metric, seq_len) if f.num_neurons else 0 for f in ffns]
        self.kv_head_costs = [kv_head_cost(a, metric, seq_len) for a in attentions]
        self.kv_heads = kv_heads_per_layer(model)
        self.current = measure(model, metric, seq_len)
        self.base = self.current - self.cost_of([a.num_heads for a in attentions],
                                                [f.num_neurons for f in ffns], with_base=False)
        # the least the model can cost: a layer that loses every query head loses its key/value
        # heads too, which ``base`` keeps (the selectors treat them as kept)
        emptied = [0] * len(self.kv_heads) if model_adapter.empty_layers_allowed else self.kv_heads
        self.floor = self.cost_of([0] * len(attentions), [0] * len(ffns), kv_heads=emptied)

    def cost_of(self, heads, neurons, with_base=True, kv_heads=None):
        units = sum(h * c for h, c in zip(heads, self.head_costs)) + sum(
            n * c for n, c in zip(neurons, self.neuron_costs))
        if kv_heads is not None:  # the key/value heads that went with their whole query group
            units -= sum((before - now) * c for before, now, c in zip(self.kv_heads, kv_heads, self.kv_head_costs))
        return units + (self.base if with_base else 0)
