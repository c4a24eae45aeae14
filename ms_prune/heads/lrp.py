"""LRP head pruning: copy -> train gates -> prune.

``pruner = HeadPrunerBertLRP(model, target_heads=36)``; ``gated = pruner.decorate_model()`` is a
copy of ``model`` with a ``ConcreteGate`` on every attention layer; train it with
``pruner.loss_cell`` + ``pruner.optimizer`` (or ``train_gated``); ``pruner.prune_model(gated)``
copies the trained weights back into ``model``, folds the open gates into the output projections,
removes the closed heads with ``model.prune_heads`` and returns ``model``.

Any model that declares the model protocol (``ms_prune.protocol``) works: ours do, another is
declared by a short adapter (README.md, "Your own model").
"""
import copy

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ms_prune import protocol
from ms_prune.training import write_parameter

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


def _check_positive_number(owner, name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
            value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{owner}: {name} must be a {'non-negative' if allow_zero else 'positive'} number, "
                         f"got {value!r}")


class AbstractHeadPrunerLRP:
    """Learn which heads a model can lose (L0 / Hard-Concrete gates), then remove them.

    ``model`` is any model of the model protocol (``ms_prune.protocol``): ours (task models or
    bare backbones) or one declared by an adapter. Choose one of:

    * ``l0_penalty`` (lambda): fixed penalty weight. With ``penalty_normalization='heads'`` (the
      default) the expected number of open heads is divided by the model's head count, so the
      penalty is the expected FRACTION of open heads and one lambda suits models of any size;
      ``'none'`` is the raw count (the tutorial's and Voita's form, lambda ~ 0.0015 for 144 heads).
    * ``target_heads`` (int) or ``target_fraction`` (of the current heads): a Lagrangian term
      (``LRPObjective``) reaches the target during training, and ``prune_model`` keeps exactly
      that many heads (the best-ranked by gate ``log_a``).

    One threshold (``threshold``) decides "closed" in training monitors, evaluation (gate values
    <= threshold are exactly 0) and pruning, so ``prune_model``'s result computes exactly what
    the gated model computes in evaluation.

    Override ``build_copy`` when the model is not rebuilt by ``type(model)(config)``, and
    ``name_mapping`` when the gated copy names tensors differently.
    """

    def __init__(self, model, l0_penalty=1.0, target_heads=None, target_fraction=None,
                 penalty_normalization="heads", warmup_steps=0, linear_term=False, temperature=0.33,
                 stretch_limits=(-0.1, 1.1), eps=1e-6, threshold=CLOSED_THRESHOLD, init_log_a=None):
        owner = type(self).__name__
        _check_positive_number(owner, "l0_penalty", l0_penalty, allow_zero=True)
        if penalty_normalization not in PENALTY_NORMALIZATIONS:
            raise ValueError(f"{owner}: penalty_normalization must be one of {PENALTY_NORMALIZATIONS}, "
                             f"got {penalty_normalization!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer)) or warmup_steps < 0:
            raise ValueError(f"{owner}: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        check_gate_args(temperature, stretch_limits, 1.0, eps, threshold)
        self.model = model
        self.total_heads = sum(protocol.adapter(model).heads_per_layer())
        if self.total_heads == 0:
            raise ValueError(f"{owner}: the model has no attention heads left to gate")
        self.target_heads = self._resolve_target(target_heads, target_fraction)
        self.l0_penalty = float(l0_penalty)
        self.penalty_normalization = penalty_normalization
        self.threshold = float(threshold)
        self.gate_kwargs = dict(temperature=temperature, stretch_limits=tuple(stretch_limits), eps=eps,
                                threshold=threshold, init_log_a=init_log_a)
        scale = self.total_heads if penalty_normalization == "heads" else 1
        # With a target the gates' penalty is the plain expected count (or fraction); the
        # Lagrangian multipliers, not l0_penalty, set its weight.
        self.gate_l0_penalty = (1.0 if self.target_heads is not None else self.l0_penalty) / scale
        self.objective = LRPObjective(
            target=None if self.target_heads is None else self.target_heads / scale,
            start=self.total_heads / scale, warmup_steps=warmup_steps, linear_term=linear_term)

    def _resolve_target(self, target_heads, target_fraction):
        owner = type(self).__name__
        if target_heads is not None and target_fraction is not None:
            raise ValueError(f"{owner}: give target_heads or target_fraction, not both")
        if target_fraction is not None:
            if isinstance(target_fraction, bool) or not isinstance(target_fraction, (int, float)) or \
                    not 0 < target_fraction <= 1:
                raise ValueError(f"{owner}: target_fraction must be in (0, 1], got {target_fraction!r}")
            target_heads = max(1, int(round(target_fraction * self.total_heads)))
        if target_heads is None:
            return None
        if isinstance(target_heads, bool) or not isinstance(target_heads, (int, np.integer)) or \
                not 1 <= target_heads <= self.total_heads:
            raise ValueError(f"{owner}: target_heads must be an int in 1..{self.total_heads} (the model's heads), "
                             f"got {target_heads!r}")
        return int(target_heads)

    # ---- what a subclass may change -------------------------------------------------------------
    def name_mapping(self, names):
        """{original tensor name: gated-copy tensor name} for the original's tensors."""
        return {name: name for name in names}

    def build_copy(self):
        """A fresh, ungated instance of the original's class and config."""
        return type(self.model)(copy.deepcopy(self.model.config))

    # ---- the three steps ----------------------------------------------------------------------
    def decorate_model(self):
        """The gated copy: same class and config, a gate on every attention layer, and every
        tensor of the original copied by ``name_mapping`` (an uncopied tensor is an error)."""
        gated = self.build_copy()
        protocol.attach_gates(gated, "head", lambda _, heads: ConcreteGate(
            heads.num_heads, l0_penalty=self.gate_l0_penalty, **self.gate_kwargs))
        gate_names = self._gate_names(gated)
        source = dict(self.model.parameters_and_names())
        mapping = self.name_mapping(list(source))
        self._copy_tensors(source, dict(gated.parameters_and_names()), mapping, skip=gate_names,
                           what="decorate_model (original -> gated copy)")
        gated.set_train(self.model.training)
        # which heads the original had when this copy was made: prune_model refuses a copy made
        # before an earlier prune_model shrank the original
        gated._lrp_source_heads = self._kept_heads()
        return gated

    def _kept_heads(self):
        return [list(a.kept) for a in protocol.adapter(self.model).attentions()]

    def prune_model(self, gated_model):
        """Copy the trained weights back into the original model, fold the open gates into the
        output projections, remove the closed heads and return the original model. The gated
        model's gates are snapped to the decision (dropped heads closed), so both compute the
        same in evaluation.

        Once per gated copy: the original is pruned in place, so calling it again (or with a copy
        made before the original was pruned) is a ValueError; prune further by calling
        ``decorate_model`` again on the pruned model's pruner."""
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
        decision = self.decide(gated_model)
        gates = protocol.gates_of(gated_model, "head")
        for layer, (keep, _) in enumerate(decision):
            gate = gates[layer]
            if gate is None:
                continue
            if keep:
                # A target ranks heads by log_a, so a kept head may sit at or below the threshold:
                # lower this layer's threshold under it (dropped heads are shut just below) so
                # it keeps the gate value it was trained towards.
                raw = gate.raw_gate_values()[keep]
                gate.threshold = min(gate.threshold, max(0.0, float(raw.min()) * 0.5))
            gate.close([p for p in range(gate.num_heads) if p not in keep])
        protocol.refresh(gated_model)  # thresholds are compile-time constants
        # weights back: the inverse of the name mapping, gates excluded
        target = dict(self.model.parameters_and_names())
        mapping = self.name_mapping(list(target))
        gated_params = dict(gated_model.parameters_and_names())
        self._copy_tensors(gated_params, target, {v: k for k, v in mapping.items()},
                           skip=self._gate_names(gated_model), what="prune_model (gated copy -> original)")
        to_prune = {}
        model_adapter = protocol.adapter(self.model)
        for layer, attention in enumerate(model_adapter.attentions()):
            gate = gates[layer]
            if gate is None:
                continue
            keep = decision[layer][0]
            fold_gate_values(attention, keep, gate.gate_values())
            dropped = [attention.kept[p] for p in range(attention.num_heads) if p not in keep]
            if dropped:
                to_prune[layer] = dropped
        model_adapter.prune_heads(to_prune)
        self.pruned_heads = to_prune
        gated_model._lrp_pruned = True
        return self.model

    # ---- decisions and reports -----------------------------------------------------------------
    def decide(self, gated_model):
        """Per layer: (kept positions, evaluation gate values). Without a target a head is kept
        when its gate is open (> threshold); with one, the ``target_heads`` best by ``log_a``."""
        gates = protocol.gates_of(gated_model, "head")
        if any(n and g is None for n, g in zip(protocol.adapter(gated_model).heads_per_layer(), gates)):
            raise ValueError(f"{type(self).__name__}: the model passed is not gated (use decorate_model's result)")
        values = [g.gate_values() if g is not None else np.zeros((0,), np.float32) for g in gates]
        keep_one = not protocol.adapter(gated_model).empty_layers_allowed
        return list(zip(decide_heads(gates, self.target_heads, keep_one), values))

    def gate_summary(self, gated_model):
        """Open heads per layer (by the one threshold), their total, and the expected open count."""
        gates = protocol.gates_of(gated_model, "head")
        open_per_layer = [int(np.sum(g.gate_values() > 0.0)) if g is not None else 0 for g in gates]
        expected = sum(g.expected_open() for g in gates if g is not None)
        return {"open_per_layer": open_per_layer, "open": sum(open_per_layer), "expected_open": expected}

    # ---- training ----------------------------------------------------------------------------
    def loss_cell(self, gated_model, task_loss):
        """``LRPLoss``: ``task_loss(outputs, labels)`` plus this pruner's gate objective."""
        return LRPLoss(gated_model, task_loss, GateObjective(protocol.gates_of(gated_model, "head"), self.objective))

    def parameter_groups(self, gated_model, lr, gate_lr, lagrangian_lr=0.05, weight_decay=0.01,
                         train_weights=True):
        """Optimizer groups: model weights, gates (own lr, no decay), Lagrange multipliers
        (own lr, no decay; only with a target)."""
        for name, value in (("lr", lr), ("gate_lr", gate_lr), ("lagrangian_lr", lagrangian_lr)):
            _check_positive_number(type(self).__name__, name, value)
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
        """Move the target schedule to ``step`` (call before each training step)."""
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
        filled = set()
        mismatched = []
        for src, dst in mapping.items():
            if src not in source or dst not in target or src in skip:
                continue
            if tuple(source[src].shape) != tuple(target[dst].shape):
                mismatched.append(f"{src} {tuple(source[src].shape)} -> {dst} {tuple(target[dst].shape)}")
                continue
            target[dst].set_data(Tensor(source[src].asnumpy().copy()))
            filled.add(dst)
        left = [n for n in target if n not in filled and n not in skip]
        if mismatched:
            problems.append(f"shape mismatches: {mismatched}")
        if left:
            problems.append(f"tensors left uncopied: {left}")
        if problems:
            raise ValueError(f"{owner}.{what}: " + " | ".join(problems))


def decide_heads(gates, target_heads=None, keep_one=False):
    """Which heads each gate keeps (sorted positions; [] for a layer without a gate): the one
    decision that evaluation, the training log and pruning all follow. Without a target a head is
    kept when its evaluation formula value is above its gate's threshold; with ``target_heads``,
    the ``target_heads`` best by ``log_a`` over the whole model (ties: earlier layer, then head).
    ``keep_one``: every gated layer keeps at least its best head (a model whose layers cannot lose
    every head, see ``TransformerAdapter.empty_layers_allowed``); those count towards the target."""
    keep = [[] for _ in gates]
    if keep_one:
        for layer, g in enumerate(gates):
            if g is not None:
                keep[layer].append(int(np.argmax(g.log_a.asnumpy())))
    if target_heads is None:
        return [sorted(set(k) | set(np.flatnonzero(g.raw_gate_values() > g.threshold).tolist()))
                if g is not None else [] for k, g in zip(keep, gates)]
    scores = [(float(g.log_a.asnumpy()[p]), -layer, -p, layer, p)
              for layer, g in enumerate(gates) if g is not None for p in range(g.num_heads) if p not in keep[layer]]
    room = max(0, target_heads - sum(len(k) for k in keep))
    for *_, layer, p in sorted(scores, reverse=True)[:room]:
        keep[layer].append(p)
    return [sorted(k) for k in keep]


def fold_gate_values(attention, keep, values):
    """Scale the output-projection inputs of each kept head by its gate value, so the ungated
    (pruned) attention computes what the gated one computes in evaluation. ``attention``: the
    layer's ``ms_prune.protocol.AttentionHeads``."""
    cell, layout = attention.output_projection(), attention.layout
    scale = np.ones((attention.num_heads * attention.head_dim,), np.float32)
    for p in keep:
        scale[p * attention.head_dim:(p + 1) * attention.head_dim] = values[p]
    weight = cell.weight.asnumpy()
    weight = weight * (scale[None, :] if layout == "linear" else scale[:, None])
    cell.weight.set_data(Tensor(np.ascontiguousarray(weight, np.float32)))


class HeadPrunerBertLRP(AbstractHeadPrunerLRP):
    """LRP for BERT models (the name of earlier releases; any protocol model works)."""


class HeadPrunerGPTLRP(AbstractHeadPrunerLRP):
    """LRP for GPT-2 models (the name of earlier releases; any protocol model works)."""


def lrp_pruner(model, **kwargs):
    """The LRP pruner for ``model`` (any model of the model protocol), built with ``kwargs``."""
    protocol.adapter(model)  # a model that does not declare the protocol is told how to
    return AbstractHeadPrunerLRP(model, **kwargs)


def make_gated_train_step(pruner, gated_model, task_loss, lr, gate_lr, lagrangian_lr=0.05, weight_decay=0.01,
                          train_weights=True):
    """A ``TrainOneStepCell`` for the gated model: ``step(*inputs, labels) -> loss``; compiled
    when the context is GRAPH_MODE.

    A Cell rather than ``ms.jit`` of a closure (``ms_prune.training.make_train_step``): a jitted
    closure freezes Parameters that are not optimised (here the Lagrangian target, which the host
    moves every step) as constants at compile time; a Cell's graph reads them each step."""
    loss_cell = pruner.loss_cell(gated_model, task_loss)
    optimizer = pruner.optimizer(gated_model, lr, gate_lr, lagrangian_lr, weight_decay, train_weights)
    step = nn.TrainOneStepCell(loss_cell, optimizer)
    step.set_train(True)
    return step


def train_gated(pruner, gated_model, task_loss, batches, steps, lr, gate_lr, lagrangian_lr=0.05,
                weight_decay=0.01, train_weights=True, log_every=0, log=print):
    """Train the gated model for ``steps`` steps of ``batches`` (an iterator of tuples of numpy
    arrays: the model inputs, then the labels). Returns the history
    [(step, loss, open heads, expected open)] of the logged steps."""
    step_cell = make_gated_train_step(pruner, gated_model, task_loss, lr, gate_lr, lagrangian_lr, weight_decay,
                                      train_weights)
    history = []
    for step in range(steps):
        pruner.set_step(step)
        loss = step_cell(*[Tensor(b) for b in next(batches)])
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            summary = pruner.gate_summary(gated_model)
            history.append((step + 1, float(loss.asnumpy()), summary["open"], summary["expected_open"]))
            if log:
                target = "" if pruner.target_heads is None else f" (target {pruner.target_heads})"
                log(f"  gate step {step + 1}/{steps}: loss {float(loss.asnumpy()):.4f}, open heads "
                    f"{summary['open']}/{pruner.total_heads}{target}, expected {summary['expected_open']:.1f}, "
                    f"per layer {summary['open_per_layer']}")
    gated_model.set_train(False)
    return history
