"""How many tokens the random-LTD layers keep at each step, what training has consumed, and a
learning rate driven by consumed layer-tokens."""
import math

from mindspore import Parameter

from ms_prune.training import write_parameter
from ms_prune.validation import check_choice, check_int, check_number

__all__ = ["RandomLTDScheduler", "LayerTokenLR", "set_learning_rate"]


def check_schedule(owner, min_value, max_value, require_steps, seq_per_step):
    """The kept-length schedule's arguments, checked on behalf of ``owner`` (the scheduler, or the
    algorithm the user built); returns them as ints."""
    min_value = check_int(owner, "min_value", min_value, minimum=1)
    max_value = check_int(owner, "max_value", max_value, minimum=1)
    if max_value < min_value:
        raise ValueError(f"{owner}: max_value ({max_value}) must be >= min_value ({min_value})")
    return (min_value, max_value, check_int(owner, "require_steps", require_steps, minimum=1),
            check_int(owner, "seq_per_step", seq_per_step, minimum=1))


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
        owner = "RandomLTDScheduler"
        self.min_value, self.max_value, self.require_steps, self.seq_per_step = check_schedule(
            owner, min_value, max_value, require_steps, seq_per_step)
        self.total_layers = check_int(owner, "total_layers", total_layers, minimum=1)
        self.ltd_layers = check_int(owner, "ltd_layers", ltd_layers, minimum=0)
        if self.ltd_layers > self.total_layers:
            raise ValueError(f"{owner}: ltd_layers ({ltd_layers}) cannot exceed total_layers ({total_layers})")
        self.schedule_type = check_choice(owner, "schedule_type", schedule_type, self.schedule_types)
        self.current_step = 0
        self.consumed_layer_tokens = 0
        self.consumed_tokens = 0

    def kept_length(self, step=None):
        """Kept tokens per sequence at ``step`` (default: the current step)."""
        step = self.current_step if step is None else check_int("RandomLTDScheduler.kept_length", "step", step, minimum=0)
        if step >= self.require_steps:
            return self.max_value
        value = math.floor(step / self.require_steps * (self.max_value - self.min_value) + self.min_value)
        value -= value % self.seq_per_step
        return max(self.min_value, min(self.max_value, value))

    def distinct_lengths(self, num_steps=None):
        """The kept lengths steps 0..num_steps-1 use (default: the whole schedule). With one
        batch shape this is the number of graphs random-LTD compiles: it bounds the compilations."""
        last = self.require_steps + 1 if num_steps is None else check_int("RandomLTDScheduler.distinct_lengths", "num_steps", num_steps, minimum=0)
        return sorted({self.kept_length(t) for t in range(last)})

    def layer_tokens(self, batch_size, seq_len, kept_length):
        full = self.total_layers - self.ltd_layers
        return batch_size * (full * seq_len + self.ltd_layers * min(kept_length, seq_len))

    def step(self, batch_size, seq_len=None):
        """Account for one training step of ``batch_size`` sequences and move to the next step.
        Returns the kept length that step used."""
        batch_size = check_int("RandomLTDScheduler.step", "batch_size", batch_size, minimum=1)
        seq_len = self.max_value if seq_len is None else check_int("RandomLTDScheduler.step", "seq_len", seq_len,
                                                                   minimum=1)
        kept = self.kept_length()
        self.consumed_layer_tokens += self.layer_tokens(batch_size, seq_len, kept)
        self.consumed_tokens += batch_size * seq_len
        self.current_step += 1
        return kept

    def planned_layer_tokens(self, num_steps, batch_size, seq_len=None):
        """Layer-tokens that steps current..current+num_steps-1 will consume (e.g. the total of a
        :class:`LayerTokenLR`), without moving the schedule."""
        owner = "RandomLTDScheduler.planned_layer_tokens"
        seq_len = self.max_value if seq_len is None else check_int(owner, "seq_len", seq_len, minimum=1)
        start = self.current_step
        return sum(self.layer_tokens(batch_size, seq_len, self.kept_length(t))
                   for t in range(start, start + check_int(owner, "num_steps", num_steps, minimum=0)))

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
            raise ValueError(f"RandomLTDScheduler.load_state_dict: cannot resume: the saved schedule differs in "
                             f"{differing} (saved, ours)")
        owner = "RandomLTDScheduler.load_state_dict"
        self.current_step = check_int(owner, "current_step", state["current_step"], minimum=0)
        self.consumed_layer_tokens = check_int(owner, "consumed_layer_tokens", state["consumed_layer_tokens"],
                                               minimum=0)
        self.consumed_tokens = check_int(owner, "consumed_tokens", state.get("consumed_tokens", 0), minimum=0)


class LayerTokenLR:
    """Learning rate as a function of consumed layer-tokens (random-LTD paper, Sec. 4): linear
    warm-up over ``warmup_layer_tokens``, then ``decay`` ('cosine' or 'linear') to ``min_lr`` at
    ``total_layer_tokens``, constant after. Token-based, so a run that drops tokens moves through
    its schedule more slowly per step than the baseline, and both end at the same layer-token
    budget's learning rate."""

    decays = ("cosine", "linear")

    def __init__(self, base_lr, total_layer_tokens, warmup_layer_tokens=0, min_lr=0.0, decay="cosine"):
        owner = "LayerTokenLR"
        self.base_lr = check_number(owner, "base_lr", base_lr, minimum=0.0, min_open=True)
        self.min_lr = check_number(owner, "min_lr", min_lr, minimum=0.0, maximum=self.base_lr)
        self.total_layer_tokens = check_int(owner, "total_layer_tokens", total_layer_tokens, minimum=1)
        self.warmup_layer_tokens = check_int(owner, "warmup_layer_tokens", warmup_layer_tokens, minimum=0)
        if self.warmup_layer_tokens >= self.total_layer_tokens:
            raise ValueError(f"{owner}: warmup_layer_tokens ({warmup_layer_tokens}) must be < total_layer_tokens "
                             f"({total_layer_tokens})")
        self.decay = check_choice(owner, "decay", decay, self.decays)

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


def set_learning_rate(optimizer, lr):
    """Make ``lr`` the learning rate of the next steps of a MindSpore optimizer built with one
    constant learning rate (a float), without recompiling the train step (``write_parameter``:
    in place, so a step compiled with ``ms.jit`` sees it too)."""
    current = getattr(optimizer, "learning_rate", None)
    if not isinstance(current, Parameter) or current.shape != ():
        raise TypeError(f"set_learning_rate needs an optimizer built with one constant learning rate "
                        f"(a float); {type(optimizer).__name__} has {type(current).__name__}")
    write_parameter(current, check_number("set_learning_rate", "lr", lr, minimum=0.0))
