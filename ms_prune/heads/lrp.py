"""LRP head pruning: copy -> train gates -> prune, for one architecture.

``pruner = HeadPrunerBertLRP(model, target_heads=36)``; ``gated = pruner.decorate_model()`` is a
copy of ``model`` with a ``ConcreteGate`` on every attention layer (``init_head``); train it through
the engine, ``Trainer(gated, loss_fn, data, max_steps, algorithms=[pruner.algorithm(gated)])``
(checkpoints, resume, progress, and after every step the one decision written into the gates), or
with ``train_gated`` (the same Trainer); ``pruner.prune_model(gated)`` copies the trained weights
back into ``model``, removes the heads the decision drops and folds the kept gates' values into the
output projections, and returns ``model``.

The decision (``decide_heads``), writing it into the gates (``write_lrp_decision``) and pruning to
it (``removed_heads`` then ``prune_to_decision``) are shared with the in-place engine algorithm
``LRP`` (algorithm.py): the gated model's evaluation, ``gate_summary`` and the pruned model agree at
any point of training.

Any model that declares the model protocol (``ms_prune.protocol``) works: ours do, another by an
adapter, which a subclass may simply name (``adapter_class``; README.md, "A new architecture").
"""
import copy

import numpy as np
from mindspore import Tensor, nn, ops, Parameter

from ms_prune import protocol
from ms_prune.engine import Algorithm, Event, Trainer
from ms_prune.training import write_parameter
from ms_prune.validation import check_bool, check_choice, check_instance, check_int, check_number

from .concrete_gate import CLOSED_THRESHOLD, ConcreteGate, check_gate_args


PENALTY_NORMALIZATIONS = ("heads", "none")


class LRPObjective(nn.Cell):
    """What the training loss adds for the gates, given the model's summed gate penalty P.

    Without a target: P itself (its scale is the gates' ``l0_penalty``). With a target t (in the
    units of P): the Lagrangian term of CoFi (Xia et al. 2022),
    ``lambda_1 * (P - t) + lambda_2 * (P - t)^2``, whose multipliers are trained by gradient
    ASCENT: they grow while P is off target, so the penalty strengthens until the expected number
    of open heads meets the target, with no penalty to tune. The ascent is a gradient reversal
    (``2 * stop_gradient(x) - x`` has the value of x and the gradient -1), so one ordinary
    optimizer (descent) trains everything. The target t(step) ramps linearly from ``start`` (all
    heads) to ``target`` over ``warmup_steps`` (host-side, ``set_step``; no recompile).

    ``linear_term=False`` (default) trains only lambda_2: the gates run under Adam, which moves
    them at the learning rate whatever the penalty's size, so lambda_1 winds up while the gates
    are still saturated and then drives every gate shut (measured: all 16 heads of a 16-head
    toy closed with a target of 6). The quadratic term's push changes sign with P - t and
    settles on the target. ``linear_term=True`` is CoFi's form.
    """

    def __init__(self, target=None, start=None, warmup_steps=0, linear_term=False):
        super().__init__()
        self.use_target = target is not None
        self.linear_term = bool(linear_term)
        self.final_target = float(target) if target is not None else 0.0
        self.start = float(start) if start is not None else self.final_target
        self.warmup_steps = int(warmup_steps)
        first = self.start if self.warmup_steps > 0 else self.final_target
        self.target = Parameter(Tensor(np.float32(first)), name="lagrangian_target", requires_grad=False)
        self.lambda_1 = Parameter(Tensor(np.float32(0.0)), name="lagrangian_lambda_1")
        self.lambda_2 = Parameter(Tensor(np.float32(0.0)), name="lagrangian_lambda_2")

    def construct(self, penalty):
        if self.use_target:
            gap = penalty - self.target
            lambda_1 = 2.0 * ops.stop_gradient(self.lambda_1) - self.lambda_1
            lambda_2 = 2.0 * ops.stop_gradient(self.lambda_2) - self.lambda_2
            return lambda_1 * gap + lambda_2 * gap * gap
        return penalty

    def target_at(self, step):
        if self.warmup_steps <= 0:
            return self.final_target
        done = min(1.0, max(0.0, step / self.warmup_steps))
        return self.start + (self.final_target - self.start) * done

    def set_step(self, step):
        if self.use_target:
            write_parameter(self.target, self.target_at(step))

    def multipliers(self):
        """The multipliers the optimizer ascends (lambda_1 only with ``linear_term``)."""
        if not self.use_target:
            return []
        return [self.lambda_1, self.lambda_2] if self.linear_term else [self.lambda_2]


class GateObjective(nn.Cell):
    """The gates' L0 term of the loss, read from the gates' ``log_a`` directly rather than from the
    forward pass: a layer that PLD skips in a step, or tokens random-LTD leaves out, do not make
    its gates' penalty vanish (which would bias the gates of often-skipped layers to stay open).
    The gates stay registered in the model only (held here as a plain tuple), so their tensor
    names do not change."""

    def __init__(self, gates, objective):
        super().__init__()
        object.__setattr__(self, "gates", tuple(g for g in gates if g is not None))
        self.objective = objective

    def construct(self):
        penalty = ops.zeros((), self.objective.target.dtype)
        for gate in self.gates:
            penalty = penalty + gate.get_penalty()
        return self.objective(penalty)


class LRPLoss(nn.Cell):
    """``task_loss(model(*inputs), labels) + gate_term()`` for a gated model (the first output when
    the model returns a tuple). ``construct(*inputs, labels)``."""

    def __init__(self, model, task_loss, gate_term):
        super().__init__()
        self.model = model
        self.task_loss = task_loss
        self.gate_term = gate_term

    def construct(self, *args):
        outputs = self.model(*args[:-1])
        if isinstance(outputs, (tuple, list)):
            outputs = outputs[0]
        return self.task_loss(outputs, args[-1]) + self.gate_term()


class FirstOutputLoss(nn.Cell):
    """``task_loss(outputs, *targets)``, with the first output when the model returns a tuple (a
    bare backbone): what ``train_gated`` and ``LRPLoss`` have always accepted as ``task_loss``."""

    def __init__(self, task_loss):
        super().__init__(auto_prefix=False)
        self.task_loss = task_loss

    def construct(self, outputs, *targets):
        if isinstance(outputs, (tuple, list)):
            outputs = outputs[0]
        return self.task_loss(outputs, *targets)


def resolve_target(owner, total_heads, target_heads=None, target_fraction=None):
    """The number of heads to keep (None: no target), checked against the model's ``total_heads``."""
    if total_heads == 0:
        raise ValueError(f"{owner}: the model has no attention heads left to gate")
    if target_heads is not None and target_fraction is not None:
        raise ValueError(f"{owner}: give target_heads or target_fraction, not both (got {target_heads!r} and "
                         f"{target_fraction!r})")
    target_fraction = check_number(owner, "target_fraction", target_fraction, minimum=0.0, maximum=1.0,
                                   min_open=True, allow_none=True)
    if target_fraction is not None:
        target_heads = max(1, int(round(target_fraction * total_heads)))
    target_heads = check_int(owner, "target_heads", target_heads, minimum=1, allow_none=True)
    if target_heads is not None and target_heads > total_heads:
        raise ValueError(f"{owner}: target_heads must be at most the model's {total_heads} heads (an int in "
                         f"1..{total_heads}), got {target_heads}")
    return target_heads


def refuse_other_gates(owner, model):
    """LRP's gates go on the input of each attention's output projection, where GradNAS puts its
    scoring masks: both on the same heads would multiply one by the other (and each algorithm's
    removal would take the other's off), so a model carrying either is refused by name."""
    for layer, gate in enumerate(protocol.gates_of(model, "head")):
        if gate is None:
            continue
        if isinstance(gate, ConcreteGate):
            raise ValueError(f"{owner}: layer {layer} already has LRP gates (ConcreteGate); remove them first with "
                             f"ms_prune.heads.remove_lrp(model) (or train those gates: pruner.algorithm(gated))")
        raise ValueError(f"{owner}: layer {layer}'s heads already carry a {type(gate).__name__} (GradNAS's scoring "
                         f"masks sit where LRP's gates go); LRP and GradNAS cannot gate the same heads: remove the "
                         f"masks with ms_prune.gradnas.masks.detach(model), or drop GradNAS from this run")


class AbstractHeadPrunerLRP:
    """Learn which heads a model can lose (L0 / Hard-Concrete gates), then remove them: copy ->
    train -> prune.

    ``model`` is any model of the model protocol (``ms_prune.protocol``): ours (task models or
    bare backbones) or one declared by an adapter (``adapter_class`` names it). Choose one of:

    * ``l0_penalty`` (lambda): fixed penalty weight. With ``penalty_normalization='heads'`` (the
      default) the expected number of open heads is divided by the model's head count, so the
      penalty is the expected FRACTION of open heads and one lambda suits models of any size;
      ``'none'`` is the raw count (the tutorial's and Voita's form, lambda ~ 0.0015 for 144 heads).
    * ``target_heads`` (int) or ``target_fraction`` (of the current heads): a Lagrangian term
      (``LRPObjective``) reaches the target during training, and exactly that many heads stay
      (the best by gate ``log_a``; on grouped-query attention the best set with equal key/value
      groups, see ``decide_heads``).

    The decision (``decide_heads``) is written into the gates after every training step, so the
    gated model's evaluation, ``gate_summary`` and ``prune_model``'s result agree at any point.

    What a subclass may change (Golden Stick's pruner hooks): ``adapter_class`` (the
    ``TransformerAdapter`` of a model that has none registered: naming it is all a new
    architecture needs), ``init_head(layer, heads)`` (the gate of one attention),
    ``get_penalty(gated_model)`` (the gate term of the loss), ``decorate_model()`` (the gated copy),
    ``build_copy()`` (when ``type(model)(model.config)`` does not rebuild the model) and
    ``name_mapping(names)`` (when the gated copy names tensors differently).
    """

    adapter_class = None

    def __init__(self, model, l0_penalty=1.0, target_heads=None, target_fraction=None,
                 penalty_normalization="heads", warmup_steps=0, linear_term=False, temperature=0.33,
                 stretch_limits=(-0.1, 1.1), eps=1e-6, threshold=CLOSED_THRESHOLD, init_log_a=None):
        owner = type(self).__name__
        check_instance(owner, "model", model, nn.Cell)
        self.l0_penalty = check_number(owner, "l0_penalty", l0_penalty, minimum=0.0)
        self.penalty_normalization = check_choice(owner, "penalty_normalization", penalty_normalization,
                                                  PENALTY_NORMALIZATIONS)
        self.warmup_steps = check_int(owner, "warmup_steps", warmup_steps, minimum=0)
        self.linear_term = check_bool(owner, "linear_term", linear_term)
        check_gate_args(temperature, stretch_limits, 1.0, eps, threshold)
        if self.adapter_class is not None:
            protocol.register_adapter(type(model), self.adapter_class)
        self.model = model
        self.total_heads = sum(protocol.adapter(model).heads_per_layer())
        self.target_heads = resolve_target(owner, self.total_heads, target_heads, target_fraction)
        self.threshold = float(threshold)
        # With a target, evaluation follows the decision alone (gate threshold 0): a kept head keeps
        # the gate value it was trained towards, even one below ``threshold``.
        self.gate_kwargs = dict(temperature=temperature, stretch_limits=tuple(stretch_limits), eps=eps,
                                threshold=self.threshold if self.target_heads is None else 0.0,
                                init_log_a=init_log_a)
        scale = self.total_heads if penalty_normalization == "heads" else 1
        # With a target the gates' penalty is the plain expected count (or fraction); the
        # Lagrangian multipliers, not l0_penalty, set its weight.
        self.gate_l0_penalty = (1.0 if self.target_heads is not None else self.l0_penalty) / scale
        self.objective = LRPObjective(
            target=None if self.target_heads is None else self.target_heads / scale,
            start=self.total_heads / scale, warmup_steps=self.warmup_steps, linear_term=self.linear_term)

    # ---- the hooks a subclass may change ------------------------------------------------------
    def init_head(self, layer, heads):
        """The gate of layer ``layer``'s attention (``heads``: its ``protocol.AttentionHeads``): a
        ``ConcreteGate`` (or subclass) with one gate per head."""
        return ConcreteGate(heads.num_heads, l0_penalty=self.gate_l0_penalty, **self.gate_kwargs)

    def get_penalty(self, gated_model):
        """The gates' term of the training loss, a Cell of no input returning a scalar: the summed
        L0 penalty of ``gated_model``'s gates through this pruner's objective (the Lagrangian term
        with a target)."""
        return GateObjective(protocol.gates_of(gated_model, "head"), self.objective)

    def name_mapping(self, names):
        """{original tensor name: gated-copy tensor name} for the original's tensors."""
        return {name: name for name in names}

    def build_copy(self):
        """A fresh, ungated instance of the original's class and config."""
        return type(self.model)(copy.deepcopy(self.model.config))

    def decorate_model(self):
        """The gated copy: same class and config, ``init_head``'s gate on every attention layer,
        and every tensor of the original copied by ``name_mapping`` (an uncopied tensor is an
        error)."""
        gated = self.build_copy()
        self.add_gates(gated)
        gate_names = self._gate_names(gated)
        source = dict(self.model.parameters_and_names())
        mapping = self.name_mapping(list(source))
        self._copy_tensors(source, dict(gated.parameters_and_names()), mapping, skip=gate_names,
                           what="decorate_model (original -> gated copy)")
        gated.set_train(self.model.training)
        # which heads the original had when this copy was made: prune_model refuses a copy made
        # before an earlier prune_model shrank the original
        object.__setattr__(gated, "_lrp_source_heads", self._kept_heads())
        return gated

    # ---- training through the engine ------------------------------------------------------------
    def add_gates(self, model):
        """Put ``init_head``'s gates on ``model`` in place; returns them per layer."""
        owner = type(self).__name__
        refuse_other_gates(owner, model)
        gates = protocol.attach_gates(model, "head", self.init_head)
        wrong = [type(g).__name__ for g in gates if g is not None and not isinstance(g, ConcreteGate)]
        if wrong:
            protocol.detach_gates(model, "head")
            raise TypeError(f"{owner}.init_head must return a ConcreteGate (or subclass), got {wrong[0]}")
        return gates

    def algorithm(self, gated_model, gate_lr=0.1, lagrangian_lr=0.05):
        """The engine algorithm that trains ``gated_model`` (``decorate_model()``'s result): an
        ``LRP`` configured like this pruner and bound to it, for ``ms_prune.engine.Trainer`` (or
        ``AlgorithmCallback``). It uses this pruner's gates and ``get_penalty``, moves the target
        schedule and the gates' noise before each step, writes the decision after it, and leaves the
        pruning to ``prune_model``. ``gate_lr`` / ``lagrangian_lr``: learning rates of the gates and
        of the Lagrange multipliers (the model's weights train at the Trainer's)."""
        from .algorithm import LRP  # pylint: disable=import-outside-toplevel  (algorithm.py imports this module)
        lrp = LRP(target_heads=self.target_heads, l0_penalty=self.l0_penalty,
                  penalty_normalization=self.penalty_normalization, warmup_steps=self.warmup_steps,
                  gate_lr=gate_lr, lagrangian_lr=lagrangian_lr, linear_term=self.linear_term,
                  temperature=self.gate_kwargs["temperature"], stretch_limits=self.gate_kwargs["stretch_limits"],
                  threshold=self.threshold)
        return lrp.bind(self, gated_model)

    # ---- pruning ---------------------------------------------------------------------------------
    def _kept_heads(self):
        return [list(a.kept) for a in protocol.adapter(self.model).attentions()]

    def prune_model(self, gated_model):
        """Copy the trained weights back into the original model, remove the heads the decision
        drops, fold the kept gates' evaluation values into the output projections and return the
        original model. The decision is written into the gated model's gates first, so in
        evaluation both compute the same.

        Nothing changes unless the surgery succeeds: the decision is checked against what the
        surgery can make before any tensor is copied, and if the surgery still fails the original's
        tensors are put back (the surgery restores its structure) and the error is raised.

        Once per gated copy: the original is pruned in place, so calling it again (or with a copy
        made before the original was pruned) is a ValueError; prune further by calling
        ``decorate_model`` again."""
        source_heads = getattr(gated_model, "_lrp_source_heads", None)
        # a second fold would scale the kept heads by their gate values twice, even when no head
        # was removed the first time
        if getattr(gated_model, "_lrp_pruned", False) or (source_heads is not None
                                                          and source_heads != self._kept_heads()):
            raise ValueError(
                f"{type(self).__name__}.prune_model: the model was already pruned (heads "
                f"{getattr(self, 'pruned_heads', None)} removed; heads per layer now "
                f"{[len(h) for h in self._kept_heads()]}) after this gated copy was made with "
                f"{[len(h) for h in source_heads]}. prune_model runs once per decorate_model(); for "
                f"another round call decorate_model() again and train the new copy")
        self._check_gated(gated_model)
        keep = write_lrp_decision(gated_model, self.target_heads)
        values = [g.gate_values() if g is not None else None for g in protocol.gates_of(gated_model, "head")]
        plan = removed_heads(self.model, keep)
        target = dict(self.model.parameters_and_names())
        before = {name: param.asnumpy().copy() for name, param in target.items()}
        mapping = self.name_mapping(list(target))
        self._copy_tensors(dict(gated_model.parameters_and_names()), target, {v: k for k, v in mapping.items()},
                           skip=self._gate_names(gated_model), what="prune_model (gated copy -> original)")
        probe = protocol.adapter(gated_model).probe_inputs()
        if probe is not None and protocol.adapter(self.model).probe_inputs() is None:
            protocol.remember_inputs(self.model, probe)  # the batch the gated copy trained on verifies the surgery

        def undo():
            for name, param in target.items():
                param.set_data(Tensor(before[name]))

        prune_to_decision(self.model, plan, keep, values, undo)
        self.pruned_heads = plan
        object.__setattr__(gated_model, "_lrp_pruned", True)
        return self.model

    # ---- decisions and reports -----------------------------------------------------------------
    def _check_gated(self, gated_model):
        gates = protocol.gates_of(gated_model, "head")
        if any(n and g is None for n, g in zip(protocol.adapter(gated_model).heads_per_layer(), gates)):
            raise ValueError(f"{type(self).__name__}: the model passed is not gated (use decorate_model's result)")

    def decide(self, gated_model):
        """Per layer: (kept positions, evaluation gate values under that decision), by
        ``decide_heads``; nothing is written."""
        self._check_gated(gated_model)
        keep = decide_model_heads(gated_model, self.target_heads)
        values = [g.gate_values(kept) if g is not None else np.zeros((0,), np.float32)
                  for g, kept in zip(protocol.gates_of(gated_model, "head"), keep)]
        return list(zip(keep, values))

    def gate_summary(self, gated_model):
        """Heads kept per layer by the decision (what ``prune_model`` would keep now), their total,
        and the gates' expected open count."""
        self._check_gated(gated_model)
        return lrp_summary(gated_model, self.target_heads)

    # ---- a hand-written loop (``train_gated`` and the engine build these for you) -------------------
    def loss_cell(self, gated_model, task_loss):
        """``LRPLoss``: ``task_loss(outputs, labels)`` plus ``get_penalty(gated_model)``."""
        return LRPLoss(gated_model, task_loss, self.get_penalty(gated_model))

    def parameter_groups(self, gated_model, lr, gate_lr, lagrangian_lr=0.05, weight_decay=0.01,
                         train_weights=True):
        """Optimizer groups: model weights, gates (own lr, no decay), Lagrange multipliers
        (own lr, no decay; only with a target)."""
        owner = type(self).__name__
        for name, value in (("lr", lr), ("gate_lr", gate_lr), ("lagrangian_lr", lagrangian_lr)):
            check_number(owner, name, value, minimum=0.0, min_open=True)
        gate_ids = {id(p) for _, p in self._gate_params(gated_model)}
        weights = [p for p in gated_model.trainable_params() if id(p) not in gate_ids]
        groups = []
        if train_weights:
            groups.append({"params": weights, "lr": lr, "weight_decay": weight_decay})
        else:
            for p in weights:
                p.requires_grad = False
        groups.append({"params": [p for _, p in self._gate_params(gated_model)], "lr": gate_lr, "weight_decay": 0.0})
        if self.objective.multipliers():
            groups.append({"params": self.objective.multipliers(), "lr": lagrangian_lr, "weight_decay": 0.0})
        return groups

    def optimizer(self, gated_model, lr, gate_lr, lagrangian_lr=0.05, weight_decay=0.01, train_weights=True):
        return nn.AdamWeightDecay(self.parameter_groups(gated_model, lr, gate_lr, lagrangian_lr, weight_decay,
                                                        train_weights))

    def set_step(self, step):
        """Move the target schedule to ``step`` (a hand-written loop calls it before each step)."""
        self.objective.set_step(step)

    # ---- internals -----------------------------------------------------------------------------
    def _gate_params(self, model):
        gate_ids = {id(g.log_a) for g in protocol.gates_of(model, "head") if g is not None}
        return [(name, p) for name, p in model.parameters_and_names() if id(p) in gate_ids]

    def _gate_names(self, model):
        """Every tensor of the gates (log_a, and the decision and noise buffers)."""
        ids = {id(p) for g in protocol.gates_of(model, "head") if g is not None for p in g.get_parameters()}
        return {name for name, p in model.parameters_and_names() if id(p) in ids}

    def _copy_tensors(self, source, target, mapping, skip, what):
        owner = type(self).__name__
        unmapped = [n for n in source if n not in skip and n not in mapping]
        bad_target = [f"{s} -> {t}" for s, t in mapping.items() if s in source and t not in target]
        problems = []
        if unmapped:
            problems.append(f"tensors with no destination: {unmapped}")
        if bad_target:
            problems.append(f"destinations that do not exist: {bad_target}")
        mismatched = [f"{src} {tuple(source[src].shape)} -> {dst} {tuple(target[dst].shape)}"
                      for src, dst in mapping.items() if src in source and dst in target and src not in skip
                      and tuple(source[src].shape) != tuple(target[dst].shape)]
        filled = {dst for src, dst in mapping.items() if src in source and dst in target and src not in skip}
        left = [n for n in target if n not in filled and n not in skip]
        if mismatched:
            problems.append(f"shape mismatches: {mismatched}")
        if left:
            problems.append(f"tensors left uncopied: {left}")
        if problems:  # checked before any tensor is written, so a bad mapping changes nothing
            raise ValueError(f"{owner}.{what}: " + " | ".join(problems))
        for src, dst in mapping.items():
            if src in source and dst in target and src not in skip:
                target[dst].set_data(Tensor(source[src].asnumpy().copy()))


# ---- the one decision, shared by the pruner and the LRP algorithm ----------------------------------
def _open_heads(gate, attention, allow_empty):
    """A layer's heads without a target: the open ones (evaluation formula above the gate's
    threshold), cut to the largest set with equal key/value groups made of open heads only (a
    closed head would be kept with gate value 0, costing compute for nothing), best by ``log_a``;
    with every head closed and ``allow_empty`` False, the best single head. Plain multi-head
    attention (groups of one) keeps exactly the open heads."""
    log_a = gate.log_a.asnumpy().astype(np.float64)
    is_open = gate.raw_gate_values() > gate.threshold
    scores = np.where(is_open, log_a, -np.inf)
    kept = []
    for count in reversed(protocol.feasible_head_counts(attention.num_heads, attention.num_kv_heads)):
        if 0 < count <= int(is_open.sum()):
            best = protocol.best_grouped_heads(scores, attention.num_heads, attention.num_kv_heads, count)
            if best is not None:  # None: every set of this size needs a closed head
                kept = best
                break
    if not kept and not allow_empty:
        kept = protocol.best_grouped_heads(log_a, attention.num_heads, attention.num_kv_heads, 1)
    return sorted(kept)


def _ranked_heads(log_as, target_heads, allow_empty):
    """The ``target_heads`` best heads by ``log_a`` over the whole model (ties: earlier layer, then
    head), each layer first keeping its best one unless ``allow_empty``: with one query head per
    key/value group this is the exact optimum of ``protocol.select_grouped_heads``, found by
    sorting instead of its dynamic programme (which costs layers x heads x counts per step)."""
    keep = [[] for _ in log_as]
    if not allow_empty:
        for layer, log_a in enumerate(log_as):
            if len(log_a):
                keep[layer].append(int(np.argmax(log_a)))
    scores = [(float(log_a[p]), -layer, -p, layer, p)
              for layer, log_a in enumerate(log_as) for p in range(len(log_a)) if p not in keep[layer]]
    room = max(0, target_heads - sum(len(k) for k in keep))
    for *_, layer, p in sorted(scores, reverse=True)[:room]:
        keep[layer].append(p)
    return [sorted(k) for k in keep]


def decide_heads(gates, attentions, target_heads=None, allow_empty=False):
    """Which head positions each layer keeps (sorted; [] for a layer without a gate): the one
    decision that evaluation, the training log and pruning all follow. ``attentions``: the layers'
    ``protocol.AttentionHeads`` (their query and key/value head counts); ``allow_empty``: a layer
    may lose every head (``TransformerAdapter.empty_layers_allowed``), else each keeps one.

    With ``target_heads``: exactly that many heads (or, when equal key/value groups make it
    unreachable, the most below it) with the largest total ``log_a``, every layer keeping the same
    number of query heads in each key/value group it keeps (``protocol.select_grouped_heads``).
    Without: per layer, the open heads (gate above its threshold), cut to equal groups (the largest
    such set of open heads, best by ``log_a``). For plain multi-head attention both are the
    earlier releases' decision: the best ``target_heads`` by ``log_a``, or the open heads."""
    if len(gates) != len(attentions):
        raise ValueError(f"decide_heads: {len(gates)} gates for {len(attentions)} attention layers")
    for layer, (gate, attention) in enumerate(zip(gates, attentions)):
        if (gate.num_heads if gate is not None else 0) != attention.num_heads:
            raise ValueError(f"decide_heads: layer {layer} has {attention.num_heads} heads but its gate has "
                             f"{gate.num_heads if gate is not None else 'none'}")
    if target_heads is None:
        return [_open_heads(g, a, allow_empty) if g is not None else [] for g, a in zip(gates, attentions)]
    log_as = [g.log_a.asnumpy().astype(np.float64) if g is not None else np.zeros((0,)) for g in gates]
    if all(a.num_kv_heads == a.num_heads for a in attentions):
        return _ranked_heads(log_as, target_heads, allow_empty)
    return [sorted(k) for k in protocol.select_grouped_heads(log_as, attentions, target_heads, allow_empty)]


def decide_model_heads(model, target_heads=None):
    """``decide_heads`` for a gated model (its gates, attentions and empty-layer rule)."""
    model_adapter = protocol.adapter(model)
    return decide_heads(protocol.gates_of(model, "head"), model_adapter.attentions(), target_heads,
                        allow_empty=model_adapter.empty_layers_allowed)


def write_lrp_decision(model, target_heads=None):
    """Decide which heads stay (``decide_heads``) and make evaluation follow it; returns the
    kept positions per layer."""
    keep = decide_model_heads(model, target_heads)
    for gate, kept in zip(protocol.gates_of(model, "head"), keep):
        if gate is not None:
            gate.write_decision(kept)
    return keep


def lrp_summary(model, target_heads=None):
    """Heads kept per layer by the decision, their total, and the gates' expected open count."""
    keep = decide_model_heads(model, target_heads)
    gates = [g for g in protocol.gates_of(model, "head") if g is not None]
    return {"open_per_layer": [len(k) for k in keep], "open": sum(len(k) for k in keep),
            "expected_open": float(sum(g.expected_open() for g in gates))}


def removed_heads(model, keep):
    """``{layer: [original head numbers]}`` that keeping the positions ``keep`` removes from
    ``model``, every layer checked against what the surgery can make (equal key/value groups, an
    empty layer only where declared) before anything changes."""
    plan = {}
    for layer, (attention, kept) in enumerate(zip(protocol.adapter(model).attentions(), keep)):
        dropped = [attention.kept[p] for p in range(attention.num_heads) if p not in kept]
        if dropped:
            protocol.check_head_positions(attention, list(kept), layer)
            plan[layer] = dropped
    return plan


def prune_to_decision(model, plan, keep, values, undo):
    """Remove ``plan`` (``removed_heads``) from the ungated ``model``, then fold each kept head's
    gate value (``values[layer][position]``) into its output projection, so the result computes what
    the gated model computed in evaluation. If the surgery raises, ``undo()`` puts back what the
    caller changed before it (the surgery restores the model's own structure) and the error
    propagates."""
    try:
        protocol.adapter(model).prune_heads(plan)
    except Exception:
        undo()
        raise
    # after the surgery a layer's positions 0..k-1 are its kept heads, in order
    for attention, kept, layer_values in zip(protocol.adapter(model).attentions(), keep, values):
        if kept:
            fold_gate_values(attention, range(len(kept)), np.asarray(layer_values)[list(kept)])
    return plan


def fold_gate_values(attention, keep, values):
    """Scale the output-projection inputs of each head at ``keep`` by its gate value (``values``,
    aligned with ``keep``, or indexed by position when as long as the layer's heads), so the ungated
    attention computes what the gated one computes in evaluation. ``attention``: the layer's
    ``ms_prune.protocol.AttentionHeads``."""
    keep = list(keep)
    values = np.asarray(values, np.float32)
    if len(values) != len(keep):
        values = values[keep]
    cell, layout = attention.output_projection(), attention.layout
    scale = np.ones((attention.num_heads * attention.head_dim,), np.float32)
    for p, value in zip(keep, values):
        scale[p * attention.head_dim:(p + 1) * attention.head_dim] = value
    weight = cell.weight.asnumpy()
    weight = weight * (scale[None, :] if layout == "linear" else scale[:, None])
    write_parameter(cell.weight, np.ascontiguousarray(weight, np.float32))


class HeadPrunerBertLRP(AbstractHeadPrunerLRP):
    """LRP for BERT models (the name of earlier releases; any protocol model works)."""


class HeadPrunerGPTLRP(AbstractHeadPrunerLRP):
    """LRP for GPT-2 models (the name of earlier releases; any protocol model works)."""


def lrp_pruner(model, **kwargs):
    """The LRP pruner for ``model`` (any model of the model protocol), built with ``kwargs``."""
    protocol.adapter(model)  # a model that does not declare the protocol is told how to
    return AbstractHeadPrunerLRP(model, **kwargs)


# ---- the training entry points of earlier releases, on the shared path ----------------------------
class GatedTrainStep:
    """``step(*inputs, labels) -> loss``: one step of ``pruner.loss_cell`` under
    ``pruner.optimizer`` (a ``TrainOneStepCell``, ``self.cell``, compiled in GRAPH_MODE), after which
    the decision is written into the gates (``write_lrp_decision``), as the engine does: evaluation
    then follows it. The target schedule is the caller's (``pruner.set_step(step)`` before each
    step) and the gates draw their noise in the graph; ``pruner.algorithm`` with the ``Trainer``
    does both from the run's state (checkpoints, exact resume).

    A Cell rather than ``ms.jit`` of a closure: a jitted closure freezes Parameters that are not
    optimised (the Lagrangian target, which the host moves every step) as constants at compile
    time; a Cell's graph reads them each step."""

    def __init__(self, pruner, gated_model, cell):
        self.pruner, self.gated_model, self.cell = pruner, gated_model, cell

    def __call__(self, *batch):
        loss = self.cell(*batch)
        write_lrp_decision(self.gated_model, self.pruner.target_heads)
        return loss


def make_gated_train_step(pruner, gated_model, task_loss, lr, gate_lr, lagrangian_lr=0.05, weight_decay=0.01,
                          train_weights=True):
    """A ``GatedTrainStep`` for the gated model: ``step(*inputs, labels) -> loss``, for a loop of your
    own (``train_gated`` and ``pruner.algorithm`` with the ``Trainer`` need none)."""
    loss_cell = pruner.loss_cell(gated_model, task_loss)
    optimizer = pruner.optimizer(gated_model, lr, gate_lr, lagrangian_lr, weight_decay, train_weights)
    cell = nn.TrainOneStepCell(loss_cell, optimizer)
    cell.set_train(True)
    return GatedTrainStep(pruner, gated_model, cell)


class _GateLog(Algorithm):
    """``train_gated``'s progress: after LRP's decision of every ``every``-th step (and the last),
    records (step, loss, heads kept, expected open) and prints a line."""

    def __init__(self, pruner, steps, every, log, history):
        self.pruner, self.steps, self.every, self.log, self.history = pruner, steps, every, log, history

    def match(self, event, state):
        return event == Event.BATCH_END and bool(self.every) and (
            state.step % self.every == 0 or state.step == self.steps)

    def apply(self, event, state, logger):
        summary = self.pruner.gate_summary(state.model)
        self.history.append((state.step, state.loss, summary["open"], summary["expected_open"]))
        if self.log:
            target = "" if self.pruner.target_heads is None else f" (target {self.pruner.target_heads})"
            self.log(f"  gate step {state.step}/{self.steps}: loss {state.loss:.4f}, heads kept "
                     f"{summary['open']}/{self.pruner.total_heads}{target}, expected {summary['expected_open']:.1f}, "
                     f"per layer {summary['open_per_layer']}")


def train_gated(pruner, gated_model, task_loss, batches, steps, lr, gate_lr, lagrangian_lr=0.05,
                weight_decay=0.01, train_weights=True, log_every=0, log=print):
    """Train the gated model for ``steps`` steps of ``batches`` (an iterable of tuples of numpy
    arrays: the model inputs, then the labels) with ``ms_prune.engine.Trainer`` and
    ``pruner.algorithm(gated_model)``, AdamW (weights at ``lr`` and ``weight_decay``). Returns the
    history [(step, loss, heads kept, expected open)] of the logged steps (every ``log_every``-th
    and the last). For checkpoints and resume, build the Trainer yourself (README.md)."""
    owner = "train_gated"
    steps = check_int(owner, "steps", steps, minimum=1)
    log_every = check_int(owner, "log_every", log_every, minimum=0)
    lr = check_number(owner, "lr", lr, minimum=0.0, min_open=True)
    weight_decay = check_number(owner, "weight_decay", weight_decay, minimum=0.0)
    if not train_weights:
        gate_ids = {id(p) for _, p in pruner._gate_params(gated_model)}  # pylint: disable=protected-access
        for p in gated_model.trainable_params():
            if id(p) not in gate_ids:
                p.requires_grad = False

    def optimizer(params):  # frozen weights leave the default group empty
        if params and isinstance(params[0], dict):
            params = [g for g in params if g["params"]]
        return nn.AdamWeightDecay(params, learning_rate=lr, weight_decay=weight_decay)

    history = []
    # _GateLog first: BATCH_END runs in reverse order, so it reads the decision LRP has just written
    algorithms = [_GateLog(pruner, steps, log_every, log, history),
                  pruner.algorithm(gated_model, gate_lr=gate_lr, lagrangian_lr=lagrangian_lr)]
    Trainer(gated_model, FirstOutputLoss(task_loss), batches, max_steps=steps, algorithms=algorithms,
            optimizer=optimizer, log_interval=0).fit()
    gated_model.set_train(False)
    return history
