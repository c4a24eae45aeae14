"""Masked-LM pretraining of a small pre-LN BERT on tiny Shakespeare, with and without progressive
layer dropping (PLD), and how much faster PLD gets to the same validation loss.

    python samples/pld_bert_mlm.py --quick     # CPU, GRAPH_MODE, about 10 minutes
    python samples/pld_bert_mlm.py --config samples/configs/pld_bert_mlm.yaml
    python samples/pld_bert_mlm.py --quick --resume   # continue an interrupted run

Both runs train on ``ms_prune.engine.Trainer`` (the PLD run with the ``ProgressiveLayerDropping``
algorithm), interleaved in one process in chunks of ``eval_every`` steps, so load from elsewhere on
the machine slows both alike; each run's clock counts only its own training steps (the first step,
which compiles, and evaluation excluded). Checkpoints after every chunk allow ``--resume``. The validation MLM loss (fixed batches and masks,
every layer run) is recorded against steps and against that clock; the speed-up to equal loss is
the baseline's time to its final loss over the time PLD needed to first reach that loss (linear
interpolation between evaluations), or "not reached". Writes a JSON and a PNG plot.
"""
import json
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
from mindspore import Tensor, nn, ops  # noqa: E402

from ms_prune.data import data_path  # noqa: E402
from ms_prune.engine import Trainer  # noqa: E402
from ms_prune.engine.recipes import build_algorithms  # noqa: E402
from ms_prune.fileio import atomic_write  # noqa: E402
from ms_prune.models.bert import BertConfig, BertModel, activation  # noqa: E402
from ms_prune.models.modeling_utils import LayerNorm, Linear  # noqa: E402
from ms_prune.training import (FRACTION, NON_NEGATIVE, OPEN_FRACTION, POSITIVE, RATE, sample_cli,  # noqa: E402
                               section_ranges, set_context, write_json)

KEYS = {"model", "vocab_size", "seq_len", "batch_size", "mask_fraction", "steps", "quick_steps", "warmup_fraction",
        "weight_decay", "baseline", "pld", "eval_every", "eval_batches", "eval_batches_quick", "seed", "output_dir"}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
RANGES = {"vocab_size": (len(SPECIAL) + 1, None), "seq_len": POSITIVE,
          "batch_size": POSITIVE, "mask_fraction": OPEN_FRACTION, "steps": POSITIVE, "quick_steps": POSITIVE,
          "warmup_fraction": FRACTION, "weight_decay": NON_NEGATIVE, "eval_every": POSITIVE,
          "eval_batches": POSITIVE, "eval_batches_quick": POSITIVE, "seed": NON_NEGATIVE,
          **section_ranges("model", num_hidden_layers=POSITIVE, hidden_size=POSITIVE, num_attention_heads=POSITIVE,
                           intermediate_size=POSITIVE, dropout=(0, 1)),
          **section_ranges("baseline", learning_rate=RATE),
          **section_ranges("pld", learning_rate=RATE, theta=OPEN_FRACTION, gamma_times_steps=NON_NEGATIVE)}


class MLMHead(nn.Cell):
    """BERT's MLM head (dense, GELU, LayerNorm, decoder tied to the word embeddings) applied only at
    the masked positions (a fixed number per sequence), and the cross-entropy there: the Trainer's
    ``loss_fn`` (its Parameters train with the model). The tied embedding is held unregistered, so
    the model's tensor names stay its own."""

    def __init__(self, bert):
        super().__init__()
        config = bert.config
        object.__setattr__(self, "word_embeddings", bert.embeddings.word_embeddings)
        self.transform = Linear(config.hidden_size, config.hidden_size, config.initializer_range)
        self.act = activation(config.hidden_act)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.decoder_bias = ms.Parameter(Tensor(np.zeros(config.vocab_size, np.float32)), name="decoder_bias")

    def construct(self, outputs, positions, labels):
        hidden = outputs[0]
        picked = ops.gather_elements(hidden, 1, positions.expand_dims(-1).broadcast_to(
            (positions.shape[0], positions.shape[1], hidden.shape[-1])))
        picked = self.LayerNorm(self.act(self.transform(picked)))
        logits = ops.matmul(picked, self.word_embeddings.weight.T) + self.decoder_bias
        return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def wordpiece(train_text, vocab_size):
    from tokenizers import BertWordPieceTokenizer
    tokenizer = BertWordPieceTokenizer(lowercase=True)
    tokenizer.train_from_iterator(train_text.splitlines(), vocab_size=vocab_size, special_tokens=SPECIAL,
                                  show_progress=False)
    return tokenizer


def encode(tokenizer, text):
    return np.concatenate([np.asarray(e.ids[1:-1], np.int32)  # drop [CLS]/[SEP] of each chunk
                           for e in tokenizer.encode_batch(text.split("\n\n"))])


def mask_batch(tokens, batch, seq, count, vocab, mask_id, rng):
    """Random windows; ``count`` positions per sequence become MLM targets (80% [MASK], 10% a
    random token, 10% unchanged), as in BERT."""
    starts = rng.integers(0, len(tokens) - seq, batch)
    ids = np.stack([tokens[s:s + seq] for s in starts]).astype(np.int32)
    positions = np.stack([np.sort(rng.choice(seq, count, replace=False)) for _ in range(batch)]).astype(np.int32)
    labels = np.take_along_axis(ids, positions, 1).copy()
    roll = rng.random((batch, count))
    replaced = np.where(roll < 0.8, mask_id, np.where(roll < 0.9, rng.integers(len(SPECIAL), vocab, (batch, count)),
                                                      labels))
    np.put_along_axis(ids, positions, replaced, 1)
    return ids, positions, labels


def learning_rates(peak, steps, warmup):
    t = np.arange(steps, dtype=np.float64)
    lr = np.where(t < warmup, peak * (t + 1) / max(warmup, 1), peak * (steps - t) / max(steps - warmup, 1))
    return [float(x) for x in lr]


class Run:
    """One training run on its own Trainer, with its own clock and validation curve."""

    def __init__(self, name, config, vocab, steps, use_pld, batches, checkpoints, resume):
        m = config["model"]
        ms.set_seed(config["seed"])  # both runs start from the same weights
        self.bert = BertModel(BertConfig(
            vocab_size=vocab, hidden_size=m["hidden_size"], num_hidden_layers=m["num_hidden_layers"],
            num_attention_heads=m["num_attention_heads"], intermediate_size=m["intermediate_size"],
            hidden_dropout_prob=m["dropout"], attention_probs_dropout_prob=m["dropout"],
            max_position_embeddings=config["seq_len"], pre_layer_norm=True))
        self.head = MLMHead(self.bert)
        section = config["pld" if use_pld else "baseline"]
        recipe = {"progressive_layer_drop": {"theta": section["theta"],
                                             "gamma": section["gamma_times_steps"] / steps}} if use_pld else {}
        schedule = learning_rates(section["learning_rate"], steps, int(config["warmup_fraction"] * steps))

        def adamw(params):
            return nn.AdamWeightDecay(params, learning_rate=schedule, weight_decay=config["weight_decay"])
        self.name, self.curve_path = name, os.path.join(checkpoints, "curve.json")
        self.algorithms = build_algorithms(recipe, path=name)
        resume_from = "latest" if resume and os.path.isfile(os.path.join(checkpoints, "latest")) else None
        self.trainer = Trainer(self.bert, self.head, batches, max_steps=steps, algorithms=self.algorithms,
                               optimizer=adamw, num_inputs=1, log_interval=0, checkpoint_dir=checkpoints,
                               resume_from=resume_from)
        self.seconds, self.losses, self.curve = 0.0, [], []  # curve: (step, train seconds, val loss, theta)
        if resume_from is not None and os.path.isfile(self.curve_path):
            with open(self.curve_path, encoding="utf-8") as f:
                saved = json.load(f)
            self.seconds, self.curve = saved["seconds"], [tuple(c) for c in saved["curve"]]

    @property
    def steps_done(self):
        return self.trainer.state.step

    def train_to(self, step):
        """Train up to ``step``; the first step (which compiles) is not counted as training time."""
        if self.steps_done == 0:
            self.trainer.max_steps = 1
            self.trainer.fit()
        self.trainer.max_steps = step
        done = len(self.trainer.history)
        start = time.perf_counter()
        self.trainer.fit()
        self.seconds += time.perf_counter() - start
        self.losses += [r["loss"] for r in self.trainer.history[done:]]

    def evaluate(self, batches):
        loss_net = self.trainer.state.loss_net  # model + head as one Cell: one evaluation graph
        loss_net.set_train(False)
        loss = float(np.mean([float(loss_net(*[Tensor(x) for x in b]).asnumpy()) for b in batches]))
        loss_net.set_train(True)
        theta = self.algorithms[0].schedule.get_theta() if self.algorithms else 1.0
        self.curve.append((self.steps_done, self.seconds, loss, theta))
        with atomic_write(self.curve_path, binary=False) as f:  # the curve resumes with the checkpoint
            json.dump({"seconds": self.seconds, "curve": self.curve}, f)
        return loss


def first_reach(curve, target, axis):
    """Interpolated value of ``axis`` (0: steps, 1: seconds) where the loss first gets <= target."""
    for (x0, y0), (x1, y1) in zip([(c[axis], c[2]) for c in curve], [(c[axis], c[2]) for c in curve[1:]]):
        if y1 <= target:
            if y0 <= target:
                return float(x0)
            return float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1))
    return None


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        curve = np.array(run.curve)
        axes[0].plot(curve[:, 0], curve[:, 2], label=run.name)
        axes[1].plot(curve[:, 1], curve[:, 2], label=run.name)
    axes[0].set_xlabel("training steps")
    axes[1].set_xlabel("training wall-clock seconds (compile and evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("validation MLM loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Pre-LN BERT MLM on tiny Shakespeare: baseline vs progressive layer dropping")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    args, config = sample_cli(__file__, __doc__, KEYS, "quick_steps steps per run (under 15 minutes on CPU)", argv,
                              ranges=RANGES, extra_arguments=[("--resume", dict(
                                  action="store_true", help="continue from the last checkpoints"))])
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    print(f"the loss figure goes to {os.path.abspath(config['output_dir'])}", flush=True)
    set_context("graph", args.device_target, seed=config["seed"])
    steps = config["quick_steps"] if args.quick else config["steps"]
    eval_count = config["eval_batches_quick"] if args.quick else config["eval_batches"]
    seq, batch = config["seq_len"], config["batch_size"]
    count = max(1, round(config["mask_fraction"] * seq))

    with open(data_path("tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read()
    split = int(len(text) * 0.9)
    tokenizer = wordpiece(text[:split], config["vocab_size"])
    vocab, mask_id = tokenizer.get_vocab_size(), tokenizer.token_to_id("[MASK]")
    train, val = encode(tokenizer, text[:split]), encode(tokenizer, text[split:])
    print(f"tiny Shakespeare: {len(train):,} train / {len(val):,} val WordPiece tokens, vocab {vocab}; "
          f"{steps} steps per run, batch {batch} x {seq}, {count} masked per sequence", flush=True)
    val_rng = np.random.default_rng(1234)
    val_batches = [mask_batch(val, batch, seq, count, vocab, mask_id, val_rng) for _ in range(eval_count)]

    def batches(step):  # the same batches for both runs, any step's batch again on resume
        return mask_batch(train, batch, seq, count, vocab, mask_id, np.random.default_rng((config["seed"] + 1, step)))
    work = os.path.join(config["output_dir"], "checkpoints" + ("_quick" if args.quick else ""))
    runs = [Run(name, config, vocab, steps, name == "pld", batches, os.path.join(work, name), args.resume)
            for name in ("baseline", "pld")]
    for run in runs:
        if not run.curve:
            run.evaluate(val_batches)
    start = time.time()
    every = config["eval_every"]
    for t in range(min(r.steps_done for r in runs), steps, every):
        chunk_end = min(steps, (t // every + 1) * every)
        line = []
        for run in runs:
            if run.steps_done < chunk_end:
                run.train_to(chunk_end)
                loss = run.evaluate(val_batches)
            else:
                loss = run.curve[-1][2]
            line.append(f"{run.name}: train {np.mean(run.losses[-every:]) if run.losses else float('nan'):.3f} "
                        f"val {loss:.3f} ({run.seconds:.0f} s)")
        theta = runs[1].algorithms[0].schedule.get_theta()
        print(f"step {chunk_end}/{steps} theta {theta:.3f} | " + " | ".join(line)
              + f" | elapsed {time.time() - start:.0f} s", flush=True)

    baseline, pld = runs
    target = baseline.curve[-1][2]
    pld_seconds, pld_steps = first_reach(pld.curve, target, 1), first_reach(pld.curve, target, 0)
    time_speedup = baseline.seconds / pld_seconds if pld_seconds else None
    step_speedup = baseline.steps_done / pld_steps if pld_steps else None
    per_step = (baseline.seconds / (baseline.steps_done - 1)) / (pld.seconds / (pld.steps_done - 1))
    print(f"final validation MLM loss: baseline {baseline.curve[-1][2]:.4f}, PLD {pld.curve[-1][2]:.4f}")
    print(f"training time: baseline {baseline.seconds:.1f} s, PLD {pld.seconds:.1f} s "
          f"(time per step: PLD {per_step:.3f}x faster)")
    if pld_seconds is None:
        print(f"PLD did not reach the baseline's final loss {target:.4f} within its {steps} steps")
    else:
        print(f"to the baseline's final loss {target:.4f}: PLD needs {pld_steps:.0f} steps / {pld_seconds:.1f} s "
              f"-> speed-up {time_speedup:.3f}x in wall-clock, {step_speedup:.3f}x in steps")
    os.makedirs(config["output_dir"], exist_ok=True)
    png = os.path.join(config["output_dir"], os.path.splitext(os.path.basename(args.json))[0] + "_loss.png")
    plot(runs, png)
    write_json(args.json, {
        "steps": steps, "quick": args.quick, "config": config, "vocab": vocab,
        "final_val_loss": {r.name: r.curve[-1][2] for r in runs},
        "train_seconds": {r.name: r.seconds for r in runs},
        "time_per_step_speedup": per_step,
        "target_loss": target, "pld_steps_to_target": pld_steps, "pld_seconds_to_target": pld_seconds,
        "speedup_to_equal_loss_wallclock": time_speedup, "speedup_to_equal_loss_steps": step_speedup,
        "curves": {r.name: [dict(zip(("step", "seconds", "val_loss", "theta"), c)) for c in r.curve] for r in runs},
        "plot": png,
    })


if __name__ == "__main__":
    main()
