"""Small pieces every sample, benchmark and algorithm test needs: context set-up, a compiled
training step, result files."""
import json
import math
import os

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops


def set_context(mode="graph", device_target="CPU", seed=None):
    """``mode``: 'graph' (GRAPH_MODE, how users train) or 'pynative'."""
    if mode not in ("graph", "pynative"):
        raise ValueError(f"mode must be 'graph' or 'pynative', got {mode!r}")
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    # set_device raises once kernels have run, even for the same target: set it only on change.
    if ms.get_context("device_target") != device_target:
        ms.set_device(device_target)
    if seed is not None:
        ms.set_seed(seed)


class TrainStep(nn.Cell):
    """``loss = loss_net(*inputs)``, its gradients with respect to the optimizer's parameters, and
    the optimizer update, as one Cell: in GRAPH_MODE the whole step compiles to one graph.

    A Cell rather than ``ms.jit`` of a closure: on MindSpore 2.10 CPU a jitted closure ran the
    same step about 2x slower, and froze Parameters it does not optimise (a schedule written
    between steps) as constants at compile time; a Cell's graph reads them every step.
    """

    def __init__(self, loss_net, optimizer):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.optimizer = optimizer
        self.grad_fn = ms.value_and_grad(loss_net, None, optimizer.parameters)

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        self.optimizer(grads)
        return loss


def make_train_step(loss_net, optimizer, jit=True):
    """A :class:`TrainStep`; returns the loss when called with the loss net's inputs.

    Compiled in GRAPH_MODE. In PyNative it runs op by op, or compiled with ``ms.jit`` when
    ``jit=True``, so a PyNative program still gets a compiled step.
    """
    step = TrainStep(loss_net, optimizer)
    if jit and ms.get_context("mode") == ms.PYNATIVE_MODE:
        step.construct = ms.jit(step.construct)
    return step


def write_parameter(param, value):
    """Write a host value into ``param`` so that every compiled graph reading it sees it at its
    next run, with no recompilation: the one way ms_prune moves a host value (a schedule's theta,
    a target, a learning rate, per-step noise) into a compiled step.

    In place (``ops.assign``), not ``set_data``: a graph compiled with ``ms.jit`` (the PyNative
    train step) keeps reading the memory it was compiled with, and ``set_data`` swaps it."""
    ops.assign(param, Tensor(np.asarray(value, dtype=ms.dtype_to_nptype(param.dtype)).reshape(param.shape)))


def compiled_graph_count(step):
    """How many graphs MindSpore has compiled for ``step`` plus every ``ms.jit`` graph so far:
    the difference around a call tells whether that call compiled. GRAPH_MODE records a Cell's
    graphs on the Cell (``compile_cache``), ``ms.jit`` in a global record."""
    from mindspore.graph.api import ms_compile_cache
    return len(ms_compile_cache) + len(getattr(step, "compile_cache", ()))


def lm_cross_entropy(logits, labels):
    """Mean next-token cross-entropy of (batch, seq, vocab) logits against (batch, seq) labels: the
    ``loss_fn`` of an ``ms_prune.engine.Trainer`` training a language model (module-level, so graph
    mode can parse it)."""
    return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class LMLoss(nn.Cell):
    """Mean next-token cross-entropy of a model returning (batch, seq, vocab) logits; adds the
    model's penalty when it returns (logits, penalty)."""

    def __init__(self, model, with_penalty=False):
        super().__init__()
        self.model = model
        self.with_penalty = with_penalty

    def construct(self, input_ids, labels):
        outputs = self.model(input_ids)
        logits = outputs[0] if self.with_penalty else outputs
        loss = lm_cross_entropy(logits, labels)
        if self.with_penalty:
            return loss + outputs[1]
        return loss


def lm_perplexity(model, tokens, batch_size, seq_len, max_batches=None):
    """exp(mean next-token cross-entropy) over consecutive windows of ``tokens``, in evaluation
    mode (the model's mode is restored after). Gated models' (logits, penalty) outputs work too."""
    from ms_prune.data import lm_eval_windows
    was_training = model.training
    model.set_train(False)
    losses = []
    for inputs, labels in lm_eval_windows(tokens, batch_size, seq_len, max_batches):
        outputs = model(Tensor(inputs, ms.int32))
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        loss = ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), Tensor(labels, ms.int32).reshape(-1))
        losses.append(float(loss.asnumpy()))
    model.set_train(was_training)
    return math.exp(float(np.mean(losses)))


def sample_cli(script, doc, keys, quick_help, argv=None, extra_arguments=()):
    """The command line every sample shares: ``--config`` (samples/configs/<name>.yaml beside the
    script), ``--quick``, ``--device_target``, ``--json`` (results/<name>.json), plus
    ``extra_arguments`` ((flag, kwargs) pairs). Returns (args, config); a config whose top-level
    keys are not exactly ``keys`` is a ValueError naming them."""
    import argparse
    import yaml
    name = os.path.splitext(os.path.basename(script))[0]
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(script)), "configs",
                                                         name + ".yaml"))
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device_target", default="CPU", help="CPU, GPU or Ascend")
    parser.add_argument("--json", default=os.path.join("results", name + ".json"))
    for flag, kwargs in extra_arguments:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{args.config}: expected a YAML mapping of settings, got {type(config).__name__}")
    if set(config) != set(keys):
        raise ValueError(f"{args.config}: keys must be {sorted(keys)}; got {sorted(config)} "
                         f"(unknown: {sorted(set(config) - set(keys))}, missing: {sorted(set(keys) - set(config))})")
    return args, config


def write_json(path, result):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, sort_keys=True)
        print(f"wrote {path}")
