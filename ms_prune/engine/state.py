"""What the engine and the algorithms share during a run."""
import uuid

import numpy as np

__all__ = ["State"]

COUNTERS = ("step", "epoch", "batch_in_epoch", "batches", "samples", "tokens")


def required(saved, *path):
    """``saved[path[0]][path[1]]...``, or a ValueError naming the dotted key a saved state lacks
    (a bare KeyError would not say which file or why)."""
    value = saved
    for depth, key in enumerate(path):
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"the saved state lacks the key {'.'.join(path[:depth + 1])!r}")
        value = value[key]
    return value


class State:
    """The model, the loss Cell, the optimizer, the counters, the current batch and the algorithms.

    * ``loss_net``: the Cell the trainer differentiates (``loss_net(*batch) -> scalar``), built
      around ``model``; algorithms that need a loss (GradNAS scoring) call it.
    * counters: ``step`` (optimizer updates done), ``epoch``, ``batch_in_epoch`` and ``batches``
      (batches taken: with gradient accumulation, several per step), ``samples``, ``tokens``.
    * ``run_id``: names the run; its checkpoints carry it, so a run rotates only its own, and a
      resumed run takes the checkpoint's.
    * ``rng``: the run's numpy Generator. Algorithms draw their per-step noise from it on the
      host and write it into their Parameters at BATCH_START, so a run is reproducible and a
      resumed run draws what the uninterrupted run drew (MindSpore's in-graph random kernels
      keep their state inside the kernel on CPU and GPU, where it cannot be saved).
    * ``structure_changed``: set by an algorithm after surgery; the trainer rebuilds its
      compiled step and optimizer before the next step, and clears it.
    """

    def __init__(self, model, algorithms=(), max_steps=None, seed=0):
        self.model = model
        self.algorithms = list(algorithms)
        self.max_steps = max_steps
        self.loss_net = None
        self.optimizer = None
        self.batch = None
        self.loss = None
        self.metrics = {}
        self.structure_changed = False
        self.step = self.epoch = self.batch_in_epoch = self.batches = self.samples = self.tokens = 0
        self.seed = seed
        self.run_id = uuid.uuid4().hex
        self.rng = np.random.default_rng(seed)

    def counters(self):
        return {name: getattr(self, name) for name in COUNTERS}

    def state_dict(self):
        return {"counters": self.counters(), "rng": self.rng.bit_generator.state, "seed": self.seed,
                "run_id": self.run_id}

    def load_state_dict(self, saved):
        """Take back :meth:`state_dict`; a missing key is a ValueError naming it."""
        counters = {name: int(required(saved, "counters", name)) for name in COUNTERS}
        rng, rng_state = np.random.default_rng(), required(saved, "rng")
        try:
            rng.bit_generator.state = rng_state
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"the saved state's 'rng' is not a numpy generator state ({error})") from None
        for name, value in counters.items():
            setattr(self, name, value)
        self.rng = rng
        self.seed = required(saved, "seed")
        self.run_id = str(required(saved, "run_id"))

    def algorithm(self, cls):
        """The first algorithm of class ``cls`` in this run, or None."""
        return next((a for a in self.algorithms if isinstance(a, cls)), None)
