"""The experiment harness the samples share, kept out of the library: their command line
(``sample_cli``), a training phase on the engine's Trainer, the time-to-quality race and the
fine-tuned MiniLM on SST-2 that two samples compare on.

A sample run as ``python samples/<name>.py`` (from any folder) finds this module beside it, since
Python puts a script's folder first on ``sys.path``; everything else comes from the installed
ms_prune. No sample imports another sample: what two of them share lives here.
"""
import argparse
import hashlib
import json
import os
import shutil
import time

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from ms_prune.cli import HelpFormatter, device_target_argument, read_yaml

# ranges for sample_cli's ``ranges``: counts, non-negative values, rates (> 0), fractions
POSITIVE, NON_NEGATIVE, RATE, FRACTION, OPEN_FRACTION = (1, None), (0, None), (0, None, "open"), (0, 1), (0, 1, "open")


# ---- the command line ----------------------------------------------------------------------------
def section_ranges(section, **ranges):
    """{'section.key': range} for the keys of one config section."""
    return {f"{section}.{key}": value for key, value in ranges.items()}


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
    from ms_prune.validation import check_like, check_ranges
    name = os.path.splitext(os.path.basename(script))[0]
    default_path = os.path.join(os.path.dirname(os.path.abspath(script)), "configs", name + ".yaml")
    parser = argparse.ArgumentParser(prog=os.path.basename(script), description=doc, formatter_class=HelpFormatter)
    parser.add_argument("--config", default=default_path,
                        help="YAML settings, checked against the default file; keys it leaves out keep the default")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device_target", default="CPU", type=device_target_argument,
                        help="CPU, GPU or Ascend (any case)")
    parser.add_argument("--json", default=os.path.join("results", name + ".json"), help="where the results go")
    for flag, kwargs in extra_arguments:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    default = _read_config(default_path)
    if set(default) != set(keys):
        raise ValueError(f"{default_path}: the sample expects top-level keys {sorted(keys)}, the file has "
                         f"{sorted(default)}")
    config = check_like(args.config, _read_config(args.config), default)
    check_ranges(args.config, config, ranges or {})
    print(f"{name}: settings from {os.path.abspath(args.config)}; results go to {os.path.abspath(args.json)}",
          flush=True)
    return args, config


def _read_config(path):
    config = read_yaml(path, "config file")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a YAML mapping of settings, got {type(config).__name__}")
    return config


def interrupted_run(path, config, quick):
    """The results JSON an interrupted run with these settings left at ``path`` (``--resume``), or
    None when there is none; one with other settings (config or ``--quick``) is a ValueError."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    if previous.get("config") != config or previous.get("quick") != quick:
        raise ValueError(f"--resume: {path} holds a run with other settings (config or --quick); run without "
                         f"--resume to start again, or give another --json")
    return previous


# ---- training phases -----------------------------------------------------------------------------
def resume_from_checkpoints(checkpoints, resume):
    """A sample phase's ``resume_from``: 'latest' when ``resume`` and ``checkpoints`` holds a
    checkpoint; otherwise the phase starts over, so the folder's old checkpoints go (the Trainer
    refuses a fresh run beside another run's checkpoints)."""
    if resume and os.path.isfile(os.path.join(checkpoints, "latest")):
        return "latest"
    shutil.rmtree(checkpoints, ignore_errors=True)
    return None


def train_phase(model, loss_fn, batches, first_step, steps, lr, weight_decay, log_every, checkpoints, resume,
                algorithms=(), warmup=False):
    """One phase on the engine's Trainer, on ``batches(first_step + step)``, checkpointed in
    ``checkpoints`` and resumed from there with ``resume``. ``warmup``: lr warms up over the first
    10% of the steps, then decays linearly (without warm-up a short fine-tune of a classifier can
    collapse to one class); otherwise it is constant. Leaves the model in evaluation mode and frees
    the phase's graphs (each compiled step of a real model holds GBs); returns the Trainer's
    history."""
    from ms_prune.engine import Trainer
    from ms_prune.training import release_graph_memory
    if warmup:
        ramp = max(1, steps // 10)
        schedule = [lr * min((t + 1) / ramp, (steps - t) / max(1, steps - ramp)) for t in range(steps)]
        optimizer = dict(optimizer=lambda params: nn.AdamWeightDecay(params, learning_rate=schedule,
                                                                     weight_decay=weight_decay))
    else:
        optimizer = dict(lr=lr, weight_decay=weight_decay)
    trainer = Trainer(model, loss_fn, lambda step: batches(first_step + step), max_steps=steps, algorithms=algorithms,
                      log_interval=log_every, checkpoint_dir=checkpoints, checkpoint_interval=log_every * 5,
                      resume_from=resume_from_checkpoints(checkpoints, resume), **optimizer)
    trainer.fit()
    model.set_train(False)
    history = trainer.history
    del trainer
    release_graph_memory()
    return history


# ---- MiniLM fine-tuned on SST-2 (samples/lrp_bert_sst2.py, samples/gradnas_bert_sst2.py) -------
def sst2_rows(model_dir, max_len):
    """SST-2 train and test (the GLUE dev set) as ((token id rows, labels), (rows, labels)), with
    the tokenizer of ``model_dir``, unpadded and truncated to ``max_len``."""
    from ms_prune.data import read_sst2, token_rows
    splits = []
    for split in ("train", "test"):
        sentences, labels = read_sst2(split)
        splits.append((token_rows(model_dir, sentences, max_len), labels))
    return splits


def cross_entropy(logits, labels):
    return ops.cross_entropy(logits, labels)


def freeze(model, enabled):
    """With ``enabled``, the word embeddings stay as pretrained (most of MiniLM's parameters)."""
    if enabled:
        for name, param in model.parameters_and_names():
            if name.endswith("embeddings.word_embeddings.weight"):
                param.requires_grad = False


def fine_tuned_model(config, quick, batches, log_every, resume=False, base_dir=None):
    """The fine-tuned MiniLM folder (or the BERT folder ``base_dir``, fine-tuned) and whether it
    was made now: made once per fine-tune setting (in the ms_prune cache), so the samples share it
    when their settings agree; with ``resume``, an interrupted fine-tune goes on from its last
    checkpoint."""
    from ms_prune.hub import default_cache_dir, minilm_dir
    from ms_prune.models.bert import BertForSequenceClassification
    ft = config["finetune"]
    steps = ft["quick_steps"] if quick else ft["steps"]
    key = {k: config[k] for k in ("max_len", "buckets", "batch_size", "freeze_word_embeddings", "seed")}
    # the procedure's first name, kept so that the fine-tunes already cached stay valid
    key.update(lr=ft["lr"], weight_decay=ft["weight_decay"], steps=steps, procedure="lrp_bert_sst2.train (Trainer)")
    if base_dir is not None:  # MiniLM's fine-tunes keep the names they were cached under
        key["base_model"] = os.path.abspath(base_dir)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(default_cache_dir(), f"minilm-sst2-finetuned-{digest}")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        print(f"fine-tuned MiniLM from the cache: {folder}", flush=True)
        return folder, False
    ms.set_seed(config["seed"])
    model = BertForSequenceClassification.from_pretrained(base_dir or minilm_dir(), num_labels=2)
    freeze(model, config["freeze_word_embeddings"])
    print(f"fine-tuning MiniLM on SST-2 for {steps} steps of {config['batch_size']}", flush=True)
    checkpoints = folder + ".checkpoints"
    train_phase(model, cross_entropy, batches, 0, steps, ft["lr"], ft["weight_decay"], log_every, checkpoints, resume,
                warmup=True)
    partial = folder + f".partial-{os.getpid()}"
    model.save_pretrained(partial)
    with open(os.path.join(partial, "finetune_settings.json"), "w", encoding="utf-8") as f:
        json.dump(key, f, indent=2, sort_keys=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)  # a run killed mid-save leaves no half folder to reuse
    shutil.rmtree(checkpoints, ignore_errors=True)
    return folder, True


# ---- time to quality: runs raced on one machine -----------------------------------------------
class TimedRun:
    """One training run (a ``Trainer``) timed for time-to-quality comparisons.

    ``evaluate(trainer) -> float`` gives the validation quality (lower is better: a loss or a
    perplexity). ``train_seconds`` counts the run's training steps only; a step that compiled a
    graph is counted at the run's median step time and the rest goes to ``compile_seconds``, so
    a run that compiles more graphs (random-LTD's kept lengths) shows that cost apart. ``curve``
    is [(step, train_seconds, quality)]; with ``curve_path`` it is saved after each evaluation so
    it resumes with the Trainer's checkpoint.
    """

    def __init__(self, name, trainer, evaluate, curve_path=None):
        self.name, self.trainer, self._evaluate, self.curve_path = name, trainer, evaluate, curve_path
        self.step_seconds, self.compile_steps, self.curve = [], [], []
        if curve_path is not None and trainer.state.step > 0 and os.path.isfile(curve_path):
            with open(curve_path, encoding="utf-8") as f:
                saved = json.load(f)
            self.step_seconds, self.compile_steps = saved["step_seconds"], saved["compile_steps"]
            self.curve = [tuple(c) for c in saved["curve"]]

    @property
    def steps_done(self):
        return self.trainer.state.step

    def train_to(self, step):
        done = len(self.trainer.history)
        self.trainer.max_steps = step
        self.trainer.fit()
        for record in self.trainer.history[done:]:
            (self.compile_steps if record["compiled"] else self.step_seconds).append(record["seconds"])

    @property
    def median_step_seconds(self):
        return float(np.median(self.step_seconds)) if self.step_seconds else 0.0

    @property
    def train_seconds(self):
        return float(np.sum(self.step_seconds)) + len(self.compile_steps) * self.median_step_seconds

    @property
    def compile_seconds(self):
        return max(0.0, float(np.sum(self.compile_steps)) - len(self.compile_steps) * self.median_step_seconds)

    def evaluate(self):
        quality = float(self._evaluate(self.trainer))
        self.curve.append((self.steps_done, self.train_seconds, quality))
        if self.curve_path is not None:
            from ms_prune.fileio import atomic_write
            with atomic_write(self.curve_path, binary=False) as f:
                json.dump({"step_seconds": self.step_seconds, "compile_steps": self.compile_steps,
                           "curve": self.curve}, f)
        return quality


def race(runs, steps, eval_every, log=print):
    """Train ``runs`` (``TimedRun``s) to ``steps`` interleaved in chunks of ``eval_every`` steps,
    evaluating each after every chunk (and once before the first), so load from elsewhere on the
    machine slows all of them alike. A run whose Trainer resumed continues where it stopped."""
    for run in runs:
        if not run.curve:
            run.evaluate()
    started = time.time()
    for t in range(min(run.steps_done for run in runs), steps, eval_every):
        chunk_end = min(steps, (t // eval_every + 1) * eval_every)
        for run in runs:
            if run.steps_done < chunk_end:
                run.train_to(chunk_end)
                run.evaluate()
        if log is not None:
            log(f"step {chunk_end}/{steps} | " + " | ".join(
                f"{run.name}: {run.curve[-1][2]:.4f} ({run.train_seconds:.0f} s + {run.compile_seconds:.0f} s compile)"
                for run in runs) + f" | elapsed {time.time() - started:.0f} s")


def first_reach(curve, target, axis=1):
    """Where a curve [(step, seconds, quality)] first gets to ``target`` quality or better:
    the value of ``axis`` (0: steps, 1: seconds), interpolated linearly between evaluations;
    None if it never does."""
    points = [(c[axis], c[2]) for c in curve]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 <= target:
            return float(x0) if y0 <= target else float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1))
    return None


def time_to_quality(baseline, run):
    """How ``run`` compares with ``baseline`` (both ``TimedRun``s) on the way to the baseline's
    final quality: ``time_to_baseline_quality`` is the run's training seconds to first reach it
    over the baseline's (None: not reached), compilation excluded; ``steps_to_baseline_quality``
    likewise in steps."""
    target = baseline.curve[-1][2]
    seconds, steps = first_reach(run.curve, target, 1), first_reach(run.curve, target, 0)
    base_seconds, base_steps = first_reach(baseline.curve, target, 1), first_reach(baseline.curve, target, 0)
    return {"target_quality": target,
            "time_to_baseline_quality": None if seconds is None else seconds / base_seconds,
            "steps_to_baseline_quality": None if steps is None else steps / base_steps,
            "seconds_to_target": seconds, "baseline_seconds_to_target": base_seconds}


def run_record(run):
    """A TimedRun's figures for a JSON result."""
    return {"name": run.name, "steps": run.steps_done, "final_quality": run.curve[-1][2],
            "train_seconds": run.train_seconds, "compile_seconds": run.compile_seconds,
            "median_step_seconds": run.median_step_seconds, "compiled_steps": len(run.compile_steps),
            "curve": [dict(zip(("step", "seconds", "quality"), c)) for c in run.curve]}


def mean_ratio(ratios):
    """The mean of per-seed ``time_to_baseline_quality`` ratios; None unless every seed reached
    the baseline's quality (an average over the seeds that did would flatter the run)."""
    return float(np.mean(ratios)) if ratios and None not in ratios else None


def per_seed(records, names, keys=("final_quality", "compile_seconds")):
    """{key: {run name: [value per seed]}} of ``run_record`` dicts: a result's per-run fields."""
    return {key: {name: [r[key] for r in records if r["name"] == name] for name in names} for key in keys}


def plot_time_to_quality(records, path, quality_name, title):
    """Quality against training steps and against training seconds, one line per run record
    (``run_record`` dicts with a ``label``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for record in records:
        curve = record["curve"]
        for ax, key in zip(axes, ("step", "seconds")):
            ax.plot([c[key] for c in curve], [c["quality"] for c in curve], label=record["label"])
    axes[0].set_xlabel("training steps")
    axes[1].set_xlabel("training wall-clock seconds (compilation and evaluation excluded)")
    for ax in axes:
        ax.set_ylabel(quality_name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
