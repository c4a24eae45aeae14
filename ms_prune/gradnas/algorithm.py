"""``GradNAS``: the algorithm-class form of ``apply_gradnas`` for the training engine.

It subclasses ``ms_prune.engine.Algorithm`` when the engine is importable; without it the class
still works on any object with the engine's ``State`` attributes (``model``, ``loss_net``,
``step``, ``structure_changed``), so the package never depends on the engine being present.
"""
from ms_prune.validation import check_bool, check_choice, check_int

from .gradnas import GRADIENT_METHODS, METHODS, apply_gradnas
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
    ``apply_gradnas``; ``result`` holds what ``apply_gradnas`` returned."""

    changes_graph = True

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

    def match(self, event, state):
        if self.done:
            return False
        name = _event_name(event)
        if self.at_step is None:
            return name == "FIT_START"
        return name == "BATCH_START" and state.step >= self.at_step

    def apply(self, event, state, logger=None):
        self.result = apply_gradnas(state.model, state.loss_net, self.batches, constraints=self.constraints,
                                    selector=self.selector, seq_len=self.seq_len, refit=self.refit,
                                    method=self.method, seed=self.seed)
        state.structure_changed = True
        self.done = True
        log = getattr(logger, "log_metrics", None)
        if log is not None:
            log({f"gradnas/{m}_ratio": r for m, r in self.result["ratios"].items() if r is not None})

    def state_dict(self):
        # The pruned structure itself travels in the model's config (pruned_heads,
        # pruned_ffn_neurons); this only says not to prune again.
        return {"done": self.done}

    def load_state_dict(self, state):
        self.done = bool(state["done"])
