"""The algorithm engine: every algorithm has one shape (``Algorithm``: ``match``/``apply`` at
``Event``s over a shared ``State``), and runs the same way under the graph-mode ``Trainer`` or
inside ``mindspore.train.Model.train`` (``AlgorithmCallback``); ``ModelLoss`` (a loss Cell over a
model with several inputs), ``LMLoss`` and ``lm_cross_entropy`` (next-token loss) are the loss
helpers the Trainer, GradNAS and ``Model.train`` take. See README.md."""
from .algorithm import Algorithm, Applied
from .callback import AlgorithmCallback
from .engine import Engine
from .event import Event
from .state import State
from .trainer import ModelLoss, Trainer
from ..training import LMLoss, lm_cross_entropy

__all__ = ["Event", "State", "Algorithm", "Applied", "Engine", "Trainer", "AlgorithmCallback", "ModelLoss", "LMLoss",
           "lm_cross_entropy"]
