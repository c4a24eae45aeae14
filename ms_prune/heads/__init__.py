"""LRP attention-head pruning: Hard-Concrete (L0) gates on heads, trained, then the closed heads
removed for real. See README.md in this folder."""
from .concrete_gate import CLOSED_THRESHOLD, ConcreteGate
from .lrp import (AbstractHeadPrunerLRP, HeadPrunerBertLRP, HeadPrunerGPTLRP, LRPLoss, LRPObjective, lrp_pruner, make_gated_train_step,
                  train_gated)

__all__ = ["CLOSED_THRESHOLD", "ConcreteGate", "AbstractHeadPrunerLRP", "HeadPrunerBertLRP", "HeadPrunerGPTLRP",
           "LRPLoss", "LRPObjective", "lrp_pruner", "make_gated_train_step", "train_gated"]
