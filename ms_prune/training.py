"""Small pieces every sample, benchmark and algorithm test needs: context set-up, a compiled
training step, result files."""
import argparse
import gc
import json
import logging
import math
import os
import shutil

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops


DEVICE_TARGETS = ("CPU", "GPU", "Ascend")


def device_target_name(value):
    """MindSpore's spelling of a device target given in any case ('cpu', 'gpu', 'ASCEND' ...)."""
    for name in DEVICE_TARGETS:
        if isinstance(value, str) and value.strip().lower() == name.lower():
            return name
    raise ValueError(f"device_target must be one of {list(DEVICE_TARGETS)} (any case), got {value!r}")


def set_context(mode="graph", device_target="CPU", seed=None):
    """``mode``: 'graph' (GRAPH_MODE, how users train) or 'pynative'; ``device_target`` in any case.
    A backend this MindSpore installation cannot run is a RuntimeError saying so."""
    if mode not in ("graph", "pynative"):
        raise ValueError(f"mode must be 'graph' or 'pynative', got {mode!r}")
    device_target = device_target_name(device_target)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    # set_device raises once kernels have run, even for the same target: set it only on change.
    if ms.get_context("device_target") != device_target:
        try:
            ms.set_device(device_target)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"device_target {device_target!r} is not available here (MindSpore: {first}); "
                               f"install MindSpore's {device_target} package and drivers, or use "
                               f"--device_target CPU") from None
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
    return compile_in_pynative(step) if jit else step


def compile_in_pynative(cell):
    """``cell`` with its ``construct`` compiled by ``ms.jit`` when the context is PyNative (in
    GRAPH_MODE the Cell compiles anyway): a step Cell is one graph in either mode."""
    if ms.get_context("mode") == ms.PYNATIVE_MODE:
        cell.construct = ms.jit(cell.construct)
    return cell


def peak_memory_mb():
    """{"host": peak resident memory of this process, "device": peak memory MindSpore allocated on
    the accelerator} in MiB; ``None`` where the platform cannot tell (the device on CPU)."""
    host = None
    try:
        import resource
        import sys
        # ru_maxrss is in KiB on Linux, in bytes on macOS
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError):  # Windows has no resource module
        pass
    device = None
    if ms.get_context("device_target") != "CPU":
        try:
            device = ms.runtime.max_memory_allocated() / 2 ** 20
        except (AttributeError, RuntimeError):
            pass
    return {"host": host, "device": device}


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
    """Mean next-token cross-entropy of a model returning (batch, seq, vocab) logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, input_ids, labels):
        return lm_cross_entropy(self.model(input_ids), labels)


def lm_perplexity(model, tokens, batch_size, seq_len, max_batches=None):
    """exp(mean next-token cross-entropy) over consecutive windows of ``tokens``, in evaluation
    mode (the model's mode is restored after). A model returning a tuple gives its logits first."""
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


# ranges for sample_cli's ``ranges``: counts, non-negative values, rates (> 0), fractions
POSITIVE, NON_NEGATIVE, RATE, FRACTION, OPEN_FRACTION = (1, None), (0, None), (0, None, "open"), (0, 1), (0, 1, "open")


def section_ranges(section, **ranges):
    """{'section.key': range} for the keys of one config section."""
    return {f"{section}.{key}": value for key, value in ranges.items()}


def _device_argument(value):
    try:
        return device_target_name(value)
    except ValueError as err:  # argparse prints only this exception's message
        raise argparse.ArgumentTypeError(str(err)) from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The sample's docstring as written, and every option's default in its help."""


def sample_cli(script, doc, keys, quick_help, argv=None, extra_arguments=(), ranges=None):
    """The command line every sample shares: ``--config`` (default: samples/configs/<name>.yaml
    beside the script), ``--quick``, ``--device_target`` (CPU, GPU or Ascend, any case),
    ``--json`` (results/<name>.json), plus ``extra_arguments`` ((flag, kwargs) pairs). Prints where
    the JSON goes. Returns (args, config).

    The config is checked against the sample's default config file at every depth
    (``validation.check_like``): an unknown or misspelled key names its dotted path and the
    allowed keys, a value of the wrong type names both, '1e-4' strings become floats, and keys a
    file leaves out take the default's values. ``keys`` (the default's top-level keys) guards
    the sample against its own default file. ``ranges`` ({dotted path: (min, max[, 'open'])})
    bounds counts and rates (``validation.check_ranges``); checks that need the model are the
    sample's.
    """
    import yaml
    from ms_prune.validation import check_like, check_ranges
    name = os.path.splitext(os.path.basename(script))[0]
    default_path = os.path.join(os.path.dirname(os.path.abspath(script)), "configs", name + ".yaml")
    parser = argparse.ArgumentParser(prog=os.path.basename(script), description=doc, formatter_class=_HelpFormatter)
    parser.add_argument("--config", default=default_path,
                        help="YAML settings, checked against the default file; keys it leaves out keep the default")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device_target", default="CPU", type=_device_argument,
                        help=f"one of {', '.join(DEVICE_TARGETS)} (any case)")
    parser.add_argument("--json", default=os.path.join("results", name + ".json"), help="where the results go")
    for flag, kwargs in extra_arguments:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    default = _read_yaml(yaml, default_path)
    if set(default) != set(keys):
        raise ValueError(f"{default_path}: the sample expects top-level keys {sorted(keys)}, the file has "
                         f"{sorted(default)}")
    config = check_like(args.config, _read_yaml(yaml, args.config), default)
    check_ranges(args.config, config, ranges or {})
    print(f"{name}: settings from {os.path.abspath(args.config)}; results go to {os.path.abspath(args.json)}",
          flush=True)
    return args, config


def _read_yaml(yaml, path):
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a YAML mapping of settings, got {type(config).__name__}")
    return config


def write_json(path, result):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, sort_keys=True)
        print(f"wrote {path}")


def resume_from_checkpoints(checkpoints, resume):
    """A sample phase's ``resume_from``: 'latest' when ``resume`` and ``checkpoints`` holds a
    checkpoint; otherwise the phase starts over, so the folder's old checkpoints go (the Trainer
    refuses a fresh run beside another run's checkpoints)."""
    if resume and os.path.isfile(os.path.join(checkpoints, "latest")):
        return "latest"
    shutil.rmtree(checkpoints, ignore_errors=True)
    return None


def release_graph_memory():
    """Free the memory of compiled graphs no longer referenced: each compiled MiniLM graph holds GBs
    of CPU memory (measured: ~2.7 GB for a 32 x 64 training step), so a run of several phases (or
    models) that does not free them is OOM-killed."""
    gc.collect()
    try:
        ms.ms_memory_recycle()
    except RuntimeError as err:
        # MindSpore 2.10 iterates its per-Cell compile cache while freeing graphs deletes Cells
        # (and their cache entries): "dictionary changed size during iteration". Freeing memory is
        # all this is for, so go on with what was freed (the rest is freed at exit).
        if "changed size" not in str(err):
            raise
        logging.getLogger(__name__).warning("ms_memory_recycle stopped early (%s); continuing", err)
