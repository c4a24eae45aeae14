"""Small pieces every sample, benchmark and algorithm test needs: context set-up, a compiled
training step, result files."""
import json
import os

import mindspore as ms
from mindspore import nn, ops


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


def make_train_step(loss_net, optimizer, jit=True):
    """One step of ``loss = loss_net(*inputs)``, its gradients and the optimizer update.

    Compiled with ``ms.jit`` (graph mode) unless ``jit=False``; returns the loss. Works the same
    whatever the global mode, so tests can run both.
    """
    grad_fn = ms.value_and_grad(loss_net, None, optimizer.parameters)

    def step(*inputs):
        loss, grads = grad_fn(*inputs)
        optimizer(grads)
        return loss

    return ms.jit(step) if jit else step


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
        loss = ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        if self.with_penalty:
            return loss + outputs[1]
        return loss


def write_json(path, result):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, sort_keys=True)
        print(f"wrote {path}")
