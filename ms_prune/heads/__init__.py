"""LRP attention-head pruning: Hard-Concrete (L0) gates on heads, trained, then the dropped heads
removed for real. ``LRP`` is the engine algorithm, ``apply_lrp`` / ``prune_lrp`` /
``remove_lrp`` its functional form; ``AbstractHeadPrunerLRP`` does copy -> train (through the
engine: ``pruner.algorithm(gated)``) -> prune for one architecture; see README.md.

The pruner API of earlier releases (``HeadPrunerBertLRP``, ``HeadPrunerGPTLRP``, ``train_gated``,
``make_gated_train_step``, ``ConcreteGate``, ...) stays importable from here."""
from .algorithm import LRP, apply_lrp, prune_lrp, remove_lrp
from .concrete_gate import CLOSED_THRESHOLD, ConcreteGate
from .lrp import (AbstractHeadPrunerLRP, HeadPrunerBertLRP, HeadPrunerGPTLRP, LRPLoss, LRPObjective, decide_heads,
                  lrp_pruner, make_gated_train_step, train_gated, write_lrp_decision)

__all__ = ["LRP", "apply_lrp", "prune_lrp", "remove_lrp", "AbstractHeadPrunerLRP"]
