"""Events: the points of a training run at which algorithms may act (Composer's ``Event``, cut to
what a compiled MindSpore step allows).

In GRAPH_MODE the forward pass, the loss, the backward pass and the optimizer update are one
compiled call, so there is no BEFORE_FORWARD / AFTER_LOSS at which Python could act. What an
algorithm would do there it declares instead, and the trainer compiles it into the step:
``Algorithm.loss_terms`` (added to the loss) and ``Algorithm.param_groups`` (optimizer groups).
AFTER_TRAIN_STEP is the first point after the step at which its loss is known.
"""
from enum import Enum

__all__ = ["Event"]


class Event(str, Enum):
    """``INIT`` (surgery: wrap layers, add gates; before any graph is built), ``FIT_START``,
    ``EPOCH_START``, ``BATCH_START`` (host-side schedules: write this step's values into the
    graph), ``AFTER_TRAIN_STEP`` (the compiled step ran; ``state.loss`` is its loss),
    ``BATCH_END``, ``EPOCH_END``, ``EVAL_START``, ``EVAL_END``, ``FIT_END``, and ``AFTER_LOAD``
    (a checkpoint's algorithm states were loaded; redo surgery they imply before its tensors
    are placed).

    Algorithms run in the order given at ``*_START`` events and in reverse order at ``AFTER_*``
    and ``*_END`` events, so that what an algorithm opens it closes last (Composer's rule).
    """

    INIT = "init"
    AFTER_LOAD = "after_load"
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    AFTER_TRAIN_STEP = "after_train_step"
    BATCH_END = "batch_end"
    EPOCH_END = "epoch_end"
    EVAL_START = "eval_start"
    EVAL_END = "eval_end"
    FIT_END = "fit_end"

    @property
    def runs_in_reverse(self):
        return self.value.startswith("after_") or self.value.endswith("_end")
