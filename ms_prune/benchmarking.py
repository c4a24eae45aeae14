"""Timing that holds up on a noisy machine: candidates are timed interleaved in one process and
compared by median, so load from elsewhere hits all of them alike."""
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
