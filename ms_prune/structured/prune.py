"""``ms_prune.prune(model, constraints, data, ...)``: one call that prunes the width of any protocol
model (attention heads by key/value group, FFN neurons, hidden size) and its depth to a budget or to
a target shape, with the importance score of your choice, and reports what it did (NVIDIA
ModelOpt's ``prune`` in shape)."""
import time

import numpy as np

from ms_prune import cost, protocol
from ms_prune.gradnas.gradnas import (GradNASScores, UNIT_KINDS, apply_gradnas, compute_scores, refit_kept_units,
                                      resolve_budget, take_batches)
from ms_prune.validation import check_bool, check_choice, check_instance, check_int

from .scores import ACTIVATION_METHODS, HIDDEN_METHODS, activation_scores, hidden_scores, layer_scores

__all__ = ["PruneReport", "prune", "score_units"]

METHODS = ACTIVATION_METHODS + ("gradnas", "magnitude", "random")
SHAPE_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size")
WIDTH_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
UNITS = UNIT_KINDS + ("layers",)


def score_units(model, method, data=None, loss_net=None, num_batches=None, seed=0):
    """One score per current head and FFN neuron (a ``GradNASScores``): 'activation' or 'flap' from
    forward passes on ``data`` (batches of model inputs), 'gradnas' (squared mask gradients of
    ``loss_net`` on ``data``, batches of the loss net's inputs), 'magnitude' or 'random' (no data)."""
    check_choice("score_units", "method", method, METHODS)
    if method in ACTIVATION_METHODS:
        return activation_scores(model, data, method, num_batches)
    return compute_scores(model, loss_net, data, method="fisher" if method == "gradnas" else method,
                          num_batches=num_batches, seed=seed)


class PruneReport:
    """What ``prune`` did: ``params_ratio``/``flops_ratio`` (after / before), the counts before and
    after, heads, key/value heads and FFN neurons kept per layer, the original units removed
    (``pruned_heads``, ``pruned_neurons``), the method and the seconds spent. Keys work too
    (``report["params_ratio"]``); ``to_dict()`` is JSON-ready; ``table()`` is the printed summary."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __getitem__(self, key):
        return self.__dict__[key]

    def __contains__(self, key):
        return key in self.__dict__

    def to_dict(self):
        return {k: v for k, v in self.__dict__.items() if k != "scores"}

    def table(self):
        layers = [f"{'layer':>5} {'heads':>6} {'kv heads':>8} {'FFN':>7}"]
        for i, (h, kv, n) in enumerate(zip(self.heads_per_layer, self.kv_heads_per_layer, self.neurons_per_layer)):
            layers.append(f"{i:>5} {h:>6} {kv:>8} {n if n is not None else '-':>7}")
        lines = layers + [f"parameters {self.params_before:,} -> {self.params_after:,} (x{self.params_ratio:.3f})"]
        if self.flops_before is not None:
            lines.append(f"FLOPs/sequence of {self.seq_len} tokens {self.flops_before:,} -> {self.flops_after:,} "
                         f"(x{self.flops_ratio:.3f})")
        if self.hidden_size_before != self.hidden_size_after:
            lines.append(f"hidden size {self.hidden_size_before} -> {self.hidden_size_after}")
        if self.layers_removed:
            lines.append(f"layers removed (original numbers, least block influence first kept out): "
                         f"{self.layers_removed}")
        lines.append(f"method {self.method}, {self.seconds:.1f} s (scoring {self.score_seconds:.1f} s)")
        return "\n".join(lines)

    def __repr__(self):
        return f"PruneReport(params_ratio={self.params_ratio:.4f}, flops_ratio={self.flops_ratio})"


def _hidden_size(model):
    """The declared hidden size, or None for a model that declares no hidden channels."""
    try:
        return protocol.adapter(model).hidden_channels().size
    except (NotImplementedError, AttributeError, TypeError, ValueError):
        return None


def _layer_shapes(model):
    attentions = protocol.adapter(model).attentions()
    ffns = protocol.adapter(model).ffns()
    return ([a.num_heads for a in attentions], [a.num_kv_heads if a.num_heads else 0 for a in attentions],
            [f.num_neurons for f in ffns] if ffns is not None else [None] * len(attentions))


def _grouped(scores, attention, groups, per_group):
    """The positions of ``groups`` key/value groups of ``per_group`` query heads each with the largest
    score (each group's best heads, then the best groups)."""
    members = protocol.head_groups(attention.num_heads, attention.num_kv_heads)
    tops = [sorted(g, key=lambda p: (-scores[p], p))[:per_group] for g in members]
    best = sorted(range(len(members)), key=lambda g: (-float(np.sum(scores[tops[g]])), g))[:groups]
    return sorted(p for g in best for p in tops[g])


def _plan(model, keep_heads, keep_neurons):
    """{layer: original units removed} for the positions each layer keeps."""
    model_adapter = protocol.adapter(model)
    heads = {i: [a.kept[p] for p in range(a.num_heads) if p not in keep] for i, (a, keep) in
             enumerate(zip(model_adapter.attentions(), keep_heads)) if len(keep) < a.num_heads}
    neurons = {}
    if keep_neurons is not None:
        neurons = {i: [f.kept[p] for p in range(f.num_neurons) if p not in keep] for i, (f, keep) in
                   enumerate(zip(model_adapter.ffns(), keep_neurons)) if len(keep) < f.num_neurons}
    return heads, neurons


def _uniform_structure(owner, model):
    attentions, ffns = protocol.adapter(model).attentions(), protocol.adapter(model).ffns()
    shapes = {(a.num_heads, a.num_kv_heads) for a in attentions}
    widths = {f.num_neurons for f in ffns} if ffns is not None else {None}
    if len(shapes) > 1 or len(widths) > 1:
        raise ValueError(f"{owner}: uniform pruning needs layers of one shape to start from; heads/key-value heads "
                         f"per layer are {[(a.num_heads, a.num_kv_heads) for a in attentions]} and FFN widths "
                         f"{[f.num_neurons for f in ffns] if ffns is not None else None}")
    return attentions, ffns


def _shape_plan(owner, model, scores, shape, units):
    """Every layer to the target shape ``shape`` ({num_attention_heads, num_key_value_heads,
    intermediate_size}, any subset) with the best-scoring units."""
    attentions, ffns = _uniform_structure(owner, model)
    heads, kv_heads = attentions[0].num_heads, attentions[0].num_kv_heads
    target_heads = shape.get("num_attention_heads", heads)
    target_kv = shape.get("num_key_value_heads")
    splits = [(m, target_heads // m) for m in range(1, kv_heads + 1) if target_heads % m == 0
              and target_heads // m <= heads // kv_heads and (target_kv is None or m == target_kv)]
    if not 1 <= target_heads <= heads or not splits:
        raise ValueError(f"{owner}: a layer of {heads} query heads over {kv_heads} key/value heads cannot keep "
                         f"num_attention_heads={target_heads}"
                         f"{'' if target_kv is None else f' over num_key_value_heads={target_kv}'} in equal groups "
                         f"(query heads = key/value heads x heads per group, at most {heads // kv_heads} per group)")
    if "intermediate_size" in shape:
        if ffns is None:
            raise ValueError(f"{owner}: intermediate_size given, but the model declares no prunable FFN")
        if not 1 <= shape["intermediate_size"] <= ffns[0].num_neurons:
            raise ValueError(f"{owner}: intermediate_size must be in 1..{ffns[0].num_neurons}, "
                             f"got {shape['intermediate_size']}")
    value = {split: sum(float(np.sum(s[_grouped(s, a, *split)])) for s, a in zip(scores.heads, attentions))
             for split in splits}
    groups, per_group = max(splits, key=lambda split: (value[split], split[0]))
    keep_heads = [_grouped(s, a, groups, per_group) for s, a in zip(scores.heads, attentions)]
    keep_neurons = None
    if ffns is not None:
        width = shape.get("intermediate_size", ffns[0].num_neurons)
        keep_neurons = [sorted(np.argsort(-s, kind="stable")[:width].tolist()) for s in scores.neurons]
    return keep_heads, keep_neurons


def _uniform_plan(owner, model, scores, metric, budget, cost_model, units, allow_empty):
    """The same heads (equal groups), key/value heads and FFN width in every layer: the best shape
    within the budget, each axis's scores standardised by their total so that the axes compare."""
    attentions, ffns = _uniform_structure(owner, model)
    layers = len(attentions)
    heads, kv_heads = attentions[0].num_heads, attentions[0].num_kv_heads
    splits = [(m, k) for m in range(1, kv_heads + 1) for k in range(1, heads // kv_heads + 1)] \
        if "heads" in units else [(kv_heads, heads // kv_heads)]
    if "heads" in units and allow_empty:
        splits.append((0, 0))
    head_total = sum(float(np.sum(s)) for s in scores.heads) or 1.0
    neuron_total = sum(float(np.sum(s)) for s in scores.neurons) or 1.0
    width = ffns[0].num_neurons if ffns is not None else 0
    ranked = [np.sort(s)[::-1] for s in scores.neurons] if ffns is not None else []
    best = None
    for groups, per_group in splits:
        keep = [_grouped(s, a, groups, per_group) if groups else [] for s, a in zip(scores.heads, attentions)]
        fixed = cost_model.cost_of([groups * per_group] * layers, [0] * len(ranked), kv_heads=[groups] * layers)
        per_neuron = sum(cost_model.neuron_costs)
        if ffns is None:
            neurons = 0
        elif "neurons" not in units:
            neurons = width
        else:
            neurons = min(width, int((budget - fixed) // per_neuron) if per_neuron else width)
        if neurons < (0 if allow_empty else 1) or fixed + neurons * per_neuron > budget:
            continue
        value = sum(float(np.sum(s[k])) for s, k in zip(scores.heads, keep)) / head_total + \
            sum(float(np.sum(r[:neurons])) for r in ranked) / neuron_total
        if best is None or value > best[0]:
            best = (value, keep, neurons)
    if best is None:
        raise ValueError(f"{owner}: no uniform shape (the same heads, key/value heads and FFN width in every layer) "
                         f"fits {metric} <= {budget:,}; the smallest uniform model keeps "
                         f"{'no head' if allow_empty else 'one head per layer'} and "
                         f"{'no' if allow_empty else 'one'} FFN neuron (allow_empty_layers={allow_empty})")
    _, keep_heads, neurons = best
    keep_neurons = [sorted(np.argsort(-s, kind="stable")[:neurons].tolist()) for s in scores.neurons] \
        if ffns is not None else None
    return keep_heads, keep_neurons


def _standardised(scores, cost_model):
    """Scores standardised per layer and axis (FLAP's per-layer standardisation): each layer's
    scores divided by their mean, times the unit's cost, so that a global ranking by score per cost
    compares a unit with the other units of its layer. Activations grow along the residual stream
    (measured on SmolLM2: ranked raw, the first layers lost 96% of their FFN), and heads and neurons,
    weight norms or random numbers have no common scale; the budget does."""
    def scaled(per_layer, costs):
        return [s / np.mean(s) * c if len(s) and np.mean(s) > 0 else s for s, c in zip(per_layer, costs)]
    return GradNASScores(scaled(scores.heads, cost_model.head_costs), scaled(scores.neurons, cost_model.neuron_costs),
                         scores.kept_heads, scores.kept_neurons, scores.method, scores.num_batches, scores.seconds)


def _layers_to_remove(owner, model, influence, shape, constraints, seq_len):
    """The layers of least block influence: as many as the target depth asks, or the fewest whose
    removal brings the model within the budget."""
    order = [int(i) for i in np.argsort(influence, kind="stable")]
    if "num_hidden_layers" in shape:
        target = shape["num_hidden_layers"]
        if target > len(order):
            raise ValueError(f"{owner}: constraints['num_hidden_layers']={target}, but the model has {len(order)} layers")
        return sorted(order[:len(order) - target])
    cost_model, budget = resolve_budget(owner, model, constraints, seq_len)
    model_adapter = protocol.adapter(model)
    layers = model_adapter.layers()
    per_layer = [cost.layer_flops(layers[i], model_adapter.attention(i), seq_len) if cost_model.metric == "flops"
                 else sum(int(np.prod(p.shape)) for p in layers[i].get_parameters()) for i in range(len(layers))]
    spent, removed = cost_model.current, []
    for i in order[:-1]:
        if spent <= budget:
            break
        removed.append(i)
        spent -= per_layer[i]
    if spent > budget:
        raise ValueError(f"{owner}: constraints={constraints!r}: removing every layer but one leaves "
                         f"{cost_model.metric} {spent:,} > {budget:,}; prune width too")
    return sorted(removed)


def _seq_len(owner, seq_len, data):
    if seq_len is not None:
        return check_int(owner, "seq_len", seq_len, minimum=1)
    batch = data[0] if data else None
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    shape = getattr(first, "shape", ())
    return int(shape[1]) if len(shape) == 2 else None


def prune(model, constraints, data=None, method="activation", loss_net=None, seq_len=None, uniform=False,
          units=("heads", "neurons"), allow_empty_layers=False, num_batches=None, scores=None, refit=False, seed=0,
          verbose=True):
    """Prune ``model`` (any model of the protocol: ours, or one declared by an adapter) in place and
    return a :class:`PruneReport`.

    ``constraints``: a budget, ``{"params": "75%"}`` or ``{"flops": "60%"}`` (FLOPs of one
    ``seq_len``-token sequence), a percentage of the model as passed or an absolute number, counting
    every parameter (embeddings too); or a target shape, ``{"num_hidden_layers": 24,
    "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 1024, "hidden_size": 480}``
    (any subset; the layers go first, those of least block influence, then every remaining layer
    takes the width, then the hidden size). A budget is met exactly or under; an unreachable one
    names the reachable range. With ``units=("layers",)`` a budget is met by removing layers alone
    (least block influence first).

    ``hidden_size`` (Minitron's embedding channels; models that declare ``hidden_channels()`` in
    the protocol, our Llama or yours through its adapter): the channels kept everywhere (embedding,
    norms, every projection reading or writing the hidden states, the tied or untied LM head) are
    those of highest score on the model as it is after depth pruning and before any width surgery:
    with ``method`` 'magnitude' the token embedding's column norms, 'random' seeded, any other the
    mean |activation| at every layer's norm outputs on ``data`` (``hidden_scores``). The norms then
    normalise over fewer channels, which changes what the model computes (distil afterwards).

    ``data``: calibration batches, read once (a list, or an iterator): the model's inputs for
    ``method`` 'activation' (Minitron's activation importance, the default) and 'flap' (FLAP's
    fluctuation), ``loss_net``'s inputs for 'gradnas' (squared mask gradients); 'magnitude' and
    'random' need none. ``num_batches`` takes the first that many. ``scores``: a ``GradNASScores``
    computed before (``score_units``), to prune several copies from one scoring pass.

    ``uniform=True``: the same heads, key/value heads and FFN width in every layer (a standard
    model: ``LlamaForCausalLM.save_pretrained(..., standard=True)`` writes a plain Hugging Face
    config for it); else each layer keeps what the global ranking gives it (each layer's scores of
    heads and of neurons standardised by their mean, except GradNAS's, which share the loss's
    scale). ``units``: the unit kinds it may remove ('heads', 'neurons'; or 'layers' alone).
    ``allow_empty_layers=False``: every layer keeps a head and an FFN neuron. Heads go by key/value
    group: every layer keeps equal groups. ``refit=True``: before the surgery, the kept heads' and
    neurons' contributions are rescaled by least squares so that each layer reconstructs its
    unpruned output on ``data`` (Kwon et al. 2022; FLAP's bias compensation is the constant-term
    case, which needs a bias the Llama projections do not have); the report's ``refit`` has each
    layer's relative reconstruction error without and with it.
    ``verbose``: print the summary table. The report has ``hidden_size_before``/``hidden_size_after``
    (None for a model that declares no hidden channels) and ``kept_hidden_channels``.
    """
    owner = "prune"
    started = time.perf_counter()
    check_instance(owner, "constraints", constraints, dict)
    check_choice(owner, "method", method, METHODS)
    check_bool(owner, "uniform", uniform)
    check_bool(owner, "allow_empty_layers", allow_empty_layers)
    check_bool(owner, "refit", refit)
    units = (units,) if isinstance(units, str) else tuple(units)
    for kind in units:
        check_choice(owner, "units entries", kind, UNITS)
    depth_budget = "layers" in units and not any(k in constraints for k in SHAPE_KEYS)
    if depth_budget and len(units) > 1:
        raise ValueError(f"{owner}: a budget over layers and width together is not built yet: prune depth "
                         f"(units=('layers',)) and width (units=('heads', 'neurons')) in two calls, or give a "
                         f"target shape; got units={units}")
    shape = {k: v for k, v in constraints.items() if k in SHAPE_KEYS}
    if shape and len(shape) != len(constraints):
        raise ValueError(f"{owner}: constraints is either a budget ({{'params': ...}} or {{'flops': ...}}) or a target "
                         f"shape ({', '.join(SHAPE_KEYS)}), not both: got {constraints!r}")
    for key, value in shape.items():
        check_int(owner, f"constraints[{key!r}]", value, minimum=1)
    width_shape = {k: v for k, v in shape.items() if k in WIDTH_KEYS}
    # hidden channels have no FLAP or gradient score: ranked by activation unless magnitude or random
    hidden_method = (method if method in HIDDEN_METHODS else "activation") if "hidden_size" in shape else None
    if hidden_method is not None:
        hidden_size = protocol.hidden_of(model, owner).size
        if shape["hidden_size"] > hidden_size:
            raise ValueError(f"{owner}: constraints['hidden_size'] must be in 1..{hidden_size} (the model's hidden "
                             f"size), got {shape['hidden_size']}")
    depth = "num_hidden_layers" in shape or depth_budget
    if data is None and (depth or refit or (method != "random" and method != "magnitude" and scores is None)
                         or hidden_method == "activation"):
        what = "depth needs data" if depth else f"method={method!r} needs data"
        inputs = "the loss net's inputs" if method == "gradnas" and not depth else "the model's inputs"
        raise ValueError(f"{owner}: {what}: calibration batches of {inputs} (a list of tuples of arrays), got None")
    if (method in ("activation", "flap", "gradnas") and scores is None) or depth or refit or \
            hidden_method == "activation":
        data = take_batches(owner, data, num_batches)
    if depth and scores is not None:
        raise ValueError(f"{owner}: scores= were computed on the model before its layers are removed; leave them out "
                         f"when pruning depth (they are computed after)")
    seq_len = _seq_len(owner, seq_len, data)
    params_before = cost.num_parameters(model)
    flops_before = cost.forward_flops(model, seq_len) if seq_len else None
    layers_removed, influence, refit_report = [], None, None
    if refit and (depth_budget or (shape and not width_shape)):
        raise ValueError(f"{owner}: refit rescales kept heads and neurons; a pruning of depth or hidden size alone has "
                         f"none to rescale")
    if depth:
        influence = layer_scores(model, data)
        layers_removed = _layers_to_remove(owner, model, influence, shape, constraints, seq_len)
        if layers_removed:
            protocol.adapter(model).remove_layers(layers_removed)
    hidden_before = _hidden_size(model)
    # scored before any width surgery, as Minitron ranks every axis on the model it starts from
    hidden_started = time.perf_counter()
    channel_scores = None if hidden_method is None else hidden_scores(model, hidden_method, data, seed=seed)
    hidden_seconds = time.perf_counter() - hidden_started
    if depth_budget or (shape and not width_shape):
        scores = None
    elif scores is None:
        scores = score_units(model, method, data, loss_net, seed=seed)
    if scores is not None:
        check_instance(owner, "scores", scores, GradNASScores)
        scores.check_matches(model, owner)
    model_adapter = protocol.adapter(model)
    if scores is None:
        keep_heads = keep_neurons = None
    elif width_shape:
        keep_heads, keep_neurons = _shape_plan(owner, model, scores, width_shape, units)
    elif uniform:
        cost_model, budget = resolve_budget(owner, model, constraints, seq_len)
        keep_heads, keep_neurons = _uniform_plan(owner, model, scores, cost_model.metric, budget, cost_model, units,
                                                 allow_empty_layers and model_adapter.empty_layers_allowed)
    else:
        cost_model, _ = resolve_budget(owner, model, constraints, seq_len)
        ranked = scores if method == "gradnas" else _standardised(scores, cost_model)
        refit_report = apply_gradnas(model, loss_net or model, data, constraints=constraints, seq_len=seq_len,
                                     scores=ranked, prune=units, allow_empty_layers=allow_empty_layers,
                                     refit=refit)["refit"]
        keep_heads = keep_neurons = None
    if keep_heads is not None:
        if refit:
            masks = [[np.isin(np.arange(n), k) for n, k in zip(counts, keep)] for counts, keep in
                     ((_layer_shapes(model)[0], keep_heads), (_layer_shapes(model)[2], keep_neurons or []))]
            refit_report = refit_kept_units(model, loss_net or model, data, *masks)
        pruned_heads, pruned_neurons = _plan(model, keep_heads, keep_neurons)
        if pruned_heads:
            model_adapter.prune_heads(pruned_heads)
        if pruned_neurons:
            model_adapter.prune_ffn_neurons(pruned_neurons)
    kept_hidden = None
    if channel_scores is not None and shape["hidden_size"] < hidden_before:
        kept_hidden = sorted(np.argsort(-channel_scores, kind="stable")[:shape["hidden_size"]].tolist())
        protocol.slice_hidden(model, kept_hidden)
    heads, kv_heads, neurons = _layer_shapes(model)
    kept_heads, kept_neurons = [a.kept for a in model_adapter.attentions()], \
        [f.kept for f in model_adapter.ffns()] if model_adapter.ffns() is not None else []
    params_after = cost.num_parameters(model)
    flops_after = cost.forward_flops(model, seq_len) if seq_len else None
    report = PruneReport(
        method=method, constraints=dict(constraints), uniform=uniform, seq_len=seq_len,
        params_before=params_before, params_after=params_after, params_ratio=params_after / params_before,
        flops_before=flops_before, flops_after=flops_after,
        flops_ratio=flops_after / flops_before if flops_before else None,
        heads_per_layer=heads, kv_heads_per_layer=kv_heads, neurons_per_layer=neurons,
        pruned_heads={i: [h for h in range(a_total) if h not in kept] for i, (a_total, kept) in enumerate(
            zip([a.total for a in model_adapter.attentions()], kept_heads)) if len(kept) < a_total},
        pruned_neurons={i: [n for n in range(f.total) if n not in kept] for i, (f, kept) in enumerate(
            zip(model_adapter.ffns() or [], kept_neurons)) if len(kept) < f.total},
        hidden_size_before=hidden_before, hidden_size_after=_hidden_size(model), kept_hidden_channels=kept_hidden,
        hidden_method=hidden_method, hidden_scores=None if channel_scores is None else channel_scores.tolist(),
        layers_removed=layers_removed, block_influence=None if influence is None else influence.tolist(),
        refit=refit_report,
        score_seconds=(scores.seconds if scores is not None else 0.0) + hidden_seconds, seconds=time.perf_counter() - started,
        scores=scores)
    if verbose:
        print(report.table(), flush=True)
    return report
