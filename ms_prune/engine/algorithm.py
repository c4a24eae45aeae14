"""The base of every training-time algorithm (Composer's ``Algorithm``, plus what a compiled
step needs declared up front)."""

from typing import NamedTuple

__all__ = ["Algorithm", "Applied"]


class Applied(NamedTuple):
    """What every functional form ``apply_<name>(model, ...)`` returns after changing ``model`` in
    place: the Cells it put into the model (gates, layer wrappers; None for a layer it left alone)
    and its schedule when it has one (the object a hand-written loop steps between training steps),
    else None. ``remove_<name>(model)`` undoes it. A pruning call (``ms_prune.prune``,
    ``apply_gradnas``, ``prune_lrp``) removes units for real and returns a report instead."""
    cells: list
    schedule: object = None


class Algorithm:
    """An algorithm acts at events: ``match(event, state)`` says whether it acts,
    ``apply(event, state, logger)`` acts.

    What it changes in the compiled step it declares, so the trainer can build the step:

    * ``changes_graph``: ``apply`` may change the model's structure (surgery) or a Python value
      the step graph freezes; such an algorithm sets ``state.structure_changed = True`` after
      surgery (the trainer then rebuilds its step and optimizer) and returns the frozen values
      from ``graph_key`` (the trainer keeps one compiled step per key).
    * ``loss_terms(state)``: Cells taking no input and returning a scalar, added to the loss
      inside the compiled step (the graph-mode form of acting after the loss).
    * ``wrap_loss(loss_net, state)``: the loss Cell the step differentiates in place of
      ``loss_net`` (the one built so far: a ``ModelLoss``, or what an earlier algorithm returned),
      for an algorithm that needs the model's inputs and outputs in its loss (distillation runs a
      teacher on them); the default returns ``loss_net``.
    * ``param_groups(state)``: optimizer groups ``{"params": [...], "lr": ..., ...}`` for its own
      trainable Parameters (they leave the default group).
    * ``runs_in_model_train``: it can run as a ``mindspore.train.Model.train`` callback
      (``AlgorithmCallback``), which compiles one graph for the whole run.

    ``state_dict()`` returns plain JSON-serialisable values (the trainer saves them with its
    checkpoints); ``load_state_dict`` takes them back. Tensors an algorithm owns outside the
    model are named by ``parameters()`` and saved with the model's.
    """

    changes_graph = False
    runs_in_model_train = True

    def match(self, event, state):
        raise NotImplementedError(f"{type(self).__name__} must implement match(event, state)")

    def apply(self, event, state, logger):
        raise NotImplementedError(f"{type(self).__name__} must implement apply(event, state, logger)")

    def graph_key(self, state):
        return None

    def loss_terms(self, state):
        return ()

    def wrap_loss(self, loss_net, state):
        return loss_net

    def param_groups(self, state):
        return ()

    def parameters(self):
        """Parameters this algorithm owns outside the model (saved in checkpoints)."""
        return ()

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        if state_dict:
            raise ValueError(f"{type(self).__name__} saves no state but was given {sorted(state_dict)}")

    @property
    def name(self):
        return type(self).__name__

    def __repr__(self):
        return f"{self.name}()"
