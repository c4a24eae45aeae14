"""Progressive layer dropping (Zhang & He 2020, arXiv 2010.13369) with layers that are really
skipped.

Schedule: theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar, starting at 1.0 (nothing
dropped). Layer l of L (1-based, as in the paper) is kept with p_l = 1 - (l / L) * (1 - theta(t)),
so the first layer can be dropped too and the last is kept with probability theta(t).

A pre-LN layer computes x + delta(x). In training its wrapper draws one keep decision per step
(the whole batch takes the same sub-network, as in the paper): kept -> x + delta(x) / p_l (so the
output is unbiased: E = x + delta(x)), dropped -> x. The decision is a tensor and the branch is a
data-dependent ``if``: in GRAPH_MODE MindSpore compiles it to control flow, so a dropped layer's
kernels (and their backward) do not run at all. In evaluation every layer runs, unscaled.

theta lives in one non-trainable Parameter shared by the wrappers and written in place
(``ops.assign``) between steps, so a changing theta never recompiles the graph.
"""
import math
import numbers

import mindspore as ms
from mindspore import Parameter, Tensor, ops
from mindspore.train import Callback

from ms_prune.models.modeling_utils import LayerWrapper

__all__ = ["ProgressiveLayerDrop", "PLDLayer", "convert_to_pld", "remove_pld", "pld_layers",
           "pld_theta", "keep_probabilities", "expected_layers_run"]


def _check_theta(value, what="theta"):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number in (0, 1], got {value!r} ({type(value).__name__})")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{what} must be in (0, 1] (the keep probability of the last layer; 0 would "
                         f"always drop it), got {value!r}")
    return float(value)


def _check_gamma(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"gamma must be a non-negative number, got {value!r} ({type(value).__name__})")
    if not (float(value) >= 0.0 and math.isfinite(float(value))):
        raise ValueError(f"gamma must be a finite number >= 0 (the decay rate of theta per step), got {value!r}")
    return float(value)


def _check_step(global_step):
    if isinstance(global_step, bool) or not isinstance(global_step, numbers.Integral) or global_step < 0:
        raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
    return int(global_step)


def pld_theta(global_step, theta=0.5, gamma=0.001):
    """theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar."""
    theta, gamma, step = _check_theta(theta), _check_gamma(gamma), _check_step(global_step)
    return (1.0 - theta) * math.exp(-gamma * step) + theta


def keep_probabilities(theta, num_layers):
    """[p_1, ..., p_L] with p_l = 1 - (l / L) * (1 - theta), l 1-based."""
    theta = _check_theta(theta)
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    return [1.0 - (l / num_layers) * (1.0 - theta) for l in range(1, num_layers + 1)]


def expected_layers_run(theta, num_layers):
    """E[number of layers run in one training step] = sum of the keep probabilities."""
    return float(sum(keep_probabilities(theta, num_layers)))


class ProgressiveLayerDrop(Callback):
    """The PLD schedule (DeepSpeed's API): ``get_state()``, ``get_theta()``, ``update_state(step)``.

    ``theta`` is theta_bar, the value theta(t) decays to; ``gamma`` the decay rate per step.
    theta(t) starts at 1.0. Models converted with this schedule (``convert_to_pld``) read it from
    ``theta_parameter``; ``update_state`` writes it there. As a MindSpore ``Callback`` it updates
    itself at ``on_train_step_begin`` when passed to ``Model.train``.
    """

    def __init__(self, theta=0.5, gamma=0.001):
        super().__init__()
        self.theta_bar = _check_theta(theta)
        self.gamma = _check_gamma(gamma)
        self.global_step = 0
        self.current_theta = 1.0
        self.theta_parameter = Parameter(Tensor(1.0, ms.float32), name="pld_theta", requires_grad=False)

    def get_theta(self):
        return self.current_theta

    def get_state(self):
        return {"progressive_layer_drop": True, "pld_theta": self.get_theta()}

    def update_state(self, global_step):
        """Move theta to theta(global_step); takes effect at the next training step."""
        self.global_step = _check_step(global_step)
        self._write(pld_theta(self.global_step, self.theta_bar, self.gamma))

    def set_theta(self, theta):
        """Pin theta (e.g. a fixed 0.5 in a speed benchmark); the next ``update_state`` overrides it."""
        self._write(_check_theta(theta))

    def _write(self, theta):
        self.current_theta = float(theta)
        # In place, not set_data: a graph compiled by ms.jit (make_train_step) keeps reading the
        # memory it was compiled with, and set_data swaps it (the new theta would never be seen).
        ops.assign(self.theta_parameter, Tensor(self.current_theta, ms.float32))

    def state_dict(self):
        return {"theta_bar": self.theta_bar, "gamma": self.gamma, "global_step": self.global_step,
                "theta": self.current_theta}

    def load_state_dict(self, state):
        missing = {"theta_bar", "gamma", "global_step", "theta"} - set(state)
        if missing:
            raise ValueError(f"ProgressiveLayerDrop state lacks {sorted(missing)}")
        self.theta_bar, self.gamma = _check_theta(state["theta_bar"]), _check_gamma(state["gamma"])
        self.global_step = _check_step(state["global_step"])
        self._write(_check_theta(state["theta"], "state['theta']"))

    def on_train_step_begin(self, run_context):
        # cur_step_num counts from 1 at the first step; the schedule counts steps done, from 0.
        self.update_state(max(int(run_context.original_args().cur_step_num) - 1, 0))

    def __repr__(self):
        return (f"ProgressiveLayerDrop(theta={self.theta_bar}, gamma={self.gamma}, "
                f"step={self.global_step}, current_theta={self.current_theta:.4f})")


class PLDLayer(LayerWrapper):
    """Wraps a pre-LN transformer layer ``(hidden, attention_bias) -> (hidden, penalty)``.

    ``index`` is the 1-based position l of the layer among ``num_layers``; ``theta`` the shared
    theta Parameter (``ProgressiveLayerDrop.theta_parameter``). ``seed`` seeds this layer's
    keep draws (with ``index`` as second seed): workers of a data-parallel job given the same seed
    draw the same decisions, so every worker trains the same sub-network in a step.
    ``count_runs=True`` adds a counter (``runs``) incremented only inside the kept branch, to
    show which branch really executed.

    Parameter names (and Hugging Face checkpoints) stay those of the unwrapped model
    (``LayerWrapper``); theta and the counter are likewise not parameters of the model (the
    schedule's ``state_dict`` carries theta).
    """

    def __init__(self, layer, index, num_layers, theta, seed=0, count_runs=False):
        super().__init__(layer)
        for name, value in (("index", index), ("num_layers", num_layers), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"PLDLayer {name} must be an int, got {value!r}")
        if not 1 <= index <= num_layers:
            raise ValueError(f"PLDLayer index is 1-based: it must be in 1..{num_layers}, got {index}")
        if seed < 0:
            raise ValueError(f"PLDLayer seed must be >= 0, got {seed}")
        if not isinstance(theta, Parameter):
            raise TypeError("PLDLayer theta must be the shared theta Parameter "
                            f"(ProgressiveLayerDrop.theta_parameter), got {type(theta).__name__}")
        object.__setattr__(self, "pld_theta", theta)
        self.index, self.num_layers, self.count_runs = int(index), int(num_layers), bool(count_runs)
        self.depth_fraction = float(index) / float(num_layers)
        # seed2 = index gives each layer its own stream; seed2 > 0 makes it deterministic.
        self.uniform = ops.UniformReal(seed=int(seed), seed2=int(index))
        object.__setattr__(self, "runs", Parameter(Tensor(0, ms.int32), name=f"pld_runs_{index}",
                                                   requires_grad=False))

    def keep_probability(self):
        return 1.0 - self.depth_fraction * (1.0 - self.pld_theta)

    def construct(self, hidden_states, attention_bias):
        if not self.training:
            return self.layer(hidden_states, attention_bias)
        keep = self.keep_probability()
        if self.uniform((1,))[0] < keep:
            output, penalty = self.layer(hidden_states, attention_bias)
            if self.count_runs:
                ops.assign_add(self.runs, ops.ones((), ms.int32))
            return hidden_states + (output - hidden_states) / keep, penalty
        return hidden_states, ops.zeros((), ms.float32)


def _check_switchable(model):
    from ms_prune.models.bert import BertPreTrainedCell
    from ms_prune.models.gpt2 import GPT2PreTrainedCell
    if isinstance(model, BertPreTrainedCell):
        if not model.config.pre_layer_norm:
            raise ValueError(
                "convert_to_pld: this BERT is post-LN (BertConfig.pre_layer_norm=False): its layers "
                "compute LN(x + f(x)), so skipping one does not leave x and changes the function. "
                "Progressive layer dropping needs the pre-LN layout; build it with "
                "BertConfig(pre_layer_norm=True) (and pretrain it that way).")
        return
    if isinstance(model, GPT2PreTrainedCell):
        return  # GPT-2 blocks are pre-LN: x + attn(ln_1(x)), then + mlp(ln_2(.))
    raise TypeError(f"convert_to_pld handles ms_prune BERT (pre-LN) and GPT-2 models, got {type(model).__name__}")


def pld_layers(model):
    """The PLDLayer wrappers of a converted model, in order (empty when not converted)."""
    return [layer for layer in model.transformer_layers() if isinstance(layer, PLDLayer)]


def convert_to_pld(model, pld=None, seed=0, count_runs=False):
    """Wrap every transformer layer of a pre-LN ms_prune BERT or GPT-2 for progressive layer dropping.

    ``pld``: the ``ProgressiveLayerDrop`` schedule whose theta the layers read (a new default one
    when None); several models may share one. Returns the schedule: call its ``update_state(step)``
    before each step (or pass it to ``Model.train`` as a callback). Build loss / train-step Cells after
    converting (their graphs are cached). Raises ValueError for post-LN BERT or an already
    converted model, TypeError for other models.
    """
    _check_switchable(model)
    if pld is None:
        pld = ProgressiveLayerDrop()
    if not isinstance(pld, ProgressiveLayerDrop):
        raise TypeError(f"convert_to_pld: pld must be a ProgressiveLayerDrop, got {type(pld).__name__}")
    layers = model.transformer_layers()
    if pld_layers(model):
        raise ValueError("convert_to_pld: the model is already converted (call remove_pld first)")
    total = len(layers)
    for i in range(total):
        layers[i] = PLDLayer(layers[i], i + 1, total, pld.theta_parameter, seed=seed, count_runs=count_runs)
    model.refresh_after_surgery()
    return pld


def remove_pld(model):
    """Put the original layers back (parameters are shared, so training is kept)."""
    layers = model.transformer_layers()
    for i in range(len(layers)):
        if isinstance(layers[i], PLDLayer):
            layers[i] = layers[i].layer
    model.refresh_after_surgery()
    return model
