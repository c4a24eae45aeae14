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
(``write_parameter``) between steps, so a changing theta never recompiles the graph.

Composer form: :func:`apply_progressive_layer_drop` / :func:`remove_progressive_layer_drop` and the
:class:`ProgressiveLayerDropping` algorithm, which draws the keep decisions on the host from the
run's saved RNG (resumable); the functional form draws them in the graph by default.
"""
import math

import mindspore as ms
from mindspore import Parameter, Tensor, ops
from mindspore.train import Callback

from ms_prune import protocol
from ms_prune.engine import Algorithm, Applied, Event
from ms_prune.protocol import LayerCall, LayerWrapper, call_argument
from ms_prune.training import write_parameter
from ms_prune.validation import check_bool, check_instance, check_int, check_number

# The Composer form; the older names below stay importable from this module and the package.
__all__ = ["ProgressiveLayerDropping", "apply_progressive_layer_drop", "remove_progressive_layer_drop"]


def _check_theta(owner, value, name="theta"):
    # 0 is excluded: theta is the keep probability of the last layer, which would then always drop.
    return check_number(owner, name, value, minimum=0.0, maximum=1.0, min_open=True)


def _check_gamma(owner, value):
    return check_number(owner, "gamma", value, minimum=0.0)


def pld_theta(global_step, theta=0.5, gamma=0.001):
    """theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar."""
    owner = "pld_theta"
    theta, gamma = _check_theta(owner, theta), _check_gamma(owner, gamma)
    step = check_int(owner, "global_step", global_step, minimum=0)
    return (1.0 - theta) * math.exp(-gamma * step) + theta


def keep_probabilities(theta, num_layers):
    """[p_1, ..., p_L] with p_l = 1 - (l / L) * (1 - theta), l 1-based."""
    theta = _check_theta("keep_probabilities", theta)
    check_int("keep_probabilities", "num_layers", num_layers, minimum=1)
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
        self.theta_bar = _check_theta("ProgressiveLayerDrop", theta)
        self.gamma = _check_gamma("ProgressiveLayerDrop", gamma)
        self.global_step = 0
        self.current_theta = 1.0
        self.theta_parameter = Parameter(Tensor(1.0, ms.float32), name="pld_theta", requires_grad=False)

    def get_theta(self):
        return self.current_theta

    def get_state(self):
        return {"progressive_layer_drop": True, "pld_theta": self.get_theta()}

    def update_state(self, global_step):
        """Move theta to theta(global_step); takes effect at the next training step."""
        self.global_step = check_int("ProgressiveLayerDrop.update_state", "global_step", global_step, minimum=0)
        self._write(pld_theta(self.global_step, self.theta_bar, self.gamma))

    def set_theta(self, theta):
        """Pin theta (e.g. a fixed 0.5 in a speed benchmark); the next ``update_state`` overrides it."""
        self._write(_check_theta("ProgressiveLayerDrop.set_theta", theta))

    def _write(self, theta):
        self.current_theta = float(theta)
        write_parameter(self.theta_parameter, self.current_theta)

    def state_dict(self):
        return {"theta_bar": self.theta_bar, "gamma": self.gamma, "global_step": self.global_step,
                "theta": self.current_theta}

    def load_state_dict(self, state):
        missing = {"theta_bar", "gamma", "global_step", "theta"} - set(state)
        if missing:
            raise ValueError(f"ProgressiveLayerDrop state lacks {sorted(missing)}")
        owner = "ProgressiveLayerDrop.load_state_dict"
        self.theta_bar = _check_theta(owner, state["theta_bar"], "state['theta_bar']")
        self.gamma = _check_gamma(owner, state["gamma"])
        self.global_step = check_int(owner, "state['global_step']", state["global_step"], minimum=0)
        self._write(_check_theta(owner, state["theta"], "state['theta']"))

    def on_train_step_begin(self, run_context):
        # cur_step_num counts from 1 at the first step; the schedule counts steps done, from 0.
        self.update_state(max(int(run_context.original_args().cur_step_num) - 1, 0))

    def __repr__(self):
        return (f"ProgressiveLayerDrop(theta={self.theta_bar}, gamma={self.gamma}, "
                f"step={self.global_step}, current_theta={self.current_theta:.4f})")


class PLDLayer(LayerWrapper):
    """Wraps a pre-LN transformer layer (``x -> x + f(x)``) called as ``call`` (an
    ``ms_prune.protocol.LayerCall``; default ``layer(hidden, ...) -> hidden``); every argument is
    passed through. A layer that returns a tuple (hidden states first) returns, when dropped, its
    input and zeros (scalars) for the rest.

    ``index`` is the 1-based position l of the layer among ``num_layers``; ``theta`` the shared
    theta Parameter (``ProgressiveLayerDrop.theta_parameter``).

    Where the keep draw comes from (frozen at compile time):

    * ``noise=None`` (default): drawn in the graph by ``ops.UniformReal`` seeded by ``seed`` and
      ``index``: workers of a data-parallel job given the same seed draw the same decisions, so every
      worker trains the same sub-network in a step. Needs nobody outside the step, but the kernel
      keeps its state where a checkpoint cannot reach it (a resumed run draws other decisions).
    * ``noise``: a shared (num_layers,) float32 Parameter of uniforms written on the host before
      each step (``ProgressiveLayerDropping`` writes it from the run's saved RNG): the layer is kept
      when ``noise[index - 1] < p_l``. Resumable, and alike on workers seeded alike.

    ``count_runs=True`` adds a counter (``runs``) incremented only inside the kept branch, to show
    which branch really executed. Parameter names (and Hugging Face checkpoints) stay those of the
    unwrapped model (``LayerWrapper``); theta, the noise and the counter are held unregistered, so
    they are not parameters of the model (the schedule's ``state_dict`` carries theta).
    """

    def __init__(self, layer, index, num_layers, theta, seed=0, count_runs=False, noise=None, call=None):
        super().__init__(layer)
        owner = "PLDLayer"
        call = check_instance(owner, "call", call, LayerCall, allow_none=True) or LayerCall()
        self.hidden_key, self.extra_outputs = call.hidden, (call.outputs - 1 if call.outputs else None)
        num_layers = check_int(owner, "num_layers", num_layers, minimum=1)
        index = check_int(owner, "index (1-based)", index, minimum=1, maximum=num_layers)
        seed = check_int(owner, "seed", seed, minimum=0)
        check_instance(owner, "theta (the shared theta Parameter, ProgressiveLayerDrop.theta_parameter)",
                       theta, Parameter)
        check_instance(owner, "noise (a shared (num_layers,) Parameter)", noise, Parameter, allow_none=True)
        if noise is not None and tuple(noise.shape) != (num_layers,):
            raise ValueError(f"{owner}: noise must have shape ({num_layers},) (one uniform per layer), "
                             f"got {tuple(noise.shape)}")
        object.__setattr__(self, "pld_theta", theta)
        object.__setattr__(self, "pld_noise", noise)
        self.host_noise = noise is not None
        self.index, self.num_layers, self.count_runs = index, num_layers, check_bool(owner, "count_runs", count_runs)
        self.depth_fraction = float(index) / float(num_layers)
        # seed2 = index gives each layer its own stream; seed2 > 0 makes it deterministic.
        self.uniform = ops.UniformReal(seed=seed, seed2=index)
        object.__setattr__(self, "runs", Parameter(Tensor(0, ms.int32), name=f"pld_runs_{index}",
                                                   requires_grad=False))

    def keep_probability(self):
        return 1.0 - self.depth_fraction * (1.0 - self.pld_theta)

    def construct(self, *args, **kwargs):
        if not self.training:
            return self.layer(*args, **kwargs)
        hidden_states = call_argument(args, kwargs, self.hidden_key)
        keep = self.keep_probability()
        if self.host_noise:
            draw = self.pld_noise[self.index - 1]
        else:
            draw = self.uniform((1,))[0]
        if draw < keep:
            outputs = self.layer(*args, **kwargs)
            if self.count_runs:
                ops.assign_add(self.runs, ops.ones((), ms.int32))
            if self.extra_outputs is None:
                return hidden_states + (outputs - hidden_states) / keep
            return (hidden_states + (outputs[0] - hidden_states) / keep,) + tuple(outputs[1:])
        if self.extra_outputs is None:
            return hidden_states
        return (hidden_states,) + tuple(ops.zeros((), ms.float32) for _ in range(self.extra_outputs))


def _check_switchable(model):
    model_adapter = protocol.adapter(model)
    if not model_adapter.skippable_layers:
        raise ValueError(
            f"convert_to_pld: the layers of {type(model).__name__} are not declared skippable (its protocol "
            f"adapter's skippable_layers is False): progressive layer dropping needs pre-LN layers, x + f(x), so "
            f"that skipping one leaves x. A post-LN layer (LN(x + f(x)), e.g. BertConfig(pre_layer_norm=False)) "
            f"changes the function when skipped; build the model pre-LN (BertConfig(pre_layer_norm=True)) and "
            f"pretrain it that way, or declare skippable_layers = True in the adapter if its layers are pre-LN.")
    return model_adapter


def pld_layers(model):
    """The PLDLayer wrappers of a converted model, in order (empty when not converted)."""
    layers = protocol.adapter(model).layers()
    return [layer for layer in layers if isinstance(layer, PLDLayer)]


def convert_to_pld(model, pld=None, seed=0, count_runs=False, host_noise=False):
    """Wrap every transformer layer of a model with skippable (pre-LN) layers for progressive layer dropping.

    ``pld``: the ``ProgressiveLayerDrop`` schedule whose theta the layers read (a new default one
    when None); several models may share one. Returns the schedule: call its ``update_state(step)``
    before each step (or pass it to ``Model.train`` as a callback). ``host_noise=True``: the layers
    read their keep draws from a shared Parameter (``pld_noise(model)``) that the caller must write
    with one uniform per layer before every training step (see :class:`PLDLayer`). Build loss /
    train-step Cells after converting (their graphs are cached). Raises ValueError for a model whose
    layers are not skippable (post-LN BERT) or an already converted one, TypeError for a model that
    does not declare the model protocol.
    """
    model_adapter = _check_switchable(model)
    if pld is None:
        pld = ProgressiveLayerDrop()
    check_instance("convert_to_pld", "pld", pld, ProgressiveLayerDrop)
    check_bool("convert_to_pld", "host_noise", host_noise)
    layers = model_adapter.layers()
    if pld_layers(model):
        raise ValueError("convert_to_pld: the model is already converted (call remove_pld first)")
    total = len(layers)
    noise = Parameter(ops.zeros((total,), ms.float32), name="pld_noise", requires_grad=False) if host_noise else None
    for i in range(total):
        layers[i] = PLDLayer(layers[i], i + 1, total, pld.theta_parameter, seed=seed, count_runs=count_runs,
                             noise=noise, call=model_adapter.layer_call)
    protocol.refresh(model)
    return pld


def pld_noise(model):
    """The shared keep-draw Parameter of a model converted with ``host_noise=True`` (else None)."""
    layers = pld_layers(model)
    return layers[0].pld_noise if layers else None


def remove_pld(model):
    """Put the original layers back (parameters are shared, so training is kept)."""
    layers = protocol.adapter(model).layers()
    for i in range(len(layers)):
        if isinstance(layers[i], PLDLayer):
            layers[i] = layers[i].layer
    protocol.refresh(model)
    return model


# --------------------------------------------------------------------------------------------
# The Composer form: functional twin and the algorithm
# --------------------------------------------------------------------------------------------
def apply_progressive_layer_drop(model, theta=0.5, gamma=0.001, seed=0, host_noise=False):
    """Wrap ``model``'s layers for PLD in place; returns ``Applied(cells=the PLD layers,
    schedule=the ProgressiveLayerDrop schedule)`` (call ``schedule.update_state(step)`` before each
    step). Keep draws are taken in the graph
    (seeded by ``seed``) unless ``host_noise`` (then write ``pld_noise(model)`` every step)."""
    owner = "apply_progressive_layer_drop"
    check_int(owner, "seed", seed, minimum=0)
    schedule = ProgressiveLayerDrop(_check_theta(owner, theta), _check_gamma(owner, gamma))
    convert_to_pld(model, schedule, seed=seed, host_noise=host_noise)
    return Applied(pld_layers(model), schedule)


def remove_progressive_layer_drop(model):
    """Undo :func:`apply_progressive_layer_drop` (the trained weights stay); returns the model."""
    if not pld_layers(model):
        raise ValueError(f"remove_progressive_layer_drop: {type(model).__name__} has no PLD layers")
    return remove_pld(model)


class ProgressiveLayerDropping(Algorithm):
    """PLD for ``ms_prune.engine.Trainer`` or ``AlgorithmCallback`` (``mindspore.train.Model.train``).

    INIT: wraps the layers (host noise; no ``structure_changed``: the trainer and ``AlgorithmCallback``
    build every step after INIT). BATCH_START: writes theta(step) and one uniform per layer,
    drawn from the run's ``state.rng``, into the compiled step: no recompilation, and a resumed run
    drops the layers the uninterrupted run dropped. The wrappers stay after FIT_END: they run every
    layer, unscaled, in evaluation, and keep the plain model's parameter names, so the trained model
    evaluates and saves as it is; ``remove_progressive_layer_drop(model)`` unwraps it.
    """

    runs_in_model_train = True  # it only writes Parameters between steps

    def __init__(self, theta=0.5, gamma=0.001):
        self.theta = _check_theta(self.name, theta)
        self.gamma = _check_gamma(self.name, gamma)
        self.schedule = None
        self._noise = None
        self._pending = None

    def match(self, event, state):
        return event in (Event.INIT, Event.BATCH_START)

    def apply(self, event, state, logger):
        if event == Event.INIT:
            self.schedule = apply_progressive_layer_drop(state.model, self.theta, self.gamma, host_noise=True).schedule
            self._noise = pld_noise(state.model)
            if self._pending is not None:
                self.schedule.load_state_dict(self._pending)
                self._pending = None
        elif event == Event.BATCH_START:
            self.schedule.update_state(state.step)
            write_parameter(self._noise, state.rng.random(self._noise.shape[0]))

    def state_dict(self):
        return self.schedule.state_dict() if self.schedule is not None else dict(self._pending or {})

    def load_state_dict(self, state_dict):
        saved = (state_dict.get("theta_bar"), state_dict.get("gamma"))
        if saved != (self.theta, self.gamma):
            raise ValueError(f"{self.name}.load_state_dict: the checkpoint's schedule (theta, gamma) = {saved} "
                             f"differs from this run's ({self.theta}, {self.gamma})")
        if self.schedule is None:
            self._pending = dict(state_dict)  # applied at INIT
        else:
            self.schedule.load_state_dict(state_dict)

    def __repr__(self):
        return f"{self.name}(theta={self.theta}, gamma={self.gamma})"
