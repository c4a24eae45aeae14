"""What the engine and the algorithms share during a run."""
import numpy as np

__all__ = ["State"]

COUNTERS = ("step", "epoch", "batch_in_epoch", "samples", "tokens")


class State:
    """The model, the loss Cell, the optimizer, the counters, the current batch and the algorithms.

    * ``loss_net``: the Cell the trainer differentiates (``loss_net(*batch) -> scalar``), built
      around ``model``; algorithms that need a loss (GradNAS scoring) call it.
    * counters: ``step`` (steps done), ``epoch``, ``batch_in_epoch``, ``samples``, ``tokens``.
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
        self.step = self.epoch = self.batch_in_epoch = self.samples = self.tokens = 0
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def counters(self):
        return {name: getattr(self, name) for name in COUNTERS}

    def state_dict(self):
        return {"counters": self.counters(), "rng": self.rng.bit_generator.state, "seed": self.seed}

    def load_state_dict(self, saved):
        for name in COUNTERS:
            setattr(self, name, int(saved["counters"][name]))
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = saved["rng"]
        self.seed = saved["seed"]

    def algorithm(self, cls):
        """The first algorithm of class ``cls`` in this run, or None."""
        return next((a for a in self.algorithms if isinstance(a, cls)), None)
