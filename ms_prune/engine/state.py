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
    * data parallel (``mindspore.communication.init()`` done, e.g. under ``msrun``): ``rank`` and
      ``world_size`` (1 without it); ``batch`` is this worker's contiguous share of
      ``global_batch`` (rows ``[rank * B / world_size, (rank + 1) * B / world_size)`` of every
      array). The counters count the global batch. Noise with one value per row must be drawn for
      the global batch and cut with :meth:`worker_rows`, so that every worker draws the same
      numbers and keeps the rows a single-process run would.
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
        self.rank, self.world_size = 0, 1
        self.global_batch = None

    def global_rows(self, rows):
        """The global batch's row count for a share of ``rows`` rows."""
        return int(rows) * self.world_size

    def worker_rows(self, array):
        """This worker's contiguous share (along axis 0) of ``array``, a global-batch array: the
        array itself without data parallelism."""
        if self.world_size == 1:
            return array
        share = array.shape[0] // self.world_size
        return array[self.rank * share:(self.rank + 1) * share]

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
