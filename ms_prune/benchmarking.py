"""Timing that holds up on a noisy machine: candidates are timed interleaved in one process and
compared by median, so load from elsewhere hits all of them alike."""
import json
import os
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor


def _wait(output):
    # MindSpore may return before the device finishes; reading one small value waits for it.
    while isinstance(output, (tuple, list)):
        output = output[-1]
    output.asnumpy()


def compare_latency(candidates, repeats=10, warmup=2):
    """Median seconds per call of each zero-argument callable in ``candidates`` ({name: fn}).

    Calls are interleaved (the order rotates each round); ``warmup`` rounds (graph compilation
    included) are not counted.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            _wait(candidates[name]())
    samples = {name: [] for name in names}
    for round_ in range(repeats):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            start = time.perf_counter()
            _wait(candidates[name]())
            samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(times)) for name, times in samples.items()}


def heads_with_smallest_output_norm(model, keep_per_layer):
    """{layer: heads to prune}: in each layer, all but the ``keep_per_layer`` heads whose slice of
    the output projection has the largest Frobenius norm. A cheap, data-free criterion for demos
    and speed measurements; LRP (ms_prune.heads) learns which heads to drop. ``keep_per_layer``
    may be 0 (every head pruned) up to the most heads a layer has."""
    from ms_prune import protocol
    from ms_prune.validation import check_int
    attentions = protocol.adapter(model).attentions()
    most = max(attention.num_heads for attention in attentions)
    check_int("heads_with_smallest_output_norm", f"keep_per_layer (heads kept of the {most} per layer)",
              keep_per_layer, 0, most)
    selection = {}
    for layer, attention in enumerate(attentions):
        weight = attention.output_projection().weight.asnumpy()
        # rows of per_head = input features of the projection = concatenated head outputs
        per_head = weight.T if attention.layout == "linear" else weight
        norms = [np.linalg.norm(per_head[p * attention.head_dim:(p + 1) * attention.head_dim])
                 for p in range(attention.num_heads)]
        order = np.argsort(norms)[::-1]
        selection[layer] = sorted(attention.kept[p] for p in order[keep_per_layer:])
    return selection


def random_batch(vocab_size, batch_size, seq_len, seed=0):
    rng = np.random.default_rng(seed)
    ids = Tensor(rng.integers(1000 if vocab_size > 2000 else 0, vocab_size, (batch_size, seq_len)), ms.int32)
    return ids, Tensor(np.ones((batch_size, seq_len), np.int32))


# ---- time to quality -----------------------------------------------------------------------------
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
