"""Structured pruning behind one call: ``ms_prune.prune(model, constraints, data, ...)`` (see
README.md beside this file)."""
from .prune import PruneReport, prune, score_units
from .scores import activation_scores, hidden_scores, layer_scores

__all__ = ["PruneReport", "activation_scores", "hidden_scores", "layer_scores", "prune", "score_units"]
