"""LRP attention-head pruning: Hard-Concrete (L0) gates on heads, trained, then the closed heads
removed for real. ``LRP`` is the engine algorithm, ``apply_lrp`` / ``prune_lrp`` /
``remove_lrp`` its functional form; see README.md.

The pruner API of earlier releases (``AbstractHeadPrunerLRP``, ``HeadPrunerBertLRP``,
``HeadPrunerGPTLRP``, ``train_gated``, ``ConcreteGate``, ...) stays importable from here."""
from .algorithm import LRP, apply_lrp, prune_lrp, remove_lrp
from .concrete_gate import CLOSED_THRESHOLD, ConcreteGate
from .lrp import (AbstractHeadPrunerLRP, HeadPrunerBertLRP, HeadPrunerGPTLRP, LRPLoss, LRPObjective, lrp_pruner,
                  make_gated_train_step, train_gated)

__all__ = ["LRP", "apply_lrp", "prune_lrp"]
