"""Does progressive layer dropping (PLD) pretrain a BERT faster to the same quality? Masked-LM
pretraining of a small pre-LN BERT on tiny Shakespeare, with and without PLD, interleaved in one
process, for each seed; the measure is the wall-clock time each run needs to first reach the
baseline's final validation MLM loss (``time_to_baseline_quality`` = PLD / baseline; below 1 is
faster).

    python samples/pld_bert_mlm.py --quick     # CPU, GRAPH_MODE, one seed, 600 steps per run
    python samples/pld_bert_mlm.py             # the full run: two seeds, 2000 steps per run
    python samples/pld_bert_mlm.py --config samples/configs/pld_bert_mlm_4_layers.yaml   # the smaller model
    python samples/pld_bert_mlm.py --quick --sweep   # the config's PLD settings against one baseline
    python samples/pld_bert_mlm.py --quick --resume  # continue an interrupted run

Setting: character-level text (``data: char``: 65 characters plus BERT's special tokens), so the
transformer layers are the cost (as in BERT-base, where the embedding and MLM head are a small part
of a step) and a small model leaves the MLM plateau (predicting the character frequencies) within
a few hundred steps of 32 x 32-character windows; ``data: wordpiece`` trains a WordPiece
vocabulary of ``vocab_size`` on the training text instead. Both runs are ``ms_prune.engine.Trainer``
runs (PLD with the ``ProgressiveLayerDropping`` algorithm), trained in chunks of ``eval_every``
steps in turn, so load from elsewhere slows both alike. Training time counts each run's own steps (compiling steps at
the run's median step time, the rest as ``compile_seconds``; evaluation excluded). The validation
loss uses fixed batches and masks, with every layer run. Writes a JSON and a PNG of loss against
steps and time. Checkpoints after every chunk allow ``--resume``.
"""
import logging
import os

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_prune.data import data_path, shakespeare_chars
from ms_prune.engine import Trainer
from ms_prune.engine.recipes import build_algorithms
from ms_prune.models.bert import BertConfig, BertModel, activation
from ms_prune.models.modeling_utils import LayerNorm, Linear
from ms_prune.validation import check_ranges
from ms_prune.training import set_context, write_json

from harness import (FRACTION, NON_NEGATIVE, OPEN_FRACTION, POSITIVE, RATE, TimedRun, mean_ratio, per_seed,
                     plot_time_to_quality, race, resume_from_checkpoints, run_record, sample_cli, section_ranges,
                     time_to_quality)

KEYS = {"data", "model", "vocab_size", "seq_len", "batch_size", "mask_fraction", "steps", "quick_steps",
        "warmup_fraction", "weight_decay", "baseline", "pld", "sweep", "eval_every", "eval_batches",
        "eval_batches_quick", "seeds", "quick_seeds", "output_dir"}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DATA = ("char", "wordpiece")
RANGES = {"vocab_size": (len(SPECIAL) + 1, None), "seq_len": POSITIVE,
          "batch_size": POSITIVE, "mask_fraction": OPEN_FRACTION, "steps": POSITIVE, "quick_steps": POSITIVE,
          "warmup_fraction": FRACTION, "weight_decay": NON_NEGATIVE, "eval_every": POSITIVE,
          "eval_batches": POSITIVE, "eval_batches_quick": POSITIVE, "seeds": NON_NEGATIVE,
          "quick_seeds": NON_NEGATIVE,
          **section_ranges("model", num_hidden_layers=POSITIVE, hidden_size=POSITIVE, num_attention_heads=POSITIVE,
                           intermediate_size=POSITIVE, dropout=(0, 1)),
          **section_ranges("baseline", learning_rate=RATE),
          **section_ranges("pld", learning_rate=RATE, theta=OPEN_FRACTION, gamma_times_steps=NON_NEGATIVE)}
PLD_RANGES = {"learning_rate": RATE, "theta": OPEN_FRACTION, "gamma_times_steps": NON_NEGATIVE}


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


def timed_run(name, config, vocab, steps, seed, section, batches, val_batches, checkpoints, resume):
    """A TimedRun of the baseline (``section`` without ``theta``) or of PLD (``section``: theta,
    gamma_times_steps, learning_rate)."""
    m = config["model"]
    ms.set_seed(seed)  # every run of a seed starts from the same weights
    bert = BertModel(BertConfig(
        vocab_size=vocab, hidden_size=m["hidden_size"], num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"], intermediate_size=m["intermediate_size"],
        hidden_dropout_prob=m["dropout"], attention_probs_dropout_prob=m["dropout"],
        max_position_embeddings=config["seq_len"], pre_layer_norm=True))
    recipe = {"progressive_layer_drop": {"theta": section["theta"], "gamma": section["gamma_times_steps"] / steps}
              } if "theta" in section else {}
    schedule = learning_rates(section["learning_rate"], steps, int(config["warmup_fraction"] * steps))

    def adamw(params):
        return nn.AdamWeightDecay(params, learning_rate=schedule, weight_decay=config["weight_decay"])
    resume_from = resume_from_checkpoints(checkpoints, resume)
    trainer = Trainer(bert, MLMHead(bert), batches, max_steps=steps, algorithms=build_algorithms(recipe, path=name),
                      optimizer=adamw, num_inputs=1, log_interval=0, checkpoint_dir=checkpoints,
                      checkpoint_interval=config["eval_every"], resume_from=resume_from, seed=seed)

    def validation_loss(trainer):
        loss_net = trainer.state.loss_net  # model + head as one Cell: one evaluation graph
        loss_net.set_train(False)
        loss = float(np.mean([float(loss_net(*[Tensor(x) for x in b]).asnumpy()) for b in val_batches]))
        loss_net.set_train(True)
        return loss
    return TimedRun(name, trainer, validation_loss, os.path.join(checkpoints, "curve.json"))


def tokens(config):
    """(train ids, val ids, vocabulary size, [MASK] id); BERT's special tokens come first."""
    if config["data"] == "char":
        (train, val), chars = shakespeare_chars()
        return train + len(SPECIAL), val + len(SPECIAL), len(chars) + len(SPECIAL), SPECIAL.index("[MASK]")
    with open(data_path("tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read()
    split = int(len(text) * 0.9)
    tokenizer = wordpiece(text[:split], config["vocab_size"])
    return (encode(tokenizer, text[:split]), encode(tokenizer, text[split:]), tokenizer.get_vocab_size(),
            tokenizer.token_to_id("[MASK]"))


def main(argv=None):
    args, config = sample_cli(__file__, __doc__, KEYS, "quick_steps steps, quick_seeds (under 15 minutes on CPU)", argv,
                              ranges=RANGES, extra_arguments=[
                                  ("--resume", dict(action="store_true", help="continue from the last checkpoints")),
                                  ("--sweep", dict(action="store_true", help="race each PLD setting of the config's "
                                                   "sweep against one baseline (first seed)"))])
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    if config["data"] not in DATA:
        raise ValueError(f"{args.config}: data must be one of {DATA}, got {config['data']!r}")
    for i, setting in enumerate(config["sweep"]):
        check_ranges(args.config, {f"sweep[{i}]": setting}, {f"sweep[{i}].{k}": r for k, r in PLD_RANGES.items()})
    seeds = config["quick_seeds"] if args.quick else config["seeds"]
    seeds = seeds[:1] if args.sweep else seeds
    set_context("graph", args.device_target, seed=seeds[0])
    steps = config["quick_steps"] if args.quick else config["steps"]
    eval_count = config["eval_batches_quick"] if args.quick else config["eval_batches"]
    seq, batch = config["seq_len"], config["batch_size"]
    count = max(1, round(config["mask_fraction"] * seq))

    train, val, vocab, mask_id = tokens(config)
    print(f"tiny Shakespeare ({config['data']}): {len(train):,} train / {len(val):,} val tokens, vocab {vocab}; "
          f"{steps} steps per run, batch {batch} x {seq}, {count} masked per sequence, seeds {seeds}", flush=True)
    val_rng = np.random.default_rng(1234)
    val_batches = [mask_batch(val, batch, seq, count, vocab, mask_id, val_rng) for _ in range(eval_count)]
    settings = {"pld": config["pld"]} if not args.sweep else {
        "pld_" + "_".join(f"{k}{v:g}" for k, v in sorted(s.items())): s for s in config["sweep"]}
    name = os.path.splitext(os.path.basename(args.json))[0]
    work = os.path.join(config["output_dir"], name + "_checkpoints")

    comparisons, records = [], []
    for seed in seeds:
        def batches(step, seed=seed):  # the same batches for every run of a seed, any step's again on resume
            return mask_batch(train, batch, seq, count, vocab, mask_id, np.random.default_rng((seed + 1, step)))
        runs = [timed_run(run_name, config, vocab, steps, seed, section, batches, val_batches,
                          os.path.join(work, f"{run_name}_seed{seed}"), args.resume)
                for run_name, section in [("baseline", config["baseline"])] + list(settings.items())]
        race(runs, steps, config["eval_every"], log=lambda line, seed=seed: print(f"seed {seed} {line}", flush=True))
        baseline = runs[0]
        for run in runs:
            records.append(dict(run_record(run), seed=seed, label=f"{run.name} (seed {seed})",
                                settings=settings.get(run.name, config["baseline"])))
        for run in runs[1:]:
            comparison = dict(time_to_quality(baseline, run), seed=seed, name=run.name, settings=settings[run.name],
                              time_per_step_ratio=run.median_step_seconds / baseline.median_step_seconds)
            comparisons.append(comparison)
            ratio = comparison["time_to_baseline_quality"]
            print(f"seed {seed} {run.name}: final loss {run.curve[-1][2]:.4f} (baseline {baseline.curve[-1][2]:.4f});"
                  f" time per step x{comparison['time_per_step_ratio']:.3f}; time to the baseline's final loss: "
                  + (f"x{ratio:.3f} of the baseline's" if ratio is not None else "not reached"), flush=True)

    names = ["baseline"] + list(settings)
    per_name = {n: [c["time_to_baseline_quality"] for c in comparisons if c["name"] == n] for n in settings}
    mean = {n: mean_ratio(r) for n, r in per_name.items()}
    os.makedirs(config["output_dir"], exist_ok=True)
    png = os.path.join(config["output_dir"], name + ".png")
    result = {
        "steps": steps, "quick": args.quick, "sweep": args.sweep, "config": config, "vocab": vocab, "seeds": seeds,
        "quality": "validation MLM loss (lower is better)",
        # per seed for the PLD run; with --sweep, {setting: per seed}
        "time_to_baseline_quality": per_name if args.sweep else per_name["pld"],
        "time_to_baseline_quality_mean": mean if args.sweep else mean["pld"],
        **per_seed(records, names),
        "comparisons": comparisons, "runs": records,
        "plot": plot_time_to_quality(records, png, "validation MLM loss",
                                     "Pre-LN BERT MLM on tiny Shakespeare: baseline vs progressive layer dropping"),
    }
    if not args.sweep:
        result["goal_met"] = mean["pld"] is not None and mean["pld"] < 1.0
        print("time to the baseline's final loss (PLD / baseline), per seed: "
              + ", ".join("not reached" if r is None else f"{r:.3f}" for r in per_name["pld"])
              + f"; goal (< 1 on average) {'met' if result['goal_met'] else 'NOT met'}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
