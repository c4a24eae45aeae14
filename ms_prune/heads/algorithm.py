"""LRP as an engine algorithm: gates on the model itself (no copy), trained with the model, then
the closed heads removed in place; recovery is simply training on after the pruning step."""
from ms_prune import protocol
from ms_prune.engine import Algorithm, Event
from ms_prune.validation import check_choice, check_int, check_number

from .concrete_gate import CLOSED_THRESHOLD, ConcreteGate, check_gate_args
from .lrp import GateObjective, LRPObjective, PENALTY_NORMALIZATIONS, decide_heads, fold_gate_values

__all__ = ["LRP", "apply_lrp", "prune_lrp", "remove_lrp"]


def _gates(model):
    return protocol.gates_of(model, "head")


def apply_lrp(model, l0_penalty=1.0, host_noise=False, **gate_kwargs):
    """Put a ``ConcreteGate`` on the heads of every attention layer of ``model`` (in place: on the
    input of its output projection, see ``ms_prune.protocol``); returns the gates per layer (None
    for a layer without heads). The model's outputs stay what they were (the penalty is read from
    the gates, see ``GateObjective``); with the gates fully open (their start) the model computes
    exactly what it computed before. ``gate_kwargs`` go to ``ConcreteGate`` (temperature,
    stretch_limits, eps, threshold, init_log_a)."""
    return protocol.attach_gates(model, "head", lambda _, heads: ConcreteGate(
        heads.num_heads, l0_penalty=l0_penalty, host_noise=host_noise, **gate_kwargs))


def write_lrp_decision(model, target_heads=None):
    """Decide which heads stay (``decide_heads``) and make evaluation follow it; returns the
    kept positions per layer."""
    gates = _gates(model)
    keep = decide_heads(gates, target_heads, keep_one=not protocol.adapter(model).empty_layers_allowed)
    for gate, kept in zip(gates, keep):
        if gate is not None:
            gate.write_decision(kept)
    return keep


def prune_lrp(model, target_heads=None):
    """Remove the heads the gates drop, fold the kept gates' evaluation values into the output
    projections and remove the gates: in evaluation the result computes what the gated model
    computed. Returns ``{layer: [original head numbers removed]}``."""
    keep = write_lrp_decision(model, target_heads)
    model_adapter = protocol.adapter(model)
    removed = {}
    for layer, (attention, gate, kept) in enumerate(zip(model_adapter.attentions(), _gates(model), keep)):
        if gate is None:
            continue
        fold_gate_values(attention, kept, gate.gate_values())
        dropped = [attention.kept[p] for p in range(attention.num_heads) if p not in kept]
        if dropped:
            removed[layer] = dropped
    protocol.detach_gates(model, "head")
    model_adapter.prune_heads(removed)
    return removed


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
    heads stay) or ``l0_penalty``; see ``ms_prune/heads/README.md``.
    """

    changes_graph = True

    def __init__(self, target_heads=None, target_fraction=None, l0_penalty=1.0, penalty_normalization="heads",
                 warmup_steps=0, prune_at_step=None, gate_lr=0.1, lagrangian_lr=0.05, linear_term=False,
                 temperature=0.33, stretch_limits=(-0.1, 1.1), threshold=CLOSED_THRESHOLD):
        owner = "LRP"
        if target_heads is not None and target_fraction is not None:
            raise ValueError("LRP: give target_heads or target_fraction, not both")
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
        self.objective = self.term = None
        self.target = None
        self.pruned_heads = None
        self._saved_pruned_heads = None

    # ---- events ----------------------------------------------------------------------------------
    def match(self, event, state):
        if event == Event.INIT:
            return True
        if event == Event.AFTER_LOAD:
            return self._saved_pruned_heads is not None and self.pruned_heads is None
        # the gates' events, while the model still has gates
        return event in (Event.BATCH_START, Event.BATCH_END, Event.FIT_END) and self.pruned_heads is None

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
        total = sum(protocol.adapter(model).heads_per_layer())
        if total == 0:
            raise ValueError("LRP: the model has no attention heads left to gate")
        target = self.target_heads
        if self.target_fraction is not None:
            target = max(1, int(round(self.target_fraction * total)))
        if target is not None and target > total:
            raise ValueError(f"LRP: target_heads must be at most the model's {total} heads, got {target}")
        self.target = target
        scale = total if self.penalty_normalization == "heads" else 1
        # With a target the gates' penalty is the plain expected fraction (or count): the Lagrangian
        # multipliers, not l0_penalty, set its weight; and evaluation follows the top-k decision
        # alone (threshold 0), so a kept head keeps the gate value it was trained towards.
        gate_penalty = (1.0 if target is not None else self.l0_penalty) / scale
        threshold = self.threshold if target is None else 0.0
        gates = apply_lrp(model, l0_penalty=gate_penalty, host_noise=True, temperature=self.temperature,
                          stretch_limits=self.stretch_limits, threshold=threshold)
        self.objective = LRPObjective(target=None if target is None else target / scale, start=total / scale,
                                      warmup_steps=self.warmup_steps, linear_term=self.linear_term)
        self.term = GateObjective(gates, self.objective)

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
        """Open heads per layer by the current decision, and the gates' expected open count."""
        gates = _gates(model)
        keep = decide_heads(gates, self.target, keep_one=not protocol.adapter(model).empty_layers_allowed)
        return {"open_per_layer": [len(k) for k in keep], "open": sum(len(k) for k in keep),
                "expected_open": float(sum(g.expected_open() for g in gates if g is not None))}

    def state_dict(self):
        heads = self.pruned_heads
        return {"pruned_heads": None if heads is None else {str(k): list(v) for k, v in heads.items()}}

    def load_state_dict(self, state_dict):
        heads = state_dict.get("pruned_heads")
        self._saved_pruned_heads = None if heads is None else {int(k): list(v) for k, v in heads.items()}

    def __repr__(self):
        return (f"LRP(target_heads={self.target_heads}, target_fraction={self.target_fraction}, "
                f"l0_penalty={self.l0_penalty}, prune_at_step={self.prune_at_step})")
