"""Runs the algorithms at each event, in Composer's order, and keeps a trace of what ran."""
import logging

from ms_prune.validation import check_instance

from .algorithm import Algorithm
from .event import Event

__all__ = ["Engine"]

log = logging.getLogger("ms_prune.engine")


class Engine:
    """``run_event(event)`` applies every algorithm whose ``match`` is true, in the order given
    (reversed at AFTER_* and *_END events). ``trace`` lists ``(step, event, algorithm)`` for every
    application, so a test or a user can see what ran when."""

    def __init__(self, state, logger=None):
        for i, algorithm in enumerate(state.algorithms):
            check_instance("Engine", f"algorithms[{i}]", algorithm, Algorithm)
        # checkpoints keep algorithm states by name
        names = [a.name for a in state.algorithms]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"Engine: each algorithm may appear once; repeated: {repeated}")
        self.state = state
        self.logger = logger or log
        self.trace = []

    def run_event(self, event):
        event = Event(event)
        algorithms = self.state.algorithms
        for algorithm in (reversed(algorithms) if event.runs_in_reverse else algorithms):
            if algorithm.match(event, self.state):
                algorithm.apply(event, self.state, self.logger)
                self.trace.append((self.state.step, event.value, algorithm.name))
