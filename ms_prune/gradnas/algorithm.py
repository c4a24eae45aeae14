"""``GradNAS``: the algorithm-class form of ``apply_gradnas`` for the training engine.

It subclasses ``ms_prune.engine.Algorithm`` when the engine is importable; without it the class
still works on any object with the engine's ``State`` attributes (``model``, ``loss_net``,
``step``, ``structure_changed``), so the package never depends on the engine being present.
"""
from ms_prune import protocol
from ms_prune.validation import check_bool, check_choice, check_int

from .gradnas import GRADIENT_METHODS, METHODS, apply_gradnas, resolve_budget
from .selection import SELECTORS, parse_constraints

try:
    from ms_prune.engine import Algorithm
except ImportError:  # the engine is optional for this package
    Algorithm = object


def _event_name(event):
    # Compared by name, so matching works with the engine's Event enum and without it.
    return getattr(event, "name", str(event)).upper()


class GradNAS(Algorithm):
    """Score (on its own ``batches``, with the state's ``loss_net``) and prune the state's model
    once: at FIT_START, or at the first BATCH_START with ``state.step >= at_step``. It then sets
    ``state.structure_changed`` so the trainer rebuilds its step and optimizer. Arguments as in
    ``apply_gradnas``; ``result`` holds what ``apply_gradnas`` returned. A resumed run redoes the
    saved surgery at AFTER_LOAD (before the checkpoint's tensors, refitted ones included, are
    placed), without scoring again. At INIT it only checks that the budget is reachable."""

    changes_graph = True
    # Scoring needs the loss net, which a mindspore Model.train callback only has once its one
    # graph for the whole run is compiled: too late for surgery.
    runs_in_model_train = False

    def __init__(self, batches, constraints, selector="global", seq_len=None, refit=False, method="fisher",
                 num_batches=None, at_step=None, seed=0):
        owner = type(self).__name__
        parse_constraints(owner, constraints, seq_len)
        check_choice(owner, "selector", selector, SELECTORS)
        check_choice(owner, "method", method, METHODS)
        check_bool(owner, "refit", refit)
        check_int(owner, "num_batches", num_batches, minimum=1, allow_none=True)
        check_int(owner, "at_step", at_step, minimum=0, allow_none=True)
        if batches is None and (method in GRADIENT_METHODS or refit):
            raise ValueError(f"{owner}: method={method!r} (refit={refit}) needs batches, got None")
        # An iterator would be exhausted by the first use; a list can serve scoring and refit.
        self.batches = None if batches is None else list(batches)[:num_batches]
        self.constraints, self.selector, self.seq_len, self.refit = constraints, selector, seq_len, refit
        self.method, self.at_step, self.seed = method, at_step, seed
        self.done = False
        self.result = None
        self.pruned = None  # {"heads": {layer: [...]}, "neurons": {layer: [...]}} once pruned
        self._to_restore = None

    def match(self, event, state):
        name = _event_name(event)
        if name == "INIT":
            return True
        if name == "AFTER_LOAD":
            return self._to_restore is not None
        if self.done:
            return False
        if self.at_step is None:
            return name == "FIT_START"
        return name == "BATCH_START" and state.step >= self.at_step

    def apply(self, event, state, logger=None):
        if _event_name(event) == "INIT":
            # fail before training, not at the pruning step, when the model does not declare the
            # model protocol or the budget is out of reach
            resolve_budget(type(self).__name__, state.model, self.constraints, self.seq_len)
            return
        if _event_name(event) == "AFTER_LOAD":
            # prune_* skip units already gone, so this is safe on a model rebuilt pruned too
            model_adapter = protocol.adapter(state.model)
            model_adapter.prune_heads(self._to_restore["heads"])
            if self._to_restore["neurons"]:
                model_adapter.prune_ffn_neurons(self._to_restore["neurons"])
            self.pruned, self._to_restore, self.done = self._to_restore, None, True
            state.structure_changed = True
            return
        self.result = apply_gradnas(state.model, state.loss_net, self.batches, constraints=self.constraints,
                                    selector=self.selector, seq_len=self.seq_len, refit=self.refit,
                                    method=self.method, seed=self.seed)
        self.pruned = {"heads": self.result["pruned_heads"], "neurons": self.result["pruned_neurons"]}
        state.structure_changed = True
        self.done = True
        info = getattr(logger, "info", None)
        if info is not None:
            info("GradNAS at step %d: heads per layer %s, FFN neurons per layer %s, ratios %s", state.step,
                 self.result["heads_per_layer"], self.result["neurons_per_layer"], self.result["ratios"])

    def state_dict(self):
        # JSON: layer keys become strings
        pruned = None if self.pruned is None else {
            kind: {str(layer): [int(u) for u in units] for layer, units in per_layer.items()}
            for kind, per_layer in self.pruned.items()}
        return {"done": self.done, "pruned": pruned}

    def load_state_dict(self, state):
        self.done = bool(state["done"])
        pruned = state.get("pruned")
        self._to_restore = None if pruned is None else {
            kind: {int(layer): list(units) for layer, units in per_layer.items()}
            for kind, per_layer in pruned.items()}
