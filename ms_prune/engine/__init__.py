"""The algorithm engine: every algorithm has one shape (``Algorithm``: ``match``/``apply`` at
``Event``s over a shared ``State``), and runs the same way under the graph-mode ``Trainer`` or
inside ``mindspore.train.Model.train`` (``AlgorithmCallback``). See README.md."""
from .algorithm import Algorithm
from .callback import AlgorithmCallback
from .engine import Engine
from .event import Event
from .state import State
from .trainer import Trainer

__all__ = ["Event", "State", "Algorithm", "Engine", "Trainer", "AlgorithmCallback"]
