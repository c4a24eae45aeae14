"""GradNAS: score attention heads and FFN neurons by the gradient of the loss with respect to a
mask of ones on each, keep the best under a FLOPs or parameter budget, remove the rest.

``compute_scores`` runs the scoring pass (one compiled graph per batch shape) and returns a
``GradNASScores`` that can be saved and loaded; ``apply_gradnas`` selects under a budget (from
fresh or given scores), optionally refits the kept units (Kwon et al. 2022) and prunes the model
in place. See README.md.
"""
import json
import time

import numpy as np
from mindspore import Tensor, nn

from ms_prune import protocol
from ms_prune.cost import CostModel, kv_heads_per_layer, measure
from ms_prune.fileio import atomic_write
from ms_prune.training import compile_in_pynative, release_graphs
from ms_prune.validation import check_bool, check_choice, check_instance, check_int

from . import masks as _masks
from .selection import METRICS, parse_constraints, select

METHODS = ("fisher", "abs_grad", "magnitude", "random")
UNIT_KINDS = ("heads", "neurons")
GRADIENT_METHODS = ("fisher", "abs_grad")
KINDS = ("head", "neuron")


class GradNASScores:
    """Per layer, one score per current head (``heads``) and per current FFN neuron
    (``neurons``), in the model's current order, with the original unit numbers they belong to
    (``kept_heads``, ``kept_neurons``) so they cannot be applied to a differently pruned model."""

    def __init__(self, heads, neurons, kept_heads, kept_neurons, method, num_batches=0, seconds=0.0):
        self.heads = [np.asarray(h, np.float64) for h in heads]
        self.neurons = [np.asarray(n, np.float64) for n in neurons]
        self.kept_heads = [list(map(int, k)) for k in kept_heads]
        self.kept_neurons = [list(map(int, k)) for k in kept_neurons]
        self.method, self.num_batches, self.seconds = method, int(num_batches), float(seconds)

    def to_dict(self):
        return {"format": "ms_prune.gradnas.scores/1", "method": self.method, "num_batches": self.num_batches,
                "seconds": self.seconds, "heads": [h.tolist() for h in self.heads],
                "neurons": [n.tolist() for n in self.neurons], "kept_heads": self.kept_heads,
                "kept_neurons": self.kept_neurons}

    def save(self, path):
        """JSON (floats written exactly), atomically: an interrupted save leaves the old file."""
        with atomic_write(path, binary=False) as f:
            json.dump(self.to_dict(), f)
        return path

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        if values.get("format") != "ms_prune.gradnas.scores/1":
            raise ValueError(f"GradNASScores.load: {path} is not a GradNAS score file (format "
                             f"{values.get('format')!r}, expected 'ms_prune.gradnas.scores/1')")
        return cls(values["heads"], values["neurons"], values["kept_heads"], values["kept_neurons"],
                   values["method"], values["num_batches"], values["seconds"])

    def check_matches(self, model, owner):
        heads, neurons = model_units(model)
        if heads != self.kept_heads or neurons != self.kept_neurons:
            raise ValueError(f"{owner}: these scores were computed for a model with heads per layer "
                             f"{[len(k) for k in self.kept_heads]} and neurons per layer "
                             f"{[len(k) for k in self.kept_neurons]}; the model has {[len(k) for k in heads]} "
                             f"and {[len(k) for k in neurons]} (or other unit numbers): score it again")


def model_units(model):
    """Original numbers of the current heads and FFN neurons per layer (no neurons: a model that
    declares no prunable FFN)."""
    model_adapter = protocol.adapter(model)
    attentions, ffns = model_adapter.attentions(), model_adapter.ffns()
    return [a.kept for a in attentions], [f.kept for f in ffns] if ffns is not None else [[] for _ in attentions]


def as_batch(batch):
    items = batch if isinstance(batch, (tuple, list)) else (batch,)
    return [item if isinstance(item, Tensor) else Tensor(np.asarray(item)) for item in items]


def take_batches(owner, batches, num_batches):
    """The first ``num_batches`` batches (all when None) as a list: an iterator is read once."""
    check_int(owner, "num_batches", num_batches, minimum=1, allow_none=True)
    if batches is None:
        raise ValueError(f"{owner}: method needs batches (the loss net's inputs), got None")
    taken = []
    for batch in batches:
        if num_batches is not None and len(taken) >= num_batches:
            break
        taken.append(batch)
    if not taken:
        raise ValueError(f"{owner}: batches is empty")
    return taken


def _remember_probe(model, loss_net, batch):
    """The model inputs of a scoring batch verify the model after the surgery: the loss net's first
    ``num_inputs`` items (``ModelLoss``), else all but the last (the labels), as the Trainer takes them."""
    items = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    count = getattr(loss_net, "num_inputs", -1)
    protocol.remember_inputs(model, items[:count] if len(items) > 1 else items)


class eval_mode:  # pylint: disable=invalid-name  (used as a context manager, like a function)
    """Scores and captures without dropout noise; the caller's train/eval flags come back."""

    def __init__(self, *cells):
        self.cells = cells

    def __enter__(self):
        self.flags = [c.training for c in self.cells]
        for cell in self.cells:
            cell.set_train(False)

    def __exit__(self, *exc):
        for cell, flag in zip(self.cells, self.flags):
            cell.set_train(flag)


def run_pass(cell, batches, *eval_cells):
    """Run ``cell`` once per batch (numpy or Tensor tuples), compiled in either mode, with
    ``eval_cells`` in evaluation mode, then free its graphs: the mask or capture Cells it runs are
    removed right after, so it can never run again. Returns ``cell``, whose Parameters hold what
    it collected."""
    cell = compile_in_pynative(cell)
    try:
        with eval_mode(*eval_cells):
            for batch in batches:
                cell(*as_batch(batch))
    finally:
        release_graphs(cell)
    return cell


def _gradient_scores(model, loss_net, batches, absolute):
    head_masks, neuron_masks = _masks.attach_masks(model)
    cells = [c for c in head_masks + neuron_masks if c is not None]
    try:
        step = run_pass(_masks.ScoreStep(loss_net, [c.mask for c in cells], absolute=absolute), batches,
                        loss_net, model)
        flat = np.concatenate([s.asnumpy().ravel() for s in step.scores]) if cells else np.zeros((0,))
    finally:
        _masks.detach(model)
    flat = _masks.all_reduce_sum(flat.astype(np.float32)).astype(np.float64)
    sizes = [0 if c is None else int(c.mask.shape[0]) for c in head_masks + neuron_masks]
    pieces = np.split(flat, np.cumsum(sizes)[:-1])
    return pieces[:len(head_masks)], pieces[len(head_masks):]


def output_slices(model):
    """Per layer: the output-projection slice of every head (heads, head_dim, hidden) and the
    output-projection row of every neuron (neurons, hidden), as what each unit writes."""
    model_adapter = protocol.adapter(model)
    heads, neurons = [], []
    for attention in model_adapter.attentions():
        if not attention.num_heads:
            heads.append(np.zeros((0, attention.head_dim, 0), np.float32))
            continue
        weight = attention.output_projection().weight.asnumpy()
        by_input = weight.T if attention.layout == "linear" else weight  # (heads * head_dim, hidden)
        heads.append(by_input.reshape(attention.num_heads, attention.head_dim, -1))
    for ffn in model_adapter.ffns() or []:
        if not ffn.num_neurons:
            neurons.append(np.zeros((0, 0), np.float32))
            continue
        weight = ffn.output_projection().weight.asnumpy()
        neurons.append(weight.T if ffn.layout == "linear" else weight)
    return heads, neurons


def compute_scores(model, loss_net=None, batches=None, method="fisher", num_batches=None, seed=0):
    """Score every current head and FFN neuron of ``model``.

    ``method``: 'fisher' (default; sum over batches of (d loss / d mask)^2, ModelOpt's gradnas and
    Kwon et al.), 'abs_grad' (sum of |d loss / d mask|, Michel et al. 2019), 'magnitude' (squared
    norm of the unit's output-projection slice) or 'random' (uniform, seeded by ``seed``). The
    gradient methods run ``loss_net`` (a Cell: batch -> scalar loss, wrapping ``model``) on the
    first ``num_batches`` of ``batches`` (tuples of the loss net's inputs, numpy or Tensor) in
    evaluation mode, each batch one compiled graph call with the scores accumulated in the graph;
    under msrun (``mindspore.communication.init()`` done) the scores are summed over the workers,
    so workers scoring different batches get the scores of all of them. The model's weights and
    structure are left as they were.
    """
    owner = "compute_scores"
    check_choice(owner, "method", method, METHODS)
    kept_heads, kept_neurons = model_units(model)
    start, count = time.perf_counter(), 0
    if method in GRADIENT_METHODS:
        check_instance(owner, "loss_net", loss_net, nn.Cell)
        taken = take_batches(owner, batches, num_batches)
        _remember_probe(model, loss_net, taken[0])
        heads, neurons = _gradient_scores(model, loss_net, taken, absolute=method == "abs_grad")
        count = len(taken)
    elif method == "magnitude":
        head_slices, neuron_rows = output_slices(model)
        heads = [np.square(s).sum(axis=(1, 2)) for s in head_slices]
        neurons = [np.square(r).sum(axis=1) for r in neuron_rows]
    else:
        check_int(owner, "seed", seed, minimum=0)
        rng = np.random.default_rng(seed)
        heads = [rng.random(len(k)) for k in kept_heads]
        neurons = [rng.random(len(k)) for k in kept_neurons]
    if not len(neurons):  # a model without prunable FFN neurons: none per layer
        neurons = [np.zeros(0) for _ in kept_neurons]
    return GradNASScores(heads, neurons, kept_heads, kept_neurons, method, count, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Refit (Kwon et al. 2022): least-squares mask values of the kept units, folded into the weights
# ---------------------------------------------------------------------------------------------
def _contribution_grams(model, loss_net, batches):
    """Per layer, the Gram matrices of the units' contributions to the attention output and to
    the FFN output over all tokens of ``batches``, from one forward graph with capture Cells."""
    head_slices, neuron_rows = output_slices(model)
    head_cells, neuron_cells = _masks.attach(
        model, lambda layer, _: _masks.HeadGram(head_slices[layer]),
        lambda _, ffn: _masks.NeuronGram(ffn.num_neurons))
    try:
        run_pass(_masks.Forward(loss_net), batches, loss_net, model)
        heads = [None if c is None else c.gram.asnumpy().astype(np.float64) for c in head_cells]
        neurons = [None if c is None else c.gram.asnumpy().astype(np.float64) * (rows @ rows.T)
                   for c, rows in zip(neuron_cells, [r.astype(np.float64) for r in neuron_rows])]
    finally:
        _masks.detach(model)
    return heads, neurons


def refit_values(gram, keep):
    """Mask values m of the kept units minimising ||sum_{k kept} m_k A_k - sum_{all j} A_j||^2
    given G = [<A_i, A_j>]: the normal equations G_KK m = G_K,all 1 (least squares, so a singular
    G_KK is fine)."""
    kept = np.flatnonzero(keep)
    if len(kept) == 0 or len(kept) == len(keep):
        return np.ones(len(kept))
    target = gram[np.ix_(kept, np.arange(len(keep)))].sum(axis=1)
    return np.linalg.lstsq(gram[np.ix_(kept, kept)], target, rcond=None)[0]


def reconstruction_error(gram, keep, values):
    """||sum_{k kept} m_k A_k - sum_j A_j||^2 relative to ||sum_j A_j||^2, from the Gram matrix."""
    weights = -np.ones(len(keep))
    weights[np.flatnonzero(keep)] += values
    total = gram.sum()
    return float(weights @ gram @ weights / total) if total > 0 else 0.0


def _scale_inputs(projection, layout, columns, factors):
    weight = projection.weight.asnumpy().copy()
    if layout == "linear":
        weight[:, columns] *= factors[None, :]
    else:
        weight[columns, :] *= factors[:, None]
    projection.weight.set_data(Tensor(np.ascontiguousarray(weight, np.float32)))


def refit_kept_units(model, loss_net, batches, keep_heads, keep_neurons):
    """Fold the least-squares mask values of the kept units (``keep_heads``/``keep_neurons``: per
    layer, a bool per current unit) into the output projections, so that each layer reconstructs its
    unpruned output on ``batches`` of ``loss_net``'s inputs (any Cell running the model) as well as
    its kept units can (Kwon et al. 2022); call it before the surgery removes the others. Returns
    per-layer relative errors without / with the refit."""
    head_grams, neuron_grams = _contribution_grams(model, loss_net, batches)
    model_adapter = protocol.adapter(model)
    attentions, ffns = model_adapter.attentions(), model_adapter.ffns()

    def head_target(layer, kept):
        heads = attentions[layer]
        return heads.output_projection(), heads.layout, protocol.unit_columns(kept, heads.head_dim), heads.head_dim

    def neuron_target(layer, kept):
        return ffns[layer].output_projection(), ffns[layer].layout, kept, 1

    report = {}
    for kind, grams, keeps, target in (("head", head_grams, keep_heads, head_target),
                                       ("neuron", neuron_grams, keep_neurons, neuron_target)):
        report[f"{kind}_error"], report[f"{kind}_error_refit"] = [], []
        for layer, (gram, keep) in enumerate(zip(grams, keeps)):
            if gram is None:
                continue
            values = refit_values(gram, keep)
            report[f"{kind}_error"].append(reconstruction_error(gram, keep, np.ones(int(keep.sum()))))
            report[f"{kind}_error_refit"].append(reconstruction_error(gram, keep, values))
            kept = np.flatnonzero(keep)
            if len(kept) and len(kept) < len(keep):
                projection, layout, columns, width = target(layer, kept)
                _scale_inputs(projection, layout, columns, np.repeat(values, width))
    return report


# ---------------------------------------------------------------------------------------------
# The functional form
# ---------------------------------------------------------------------------------------------
def _units(scores, cost_model):
    """Flatten the scores into units: scores, costs, and a table of (kind (0 head, 1 neuron),
    group (one per layer and kind), layer, position)."""
    rows = [(kind, 2 * layer + kind, layer, position)
            for kind, per_layer in enumerate((scores.heads, scores.neurons))
            for layer, values in enumerate(per_layer) for position in range(len(values))]
    table = np.array(rows, np.int64).reshape(-1, 4)
    values = np.concatenate([np.zeros(0)] + scores.heads + scores.neurons).astype(np.float64)
    unit_costs = (cost_model.head_costs, cost_model.neuron_costs)
    costs = np.array([unit_costs[kind][layer] for kind, _, layer, _ in table], np.int64)
    return values, costs, table


def _equal_groups(keep, scores, attention, allow_empty):
    """A layer's selection (a bool per head) cut to the best set the surgery can make: the same
    number of query heads in every kept key/value group, no more heads than selected (so the budget
    still holds)."""
    count = int(keep.sum())
    if attention.num_kv_heads == attention.num_heads or not attention.num_heads:
        return keep
    counts = [c for c in protocol.feasible_head_counts(attention.num_heads, attention.num_kv_heads, allow_empty)
              if c <= count] or [min(protocol.feasible_head_counts(attention.num_heads, attention.num_kv_heads,
                                                                    allow_empty))]
    kept = protocol.best_grouped_heads(scores, attention.num_heads, attention.num_kv_heads, max(counts))
    grouped = np.zeros_like(keep)
    grouped[kept] = True
    return grouped


def _costs(model, seq_len):
    return {metric: measure(model, metric, seq_len) if metric == "params" or seq_len else None
            for metric in METRICS}


def resolve_budget(owner, model, constraints, seq_len):
    """(CostModel, budget) for ``constraints`` on ``model``; a budget below the cost of pruning
    every head and neuron is a ValueError giving the reachable range."""
    metric, amount, fraction = parse_constraints(owner, constraints, seq_len)
    cost_model = CostModel(model, metric, seq_len)
    budget = int(amount) if fraction is None else int(np.floor(fraction * cost_model.current))
    if budget < cost_model.floor:
        raise ValueError(f"{owner}: constraints={constraints!r} asks for {metric} <= {budget:,}, but the smallest "
                         f"reachable {metric} is {cost_model.floor:,} (every head and FFN neuron pruned) and the "
                         f"largest {cost_model.current:,} (nothing pruned): reachable range "
                         f"[{cost_model.floor:,}, {cost_model.current:,}]")
    return cost_model, budget


def apply_gradnas(model, loss_net=None, batches=None, constraints=None, selector="global", seq_len=None,
                  refit=False, method="fisher", scores=None, num_batches=None, refit_batches=None, seed=0,
                  heads_kept=None, prune=("heads", "neurons"), allow_empty_layers=None):
    """Prune ``model``'s heads and FFN neurons in place to meet ``constraints`` and return what
    was done (a dict).

    ``constraints``: ``{"flops": "60%"}`` (FLOPs of one ``seq_len``-token sequence, from
    ``model.forward_flops``) or ``{"params": 15e6}``: an absolute amount or a percentage of the
    model as passed in. ``selector``: 'global' (Kwon et al. 2022) or 'bisect' (ModelOpt). The
    pruned model costs at most the budget, and as close to it as the unit sizes allow; a budget
    below the cost of pruning every head and neuron is a ValueError giving the reachable range.
    ``scores``: a ``GradNASScores`` (from ``compute_scores`` or ``GradNASScores.load``) to use
    instead of a new scoring pass with ``method`` on ``loss_net``/``batches``. ``refit=True``: the
    kept units' mask values are refitted by least squares so each layer reconstructs its unpruned
    output on ``refit_batches`` (default: the scoring batches), then folded into the output
    projections. ``heads_kept`` (selector 'global'): keep exactly that many heads (the best by
    score) and spend the rest of the budget on neurons, e.g. another method's split (its result's
    ``heads_kept``) so that baselines whose head and neuron scores are on different scales
    (magnitude, random) are compared at the same mix. ``prune``: the unit kinds it may remove
    ('heads', 'neurons'); the others stay whole. ``allow_empty_layers``: False keeps at least one
    head and one neuron in every layer (default: what the model's adapter allows). Build train steps
    and optimizers after this call (the model's Cells change).
    """
    owner = "apply_gradnas"
    metric = parse_constraints(owner, constraints, seq_len)[0]
    check_bool(owner, "refit", refit)
    check_choice(owner, "selector", selector, ("global", "bisect"))
    check_int(owner, "heads_kept", heads_kept, minimum=0, allow_none=True)
    prune = (prune,) if isinstance(prune, str) else tuple(prune)
    for kind in prune:
        check_choice(owner, "prune entries", kind, UNIT_KINDS)
    if not prune:
        raise ValueError(f"{owner}: prune must name at least one of {UNIT_KINDS}, got ()")
    model_adapter = protocol.adapter(model)
    # whether a layer may lose every head (and every neuron): the model's own say by default
    allow_empty = model_adapter.empty_layers_allowed if allow_empty_layers is None else \
        check_bool(owner, "allow_empty_layers", allow_empty_layers) and model_adapter.empty_layers_allowed
    if heads_kept is not None and selector != "global":
        raise ValueError(f"{owner}: heads_kept needs selector='global', got selector={selector!r}")
    if seq_len is not None:
        check_int(owner, "seq_len", seq_len, minimum=1)
    before = _costs(model, seq_len)
    cost_model, budget = resolve_budget(owner, model, constraints, seq_len)
    if scores is None:
        if method in GRADIENT_METHODS or refit:
            batches = take_batches(owner, batches, num_batches)
        scores = compute_scores(model, loss_net, batches, method=method, seed=seed)
    check_instance(owner, "scores", scores, GradNASScores)
    scores.check_matches(model, owner)
    values, costs, table = _units(scores, cost_model)
    if heads_kept is not None and heads_kept > int((table[:, 0] == 0).sum()):
        raise ValueError(f"{owner}: heads_kept={heads_kept}, but the model has {int((table[:, 0] == 0).sum())} heads")
    # a model whose layers may not lose every unit keeps each layer's best head (and neuron)
    # the unit kinds not in ``prune`` stay whole; their cost is part of what the budget must hold
    forced = np.isin(table[:, 0], [kind for kind, name in enumerate(UNIT_KINDS) if name not in prune])
    if not allow_empty:
        for group in np.unique(table[:, 1]):
            members = np.flatnonzero(table[:, 1] == group)
            forced[members[np.argmax(values[members])]] = True
    room = budget - cost_model.base - int(costs[forced].sum())
    # below base only by emptying layers, whose key/value heads go with them (down to floor)
    smallest = (cost_model.floor if allow_empty else cost_model.base) + int(costs[forced].sum())
    if room < 0 and budget >= smallest:
        room = 0
    if room < 0:
        kept = [f"the {kind} it may not prune ({', '.join(prune)} only)" for kind in UNIT_KINDS if kind not in prune]
        if not allow_empty:
            kept.append("at least one head and one FFN neuron per layer (allow_empty_layers=False, or its adapter's "
                        "empty_layers_allowed is False)")
        raise ValueError(f"{owner}: constraints={constraints!r} asks for {metric} <= {budget:,}, but this model keeps "
                         f"{' and '.join(kept)}: the smallest reachable {metric} is {smallest:,}")
    forced_heads = int((forced & (table[:, 0] == 0)).sum())
    if heads_kept is not None and heads_kept < forced_heads:
        raise ValueError(f"{owner}: heads_kept={heads_kept}, but this model keeps at least one head per layer "
                         f"({forced_heads})")
    free = ~forced
    keep_free, details = select(selector, values[free], costs[free], table[free, 0], table[free, 1], room,
                                None if heads_kept is None else heads_kept - forced_heads)
    keep = forced.copy()
    keep[free] = keep_free
    if "heads_kept" in details:
        details["heads_kept"] += forced_heads

    attentions, ffns = model_adapter.attentions(), model_adapter.ffns() or []
    keep_heads = [_equal_groups(keep[(table[:, 0] == 0) & (table[:, 2] == layer)], scores.heads[layer], attention,
                                allow_empty)
                  for layer, attention in enumerate(attentions)]
    keep_neurons = [keep[(table[:, 0] == 1) & (table[:, 2] == layer)] for layer in range(len(ffns))]
    refit_report = None
    if refit:
        if refit_batches is None:
            refit_batches = batches
        check_instance(owner, "loss_net", loss_net, nn.Cell)
        refit_report = refit_kept_units(model, loss_net, take_batches(owner, refit_batches, None), keep_heads, keep_neurons)
    pruned_heads = {layer: [a.kept[p] for p in np.flatnonzero(~k)]
                    for layer, (a, k) in enumerate(zip(attentions, keep_heads)) if (~k).any()}
    pruned_neurons = {layer: [f.kept[p] for p in np.flatnonzero(~k)]
                      for layer, (f, k) in enumerate(zip(ffns, keep_neurons)) if (~k).any()}
    model_adapter.prune_heads(pruned_heads)
    if pruned_neurons:
        model_adapter.prune_ffn_neurons(pruned_neurons)

    after = _costs(model, seq_len)
    heads_per_layer, neurons_per_layer = model_adapter.heads_per_layer(), model_adapter.neurons_per_layer() or []
    predicted = cost_model.cost_of(heads_per_layer, neurons_per_layer, kv_heads=kv_heads_per_layer(model))
    if after[metric] != predicted:
        raise RuntimeError(f"{owner}: the model's {metric} after pruning is {after[metric]:,}, the cost model "
                           f"predicted {predicted:,}: its structure is not what ms_prune.cost.CostModel assumes")
    result = {
        "selector": selector, "method": scores.method, "metric": metric, "seq_len": seq_len,
        "budget": budget, "constraint": {metric: constraints[metric]},
        "pruned_heads": pruned_heads, "pruned_neurons": pruned_neurons,
        "heads_per_layer": heads_per_layer, "neurons_per_layer": neurons_per_layer,
        "before": before, "after": after,
        "ratios": {m: (after[m] / before[m] if before[m] else None) for m in METRICS},
        "reachable": [cost_model.floor, cost_model.current],
        "unit_costs": {"head": cost_model.head_costs, "neuron": cost_model.neuron_costs}, "score_seconds": scores.seconds,
        "refit": refit_report, "scores": scores,
    }
    result.update(details)
    return result
