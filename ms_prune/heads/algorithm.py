"""LRP as an engine algorithm: gates on the model itself (no copy), trained with the model, then
the dropped heads removed in place; recovery is simply training on after the pruning step. Bound
to a pruner (``AbstractHeadPrunerLRP.algorithm``), the same algorithm trains the pruner's gated
copy and leaves the pruning to ``prune_model``."""
from ms_prune import protocol
from ms_prune.engine import Algorithm, Applied, Event
from ms_prune.validation import check_choice, check_instance, check_int, check_number

from .concrete_gate import CLOSED_THRESHOLD, ConcreteGate, check_gate_args
from .lrp import (PENALTY_NORMALIZATIONS, AbstractHeadPrunerLRP, lrp_summary, prune_to_decision, refuse_other_gates,
                  removed_heads, resolve_target, write_lrp_decision)

__all__ = ["LRP", "apply_lrp", "prune_lrp", "remove_lrp", "write_lrp_decision"]


def _gates(model):
    return protocol.gates_of(model, "head")


def apply_lrp(model, l0_penalty=1.0, host_noise=False, **gate_kwargs):
    """Put a ``ConcreteGate`` on the heads of every attention layer of ``model`` (in place: on the
    input of its output projection, see ``ms_prune.protocol``); returns ``Applied(cells=the gates per
    layer (None for a layer without heads))``. The model's outputs stay what they were (the penalty is read from
    the gates, see ``GateObjective``); with the gates fully open (their start) the model computes
    exactly what it computed before. ``gate_kwargs`` go to ``ConcreteGate`` (temperature,
    stretch_limits, eps, threshold, init_log_a). A model already carrying LRP gates or GradNAS
    masks is refused, naming how to remove them."""
    refuse_other_gates("apply_lrp", model)
    return Applied(protocol.attach_gates(model, "head", lambda _, heads: ConcreteGate(
        heads.num_heads, l0_penalty=l0_penalty, host_noise=host_noise, **gate_kwargs)))


def prune_lrp(model, target_heads=None):
    """Remove the heads the gates drop (``write_lrp_decision``), fold the kept gates' evaluation
    values into the output projections and remove the gates: in evaluation the result computes what
    the gated model computed. Returns ``{layer: [original head numbers removed]}``.

    The decision is checked against what the surgery can make before anything changes; if the
    surgery still fails, the same gates are put back (the surgery restores the model's weights), so
    the learned decision is not lost, and the error is raised."""
    keep = write_lrp_decision(model, target_heads)
    gates = _gates(model)
    values = [g.gate_values() if g is not None else None for g in gates]
    plan = removed_heads(model, keep)
    protocol.detach_gates(model, "head")

    def reattach(layer, _):
        return gates[layer]

    return prune_to_decision(model, plan, keep, values,
                             lambda: protocol.attach_gates(model, "head", reattach))


def remove_lrp(model):
    """Drop the gates without pruning (``apply_lrp``'s inverse)."""
    protocol.detach_gates(model, "head")
    return model


class LRP(Algorithm):
    """Learn which heads to remove with Hard-Concrete (L0) gates, then remove them.

    INIT puts gates on the model; each step writes the target schedule and the gates' noise
    (drawn from the run's RNG) before it, and the decision after it; at ``prune_at_step`` (default:
    FIT_END) the dropped heads are removed in place, and the steps after that are recovery.
    ``target_heads`` / ``target_fraction`` (a Lagrangian term reaches it and exactly that many
    heads stay) or ``l0_penalty``; see ``ms_prune/heads/README.md``. The gates, their penalty and
    the target come from an ``AbstractHeadPrunerLRP`` with these settings (its hooks ``init_head``
    and ``get_penalty``); ``pruner.algorithm(gated)`` gives one bound to a pruner's gated copy.

    Under ``mindspore.train.Model.train`` (``AlgorithmCallback``) it runs without ``prune_at_step``
    (pruning then happens after the run); with it the callback refuses it when built, since the
    one compiled graph cannot follow a model pruned mid-run.
    """

    changes_graph = True

    def __init__(self, target_heads=None, target_fraction=None, l0_penalty=1.0, penalty_normalization="heads",
                 warmup_steps=0, prune_at_step=None, gate_lr=0.1, lagrangian_lr=0.05, linear_term=False,
                 temperature=0.33, stretch_limits=(-0.1, 1.1), threshold=CLOSED_THRESHOLD):
        owner = "LRP"
        if target_heads is not None and target_fraction is not None:
            raise ValueError(f"LRP: give target_heads or target_fraction, not both (got {target_heads!r} and "
                             f"{target_fraction!r})")
        self.target_heads = check_int(owner, "target_heads", target_heads, minimum=1, allow_none=True)
        self.target_fraction = check_number(owner, "target_fraction", target_fraction, minimum=0.0, maximum=1.0,
                                            min_open=True, allow_none=True)
        self.l0_penalty = check_number(owner, "l0_penalty", l0_penalty, minimum=0.0)
        self.penalty_normalization = check_choice(owner, "penalty_normalization", penalty_normalization,
                                                  PENALTY_NORMALIZATIONS)
        self.warmup_steps = check_int(owner, "warmup_steps", warmup_steps, minimum=0)
        self.prune_at_step = check_int(owner, "prune_at_step", prune_at_step, minimum=1, allow_none=True)
        self.gate_lr = check_number(owner, "gate_lr", gate_lr, minimum=0.0, min_open=True)
        self.lagrangian_lr = check_number(owner, "lagrangian_lr", lagrangian_lr, minimum=0.0, min_open=True)
        self.linear_term = bool(linear_term)
        check_gate_args(temperature, stretch_limits, 1.0, 1e-6, threshold)
        self.temperature, self.stretch_limits, self.threshold = temperature, tuple(stretch_limits), threshold
        self.pruner = None
        self.objective = self.term = None
        self.target = None
        self.pruned_heads = None
        self._saved_pruned_heads = None
        self._gated = None  # the pruner's gated copy this algorithm is bound to (``bind``)

    def bind(self, pruner, gated_model):
        """Train ``pruner``'s gated copy ``gated_model`` (``pruner.decorate_model()``) with the
        pruner's gates and ``get_penalty``; nothing is pruned (``pruner.prune_model`` does)."""
        check_instance("LRP.bind", "pruner", pruner, AbstractHeadPrunerLRP)
        if self.prune_at_step is not None:
            raise ValueError(f"LRP.bind: prune_at_step={self.prune_at_step} would prune the gated copy; a bound LRP "
                             f"leaves the pruning to pruner.prune_model")
        gates = _gates(gated_model)
        if not any(isinstance(g, ConcreteGate) for g in gates) or any(
                n and not isinstance(g, ConcreteGate) for n, g in zip(protocol.adapter(gated_model).heads_per_layer(),
                                                                        gates)):
            raise ValueError("LRP.bind: gated_model must be the pruner's gated copy (pruner.decorate_model()), with "
                             "a ConcreteGate on every attention layer")
        self.pruner, self._gated = pruner, gated_model
        return self

    @property
    def runs_in_model_train(self):
        return self.prune_at_step is None

    @property
    def model_train_refusal(self):
        """Why ``AlgorithmCallback`` refuses this algorithm (None when it runs there)."""
        if self.prune_at_step is None:
            return None
        return (f"prune_at_step={self.prune_at_step} removes heads in the middle of the run; drop prune_at_step "
                f"to prune after Model.train ends")

    # ---- events ----------------------------------------------------------------------------------
    def match(self, event, state):
        if event == Event.INIT:
            return True
        if event == Event.AFTER_LOAD:
            return self._saved_pruned_heads is not None and self.pruned_heads is None
        if event == Event.FIT_END:  # a bound LRP leaves the pruning to its pruner
            return self._gated is None and self.pruned_heads is None
        # the gates' events, while the model still has gates
        return event in (Event.BATCH_START, Event.BATCH_END) and self.pruned_heads is None

    def apply(self, event, state, logger):
        if event == Event.INIT:
            self._add_gates(state.model)
        elif event == Event.BATCH_START:
            self.objective.set_step(state.step)
            for gate in self._live_gates(state.model):
                gate.write_noise(state.rng)
        elif event == Event.BATCH_END:
            write_lrp_decision(state.model, self.target)
            if self.prune_at_step is not None and state.step >= self.prune_at_step:
                self._prune(state, logger)
        elif event == Event.FIT_END:
            self._prune(state, logger)
        elif event == Event.AFTER_LOAD:
            # the checkpoint holds the pruned model's tensors: rebuild its shapes (no folding, the
            # saved weights already carry the gate values)
            protocol.detach_gates(state.model, "head")
            protocol.adapter(state.model).prune_heads(self._saved_pruned_heads)
            self.pruned_heads = self._saved_pruned_heads
            state.structure_changed = True

    def _add_gates(self, model):
        if self._gated is not None:
            if model is not self._gated:
                raise ValueError("LRP: this LRP is bound to a pruner's gated copy (pruner.algorithm(gated)), but the "
                                 "run trains another model; pass the gated copy to the Trainer")
        else:
            total = sum(protocol.adapter(model).heads_per_layer())
            target = resolve_target("LRP", total, self.target_heads, self.target_fraction)
            self.pruner = AbstractHeadPrunerLRP(
                model, l0_penalty=self.l0_penalty, target_heads=target,
                penalty_normalization=self.penalty_normalization, warmup_steps=self.warmup_steps,
                linear_term=self.linear_term, temperature=self.temperature, stretch_limits=self.stretch_limits,
                threshold=self.threshold)
            refuse_other_gates("LRP", model)
            self.pruner.add_gates(model)
        # the run's RNG draws the noise (exact resume); host_noise is read when the graph compiles,
        # which happens after INIT
        for gate in self._live_gates(model):
            gate.host_noise = True
        protocol.refresh(model)
        self.target = self.pruner.target_heads
        self.objective = self.pruner.objective
        self.term = self.pruner.get_penalty(model)

    def _live_gates(self, model):
        return [g for g in _gates(model) if g is not None]

    def _prune(self, state, logger):
        self.pruned_heads = prune_lrp(state.model, self.target)
        state.structure_changed = True
        logger.info("LRP: pruned at step %d, heads per layer now %s", state.step,
                    protocol.adapter(state.model).heads_per_layer())

    # ---- what the compiled step needs ----------------------------------------------------------
    def loss_terms(self, state):
        return (self.term,) if self.pruned_heads is None and self.term is not None else ()

    def param_groups(self, state):
        if self.pruned_heads is not None or self.objective is None:
            return ()
        groups = [{"params": [g.log_a for g in self._live_gates(state.model)], "lr": self.gate_lr,
                   "weight_decay": 0.0}]
        if self.objective.multipliers():
            groups.append({"params": self.objective.multipliers(), "lr": self.lagrangian_lr, "weight_decay": 0.0})
        return groups

    def graph_key(self, state):
        return self.pruned_heads is None

    def parameters(self):
        if self.objective is None:
            return ()
        return (self.objective.target, self.objective.lambda_1, self.objective.lambda_2)

    def summary(self, model):
        """Heads kept per layer by the current decision, their total, and the gates' expected open
        count (the pruner's ``gate_summary``)."""
        return lrp_summary(model, self.target)

    def state_dict(self):
        heads = self.pruned_heads
        return {"pruned_heads": None if heads is None else {str(k): list(v) for k, v in heads.items()}}

    def load_state_dict(self, state_dict):
        heads = state_dict.get("pruned_heads")
        self._saved_pruned_heads = None if heads is None else {int(k): list(v) for k, v in heads.items()}

    def __repr__(self):
        return (f"LRP(target_heads={self.target_heads}, target_fraction={self.target_fraction}, "
                f"l0_penalty={self.l0_penalty}, prune_at_step={self.prune_at_step})")
