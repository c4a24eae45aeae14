"""How many tokens the random-LTD layers keep at each step, what training has consumed, and a
learning rate driven by consumed layer-tokens."""
import math
import numbers

__all__ = ["RandomLTDScheduler", "LayerTokenLR", "set_learning_rate"]


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class RandomLTDScheduler:
    """Kept length per step for random-LTD (``fixed_linear``, as DeepSpeed's scheduler).

    ``r(t) = min(max_value, v - v mod seq_per_step)`` with
    ``v = floor(t / require_steps * (max_value - min_value) + min_value)``, then clamped to at
    least ``min_value``: DeepSpeed's formula rounds below the minimum (to 0 with min 8, step 16)
    early in training, which would drop every token of the wrapped layers.

    ``total_layers`` and ``ltd_layers`` let :meth:`step` count consumed layer-tokens: every
    sequence costs ``seq_len`` tokens in each full layer and ``min(r, seq_len)`` in each random-LTD
    layer. That count drives :class:`LayerTokenLR` and is what the paper's savings are stated in.
    """

    schedule_types = ("fixed_linear",)

    def __init__(self, min_value, max_value, require_steps, seq_per_step=16, total_layers=1, ltd_layers=0,
                 schedule_type="fixed_linear"):
        self.min_value = _check_int("min_value", min_value, 1)
        self.max_value = _check_int("max_value", max_value, 1)
        if self.max_value < self.min_value:
            raise ValueError(f"max_value ({max_value}) must be >= min_value ({min_value})")
        self.require_steps = _check_int("require_steps", require_steps, 1)
        self.seq_per_step = _check_int("seq_per_step", seq_per_step, 1)
        self.total_layers = _check_int("total_layers", total_layers, 1)
        self.ltd_layers = _check_int("ltd_layers", ltd_layers, 0)
        if self.ltd_layers > self.total_layers:
            raise ValueError(f"ltd_layers ({ltd_layers}) cannot exceed total_layers ({total_layers})")
        if schedule_type not in self.schedule_types:
            raise ValueError(f"schedule_type must be one of {self.schedule_types}, got {schedule_type!r}")
        self.schedule_type = schedule_type
        self.current_step = 0
        self.consumed_layer_tokens = 0
        self.consumed_tokens = 0

    def kept_length(self, step=None):
        """Kept tokens per sequence at ``step`` (default: the current step)."""
        step = self.current_step if step is None else _check_int("step", step, 0)
        if step >= self.require_steps:
            return self.max_value
        value = math.floor(step / self.require_steps * (self.max_value - self.min_value) + self.min_value)
        value -= value % self.seq_per_step
        return max(self.min_value, min(self.max_value, value))

    def distinct_lengths(self, num_steps=None):
        """The kept lengths steps 0..num_steps-1 use (default: the whole schedule). With one
        batch shape this is the number of graphs random-LTD compiles: it bounds the compilations."""
        last = self.require_steps + 1 if num_steps is None else _check_int("num_steps", num_steps, 0)
        return sorted({self.kept_length(t) for t in range(last)})

    def layer_tokens(self, batch_size, seq_len, kept_length):
        full = self.total_layers - self.ltd_layers
        return batch_size * (full * seq_len + self.ltd_layers * min(kept_length, seq_len))

    def step(self, batch_size, seq_len=None):
        """Account for one training step of ``batch_size`` sequences and move to the next step.
        Returns the kept length that step used."""
        batch_size = _check_int("batch_size", batch_size, 1)
        seq_len = self.max_value if seq_len is None else _check_int("seq_len", seq_len, 1)
        kept = self.kept_length()
        self.consumed_layer_tokens += self.layer_tokens(batch_size, seq_len, kept)
        self.consumed_tokens += batch_size * seq_len
        self.current_step += 1
        return kept

    def planned_layer_tokens(self, num_steps, batch_size, seq_len=None):
        """Layer-tokens that steps current..current+num_steps-1 will consume (e.g. the total of a
        :class:`LayerTokenLR`), without moving the schedule."""
        seq_len = self.max_value if seq_len is None else _check_int("seq_len", seq_len, 1)
        start = self.current_step
        return sum(self.layer_tokens(batch_size, seq_len, self.kept_length(t))
                   for t in range(start, start + _check_int("num_steps", num_steps, 0)))

    def _config(self):
        return {k: getattr(self, k) for k in ("min_value", "max_value", "require_steps", "seq_per_step",
                                              "total_layers", "ltd_layers", "schedule_type")}

    def state_dict(self):
        state = self._config()
        state.update(current_step=self.current_step, consumed_layer_tokens=self.consumed_layer_tokens,
                     consumed_tokens=self.consumed_tokens)
        return state

    def load_state_dict(self, state):
        """Resume from :meth:`state_dict`; the schedule itself must be the same."""
        differing = {k: (state.get(k), v) for k, v in self._config().items() if state.get(k) != v}
        if differing:
            raise ValueError(f"cannot resume: the saved schedule differs in {differing} (saved, ours)")
        self.current_step = _check_int("current_step", state["current_step"], 0)
        self.consumed_layer_tokens = _check_int("consumed_layer_tokens", state["consumed_layer_tokens"], 0)
        self.consumed_tokens = _check_int("consumed_tokens", state.get("consumed_tokens", 0), 0)


class LayerTokenLR:
    """Learning rate as a function of consumed layer-tokens (random-LTD paper, Sec. 4): linear
    warm-up over ``warmup_layer_tokens``, then ``decay`` ('cosine' or 'linear') to ``min_lr`` at
    ``total_layer_tokens``, constant after. Token-based, so a run that drops tokens moves through
    its schedule more slowly per step than the baseline, and both end at the same layer-token
    budget's learning rate."""

    decays = ("cosine", "linear")

    def __init__(self, base_lr, total_layer_tokens, warmup_layer_tokens=0, min_lr=0.0, decay="cosine"):
        if not base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr!r}")
        if not 0 <= min_lr <= base_lr:
            raise ValueError(f"min_lr must be in [0, base_lr={base_lr}], got {min_lr!r}")
        self.total_layer_tokens = _check_int("total_layer_tokens", total_layer_tokens, 1)
        self.warmup_layer_tokens = _check_int("warmup_layer_tokens", warmup_layer_tokens, 0)
        if self.warmup_layer_tokens >= self.total_layer_tokens:
            raise ValueError(f"warmup_layer_tokens ({warmup_layer_tokens}) must be < total_layer_tokens "
                             f"({total_layer_tokens})")
        if decay not in self.decays:
            raise ValueError(f"decay must be one of {self.decays}, got {decay!r}")
        self.base_lr, self.min_lr, self.decay = float(base_lr), float(min_lr), decay

    def __call__(self, consumed_layer_tokens):
        tokens = consumed_layer_tokens
        if tokens < self.warmup_layer_tokens:
            return self.base_lr * (tokens + 1) / self.warmup_layer_tokens
        progress = min(1.0, (tokens - self.warmup_layer_tokens) / (self.total_layer_tokens - self.warmup_layer_tokens))
        if self.decay == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.base_lr - self.min_lr) * factor


_LR_WRITERS = {}


def set_learning_rate(optimizer, lr):
    """Make ``lr`` the learning rate of the next steps of a MindSpore optimizer built with one
    constant learning rate (a float), without recompiling the train step.

    The rate is a Parameter, but MindSpore 2.10 ``ms.jit`` graphs do not see a host-side
    ``set_data`` made after they compiled (they keep the old value); a write by another compiled
    graph (``ops.assign``) is seen, so the value goes through a tiny compiled writer.
    """
    import mindspore as ms
    from mindspore import Parameter, Tensor, ops
    current = getattr(optimizer, "learning_rate", None)
    if not isinstance(current, Parameter) or current.shape != ():
        raise TypeError(f"set_learning_rate needs an optimizer built with one constant learning rate "
                        f"(a float); {type(optimizer).__name__} has {type(current).__name__}")
    if not lr >= 0:
        raise ValueError(f"learning rate must be >= 0, got {lr!r}")
    entry = _LR_WRITERS.get(id(current))
    if entry is None or entry[0] is not current:
        def write(value):
            ops.assign(current, value)
            return value

        entry = _LR_WRITERS[id(current)] = (current, ms.jit(write))
    entry[1](Tensor(lr, ms.float32))
