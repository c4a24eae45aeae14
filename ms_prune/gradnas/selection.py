"""Costs of heads and FFN neurons, budgets, and the two selectors.

The cost of a model is linear in its heads and neurons per layer:
``cost = base + sum_l heads_l * head_cost_l + sum_l neurons_l * neuron_cost_l``. The unit costs
come from the shapes of the projections the model protocol declares (``ms_prune.protocol``:
a head's slice of Q/K/V and of the output projection, plus its attention matmuls; a neuron's row
of the FFN input projection(s) and column of the output projection); ``base`` is measured with the
model's own counters (the adapter's ``forward_flops``/``num_parameters``), so predicted and
measured costs agree exactly, which ``apply_gradnas`` checks after the surgery.

Grouped-query attention: a key/value head goes only with its whole group of query heads, so a
query head is charged its Q and output slices and its attention matmuls; the key/value heads stay
in ``base`` for the selectors (which treat them as kept), and ``cost_of(..., kv_heads=)``
subtracts those that went with their whole group, so a pruned model may come in below the budget
by them, and the reachable minimum named in errors is conservative by them.
"""
import numpy as np

from ms_prune import protocol
from ms_prune.validation import check_amount_or_percent, check_choice, check_instance, check_int

METRICS = ("flops", "params")
SELECTORS = ("global", "bisect")


def measure(model, metric, seq_len):
    model_adapter = protocol.adapter(model)
    return int(model_adapter.forward_flops(seq_len)) if metric == "flops" else int(model_adapter.num_parameters())


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
    cost = protocol.attention_flops(1, dim, seq_len) if metric == "flops" else 0
    if heads.qkv is not None:
        inputs, _, bias = _dims(protocol.resolve_cell(heads.cell, heads.qkv), layout)
        cost += _cost(3 * dim * inputs, 3 * dim * bias, metric, seq_len)
    else:
        paths = (heads.query,) if heads.num_kv_heads != heads.num_heads else (heads.query, heads.key, heads.value)
        for path in paths:
            inputs, _, bias = _dims(protocol.resolve_cell(heads.cell, path), layout)
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
        inputs, _, bias = _dims(protocol.resolve_cell(heads.cell, path), heads.layout)
        cost += _cost(heads.head_dim * inputs, heads.head_dim * bias, metric, seq_len)
    return cost


def kv_heads_per_layer(model):
    """Key/value heads per layer (0 for fused QKV). Counted whether or not the layer is grouped NOW: a
    grouped layer pruned to one query head per key/value head is no longer ``grouped`` but still
    has those key/value heads (layers not grouped when the CostModel was built have kv cost 0)."""
    return [a.num_kv_heads if a.qkv is None else 0 for a in protocol.adapter(model).attentions()]


def neuron_cost(ffn, metric, seq_len):
    """What one FFN neuron costs: a row of each input projection (and its bias), a column of the
    output projection."""
    cost = 0
    for path in ffn.inputs:
        inputs, _, bias = _dims(protocol.resolve_cell(ffn.cell, path), ffn.layout)
        cost += _cost(inputs, bias, metric, seq_len)
    _, outputs, _ = _dims(ffn.output_projection(), ffn.layout)
    return cost + _cost(outputs, 0, metric, seq_len)


class CostModel:
    """Exact cost of the model for any heads/neurons per layer (see the module's docstring)."""

    def __init__(self, model, metric, seq_len):
        self.metric, self.seq_len = metric, seq_len
        model_adapter = protocol.adapter(model)
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


def parse_constraints(owner, constraints, seq_len):
    """``{"flops": "60%"}`` or ``{"params": 15e6}`` -> (metric, amount, fraction or None)."""
    check_instance(owner, "constraints", constraints, dict)
    if len(constraints) != 1 or next(iter(constraints)) not in METRICS:
        raise ValueError(f"{owner}: constraints must have exactly one key of {list(METRICS)} (e.g. "
                         f"{{'flops': '60%'}} or {{'params': 15e6}}), got {constraints!r}")
    metric, value = next(iter(constraints.items()))
    amount, fraction = check_amount_or_percent(owner, f"constraints[{metric!r}]", value)
    if metric == "flops":
        check_int(owner, "seq_len (the sequence length FLOPs are counted at)", seq_len, minimum=1)
    return metric, amount, fraction


def _order(scores, costs):
    """Units by score per unit of cost, best first; ties by (group, position) for determinism."""
    ratio = scores / np.maximum(costs, 1)
    return np.lexsort((np.arange(len(scores)), -ratio))


def _fill(keep, order, costs, room):
    """Add units in ``order`` that still fit in ``room``; the result is as close to the budget as
    the unit sizes allow."""
    for unit in order:
        if not keep[unit] and costs[unit] <= room:
            keep[unit] = True
            room -= costs[unit]
    return keep


def select_global(scores, costs, kinds, room, heads_kept=None):
    """Kwon et al. 2022: rank heads and neurons globally by score per cost; for every number of
    kept heads h, keep the h best heads and as many of the best neurons as the rest of the budget
    holds; choose the split that keeps the most total score. ``heads_kept``: use that h instead
    (e.g. another method's split, so that scores of different scales compare fairly)."""
    keep = np.zeros(len(scores), bool)
    firsts = {}
    for kind in (0, 1):
        members = np.flatnonzero(kinds == kind)
        ranked = members[_order(scores[members], costs[members])]
        firsts[kind] = (ranked, np.concatenate([[0], np.cumsum(costs[ranked])]),
                        np.concatenate([[0.0], np.cumsum(scores[ranked])]))
    (heads, head_cost_sum, head_score_sum), (neurons, neuron_cost_sum, neuron_score_sum) = firsts[0], firsts[1]
    best = None
    for h in range(len(heads) + 1) if heads_kept is None else [heads_kept]:
        left = room - head_cost_sum[h]
        if left < 0:
            break
        n = int(np.searchsorted(neuron_cost_sum, left, side="right")) - 1
        candidate = (head_score_sum[h] + neuron_score_sum[n], head_cost_sum[h] + neuron_cost_sum[n], h, n)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    if best is None:
        raise ValueError(f"apply_gradnas: heads_kept={heads_kept} heads do not fit in the budget")
    _, used, h, n = best
    keep[heads[:h]] = True
    keep[neurons[:n]] = True
    return _fill(keep, _order(scores, costs), costs, room - used), {"heads_kept": int(h)}


def sensitivity_keys(scores, groups):
    """Per unit, the share of its group's total score held by the group's better units: the
    degradation threshold above which it is kept. A unit with no score comes last (key 1)."""
    keys = np.ones(len(scores))
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        values = scores[members]
        total = values.sum()
        if total <= 0:
            continue
        order = np.argsort(-values, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(values[order])[:-1]]) / total
        group_keys = np.where(values[order] > 0, before, 1.0)
        keys[members[order]] = group_keys
    return keys


def select_bisect(scores, costs, groups, room):
    """ModelOpt's gradnas: per group (the heads of a layer, the neurons of a layer) units sorted by
    score and their cumulative importance; a bisection on the threshold t finds the largest t for
    which every group keeps the units needed to hold a share t of its importance within the
    budget (the minimax choice: no group loses more than 1 - t of its importance)."""
    keys = sensitivity_keys(scores, groups)
    levels = np.unique(keys)
    cost_at = [0]  # cost_at[i]: keep units with key < levels[i]; the last entry keeps everything
    for level in levels:
        cost_at.append(int(costs[keys <= level].sum()))
    lo, hi = 0, len(levels)  # feasible index lo (0 keeps none), search the largest feasible
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost_at[mid] <= room:
            lo = mid
        else:
            hi = mid - 1
    keep = keys <= levels[lo - 1] if lo > 0 else np.zeros(len(scores), bool)
    threshold = float(levels[lo - 1]) if lo > 0 else 0.0
    order = np.lexsort((-scores, keys))
    return _fill(keep, order, costs, room - int(costs[keep].sum())), {"threshold": threshold}


def select(selector, scores, costs, kinds, groups, room, heads_kept=None):
    """Boolean keep per unit with ``sum(costs[keep]) <= room``, and selector details."""
    check_choice("apply_gradnas", "selector", selector, SELECTORS)
    if selector == "global":
        return select_global(scores, costs, kinds, room, heads_kept)
    return select_bisect(scores, costs, groups, room)
