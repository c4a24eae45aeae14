"""GRAPH_MODE training-step time of a 12-layer pre-LN BERT with progressive layer dropping at a
fixed theta = 0.5, against the same model without dropping, measured in one process.

Writes ``theoretical_speedup`` (FLOPs of a full step over the expected FLOPs of a PLD step, from
``forward_flops`` and E[layers run] = sum_l p_l; embeddings and head included) and
``measured_speedup`` (mean step time of the plain model over that of the converted one at theta =
0.5; the mean, since PLD's cost per step is random) and ``measured_speedup_same_graph`` (the
converted model at theta = 1, where every layer runs, over theta = 0.5: the same compiled step, so
only the dropping differs). Also ``realized_speedup``: the FLOPs ratio for the layers that actually ran during the
timed steps (the draws of a short run deviate from the expectation).

A second, smaller measurement shows that a dropped layer really costs nothing: one large layer
(L = 1, so p = theta) at theta = 1 (always run) and theta ~ 0 (always skipped), and the
compute-then-select alternative (``ops.select`` on the same decision), which saves nothing.

    python benchmarks/pld_speed.py --quick --json results/pld_speed.json
"""
import argparse
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_prune.layer_drop import PLDLayer, ProgressiveLayerDrop, convert_to_pld, expected_layers_run, pld_layers
from ms_prune.models.bert import BertConfig, BertModel
from ms_prune.training import make_train_step, set_context, write_json


class MaskedLMLossNet(nn.Cell):
    """BertModel + a vocabulary projection + cross-entropy on every position (a benchmark load)."""

    def __init__(self, bert, vocab_size):
        super().__init__()
        self.bert = bert
        self.head = nn.Dense(bert.config.hidden_size, vocab_size)

    def construct(self, input_ids, labels):
        hidden = self.bert(input_ids)[0]
        logits = self.head(hidden)
        return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class SelectPLDLayer(PLDLayer):
    """Compute-then-discard: the same keep decision and scaling, but both outcomes computed and
    one chosen with ``ops.select`` (what a framework without data-dependent control flow does)."""

    def construct(self, hidden_states, attention_bias):
        keep = self.keep_probability()
        output = self.layer(hidden_states, attention_bias)
        decision = self.uniform((1,))[0] < keep
        return ops.select(decision, hidden_states + (output - hidden_states) / keep, hidden_states)


class SumOfLayer(nn.Cell):
    def __init__(self, layer, bias):
        super().__init__()
        self.layer, self.bias = layer, bias

    def construct(self, hidden_states):
        return self.layer(hidden_states, self.bias).sum()


def timed(fn, args):
    start = time.perf_counter()
    fn(*args).asnumpy()
    return time.perf_counter() - start


def interleaved_means(steps, args, rounds, warmup, before_each=None, after_each=None):
    """Mean seconds per call of each step in ``steps`` ({name: fn}); calls interleaved, warm-up
    (compilation) not counted."""
    for _ in range(warmup):
        for name, fn in steps.items():
            if before_each:
                before_each(name)
            fn(*args).asnumpy()
    samples = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if before_each:
                before_each(name)
            samples[name].append(timed(steps[name], args))
            if after_each:
                after_each(name)
    return {name: float(np.mean(v)) for name, v in samples.items()}, samples


def build(config, vocab, pld=None, seed=0):
    ms.set_seed(seed)
    bert = BertModel(config)
    if pld is not None:
        convert_to_pld(bert, pld, seed=seed, count_runs=True)
    net = MaskedLMLossNet(bert, vocab)
    net.set_train(True)
    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-4)
    step = make_train_step(net, optimizer)
    step.set_train(True)
    return bert, step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="results/pld_speed.json")
    parser.add_argument("--device_target", default="CPU")
    parser.add_argument("--theta", type=float, default=0.5)
    args = parser.parse_args()
    set_context("graph", args.device_target, seed=0)

    layers, hidden, seq, batch, vocab = 12, 256, 128, 4, 1000
    rounds = 10 if args.quick else 30
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * hidden, max_position_embeddings=seq, pre_layer_norm=True)
    baseline_model, baseline_step = build(config, vocab)
    pld = ProgressiveLayerDrop(theta=args.theta)
    pld.set_theta(args.theta)
    pld_model, pld_step = build(config, vocab, pld)

    # FLOPs per step (forward; backward is ~2x forward for every part alike, so ratios hold)
    head = 2 * hidden * vocab * seq * batch
    full = baseline_model.forward_flops(seq, batch) + head
    one_layer = (BertModel(config.copy(num_hidden_layers=2)).forward_flops(seq, batch)
                 - BertModel(config.copy(num_hidden_layers=1)).forward_flops(seq, batch))
    rest = full - layers * one_layer
    expected = expected_layers_run(args.theta, layers)
    theoretical = full / (rest + expected * one_layer)

    rng = np.random.default_rng(0)
    data = (Tensor(rng.integers(0, vocab, (batch, seq)), ms.int32), Tensor(rng.integers(0, vocab, (batch, seq)), ms.int32))
    print(f"12-layer pre-LN BERT d={hidden}, batch {batch} x {seq}, theta={args.theta}: "
          f"E[layers run] = {expected:.2f} of {layers}; compiling and warming up ...", flush=True)
    # "pld_theta1" is the same converted model and compiled step at theta = 1 (every layer runs):
    # it isolates what dropping saves from what the converted graph costs or saves by itself.
    thetas = {"pld": args.theta, "pld_theta1": 1.0}
    before = {}

    def prepare(name):
        if name in thetas:
            pld.set_theta(thetas[name])
        before[name] = sum(int(l.runs.asnumpy()) for l in pld_layers(pld_model))

    def count_after(name):
        if name == "pld":
            ran.append(sum(int(l.runs.asnumpy()) for l in pld_layers(pld_model)) - before[name])

    ran = []
    means, samples = interleaved_means({"no_drop": baseline_step, "pld_theta1": pld_step, "pld": pld_step}, data,
                                       rounds, warmup=2, before_each=prepare, after_each=count_after)
    realized_layers = float(np.mean(ran))
    realized = full / (rest + realized_layers * one_layer)
    measured = means["no_drop"] / means["pld"]
    same_graph = means["pld_theta1"] / means["pld"]
    print(f"step time (means of {rounds}): unconverted {means['no_drop'] * 1e3:.1f} ms, converted at theta=1 "
          f"{means['pld_theta1'] * 1e3:.1f} ms, PLD theta={args.theta} {means['pld'] * 1e3:.1f} ms")
    print(f"layers run per PLD step: expected {expected:.2f}, realized {realized_layers:.2f}")
    print(f"theoretical_speedup {theoretical:.3f} (layers only: {layers / expected:.3f}), "
          f"realized_speedup {realized:.3f}, measured_speedup {measured:.3f} "
          f"(measured / theoretical = {measured / theoretical:.3f}); same graph at theta=1 over theta={args.theta}: "
          f"{same_graph:.3f}")

    # ---- does a dropped layer cost nothing? -------------------------------------------------
    big = BertConfig(vocab_size=vocab, hidden_size=512, num_hidden_layers=1, num_attention_heads=8,
                     intermediate_size=2048, max_position_embeddings=seq, pre_layer_norm=True,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    x = Tensor(rng.normal(size=(batch, seq, 512)).astype(np.float32))
    bias = Tensor(np.zeros((batch, 1, 1, seq), np.float32))
    micro = {}
    for name, cls in (("if", PLDLayer), ("select", SelectPLDLayer)):
        ms.set_seed(0)
        layer = BertModel(big).encoder.layer[0]
        theta_of = ProgressiveLayerDrop()
        wrapped = cls(layer, 1, 1, theta_of.theta_parameter, seed=1)
        wrapped.set_train(True)
        grad = ms.jit(ms.value_and_grad(SumOfLayer(wrapped, bias), None, wrapped.trainable_params()))

        def run(h, _grad=grad):
            return _grad(h)[0]

        def set_theta(which, _pld=theta_of):
            _pld.set_theta(1.0 if which == "kept" else 1e-7)

        means_micro, _ = interleaved_means({"kept": run, "dropped": run}, (x,), 6 if args.quick else 20, warmup=1,
                                           before_each=set_theta)
        micro[name] = {k: v * 1e3 for k, v in means_micro.items()}
        print(f"one layer d=512, fwd+bwd, '{name}': kept {micro[name]['kept']:.1f} ms, "
              f"dropped {micro[name]['dropped']:.1f} ms")

    write_json(args.json, {
        "config": {"layers": layers, "hidden": hidden, "seq": seq, "batch": batch, "vocab": vocab,
                   "theta": args.theta, "rounds": rounds, "mode": "GRAPH_MODE", "device": args.device_target},
        "theoretical_speedup": theoretical, "theoretical_speedup_layers_only": layers / expected,
        "measured_speedup": measured, "realized_speedup": realized,
        "measured_speedup_same_graph": same_graph,
        "measured_over_theoretical": measured / theoretical, "goal_met": bool(measured >= 0.9 * theoretical),
        "expected_layers_run": expected, "realized_layers_run": realized_layers,
        "step_ms": {k: v * 1e3 for k, v in means.items()},
        "step_ms_samples": {k: [t * 1e3 for t in v] for k, v in samples.items()},
        "one_layer_fwd_bwd_ms": micro,
    })


if __name__ == "__main__":
    main()
