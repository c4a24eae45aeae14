"""Trainer(precision=...): float16 compute with float32 master weights and dynamic loss scaling
(skipped overflowing steps, the scale's growth, exact resume), its combinations with gradient
accumulation and clipping, algorithms' tensors kept float32, and bfloat16 refused by name on CPU;
GRAPH_MODE and PyNative."""
import logging

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from ms_prune.engine import Trainer
from ms_prune.training import mixed_precision, set_context
from algorithms.algorithm_settings import VOCAB, lm_batch, lm_loss
from ms_prune.engine.trainer import ModelLoss
from ms_prune.gradnas.masks import attach_masks
from ms_prune.heads import LRP
from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel

# gradients of the logits reach loss_scale / 64 here (4 x 16 tokens): 2**24 overflows float16
# (65504) in the backward pass, 2**60 certainly, while the scaled float32 loss stays finite
OVERFLOWING_SCALE = 2.0 ** 60


def small_gpt2():
    # one layer: each precision's graphs compile in a few seconds
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def train(steps=3, **kwargs):
    ms.set_seed(0)
    kwargs.setdefault("log_interval", 0)
    trainer = Trainer(small_gpt2(), lm_loss, lm_batch, max_steps=steps, **kwargs)
    return trainer, [r["loss"] for r in trainer.fit()]


def weights(trainer):
    return {p.name: p.asnumpy().copy() for p in trainer.state.optimizer.parameters}


def optimizer_state(trainer):
    return {p.name: p.asnumpy().copy() for p in trainer.state.optimizer.get_parameters()
            if p.name.startswith(("adam_m", "adam_v", "global_step"))}


def test_fp16_loss_is_close_to_fp32_and_the_scale_grows(mode):
    _, fp32 = train()
    trainer, fp16 = train(precision="fp16", loss_scale=16.0, loss_scale_window=2)
    np.testing.assert_allclose(fp16, fp32, rtol=2e-3)
    assert fp16 != fp32  # the matrix products did run in float16
    assert trainer.summary["skipped_steps"] == 0 and trainer.summary["precision"] == "fp16"
    # doubled after 2 good steps in a row, 1 good step since
    assert trainer._loss_scale.state_dict() == {"scale": 32.0, "good_steps": 1, "skipped_steps": 0}
    assert {p.dtype for p in trainer.state.model.get_parameters()} == {ms.float32}
    assert {p.dtype for p in trainer.state.optimizer.get_parameters()} <= {ms.float32, ms.int32}


def test_an_overflowing_step_is_skipped_and_halves_the_scale(graph, caplog):
    ms.set_seed(0)
    trainer = Trainer(small_gpt2(), lm_loss, lm_batch, max_steps=2, precision="fp16", loss_scale=OVERFLOWING_SCALE,
                      log_interval=1)
    before, moments = weights(trainer), optimizer_state(trainer)
    with caplog.at_level(logging.INFO, logger="ms_prune.trainer"):
        history = trainer.fit()
    assert f"loss scale {OVERFLOWING_SCALE / 2:g}, 1 skipped" in caplog.text
    assert "2 skipped (float16 overflow)" in caplog.text
    assert [r["skipped"] for r in history] == [True, True]
    assert all(np.isfinite(r["loss"]) for r in history)
    after = weights(trainer)
    assert all(np.array_equal(before[name], after[name]) for name in before)
    assert all(np.array_equal(moments[name], value) for name, value in optimizer_state(trainer).items())
    assert trainer._loss_scale.state_dict() == {"scale": OVERFLOWING_SCALE / 4, "good_steps": 0, "skipped_steps": 2}
    assert trainer.summary["skipped_steps"] == 2


def test_the_loss_scale_resumes_exactly(mode, tmp_path):
    # 2**24 overflows for the first steps (an overflowing step is skipped in either mode), then the
    # scale grows every 2 good steps: the checkpoint at step 3 holds a scale, a good-step count and
    # skipped steps that all matter for step 4; clipped, as the unscaled gradients are
    settings = dict(precision="fp16", loss_scale=2.0 ** 24, loss_scale_window=2, max_grad_norm=0.5,
                    checkpoint_dir=str(tmp_path), checkpoint_interval=3, keep_checkpoints=5)
    whole, losses = train(steps=6, **settings)
    resumed, resumed_losses = train(steps=6, resume_from=str(tmp_path / "step_3"), **settings)
    assert resumed_losses == losses[3:]
    assert resumed._loss_scale.state_dict() == whole._loss_scale.state_dict()
    assert whole._loss_scale.state_dict()["skipped_steps"] >= 1


def test_fp16_combines_with_accumulation_and_clipping_of_the_unscaled_gradients(graph):
    # SGD moves the weights by the clipped gradient itself (Adam would hide a wrongly scaled one):
    # two steps clipped to 0.05 at lr 0.5 move them by 0.025 to 0.05; clipping the scaled gradients
    # would move them 65536x less, not clipping at all far more
    def sgd(params):
        return nn.SGD(params, learning_rate=0.5)

    settings = dict(steps=2, optimizer=sgd, max_grad_norm=0.05, grad_accumulation=2, precision="fp16")
    ms.set_seed(0)
    initial = {p.name: p.asnumpy() for p in small_gpt2().trainable_params()}
    trainer, losses = train(**settings)
    moved = np.sqrt(sum(np.sum((v - initial[n]) ** 2) for n, v in weights(trainer).items()))
    assert 0.025 < moved <= 0.05 * 1.001 and trainer.summary["skipped_steps"] == 0
    # an overflowing accumulated update is skipped whole, and the buffers start clean after it
    skipping, losses = train(loss_scale=OVERFLOWING_SCALE, **settings)
    assert skipping._loss_scale.state_dict()["skipped_steps"] == 2 and np.all(np.isfinite(losses))
    assert all(np.array_equal(initial[n], v) for n, v in weights(skipping).items())


def test_lrp_gates_and_gradnas_masks_stay_fp32(graph):
    ms.set_seed(0)
    lrp = LRP(target_heads=1, warmup_steps=1, gate_lr=0.3)
    trainer = Trainer(small_gpt2(), lm_loss, lm_batch, max_steps=2, algorithms=[lrp], precision="fp16",
                      log_interval=0)
    gates = {p.name: p.asnumpy().copy() for p in lrp.parameters()}
    assert all(np.isfinite(r["loss"]) for r in trainer.fit())
    assert gates and {p.dtype for p in lrp.parameters()} == {ms.float32}
    assert any(not np.array_equal(gates[p.name], p.asnumpy()) for p in lrp.parameters())  # the log-alphas trained
    # GradNAS's scores are the gradients of its masks: float32 under float16 compute
    model = small_gpt2()
    attach_masks(model)
    masks = [p for p in model.get_parameters() if p.name.endswith(".mask")]
    net = ModelLoss(mixed_precision(model, "fp16"), lm_loss, 1)
    grads = ms.grad(net, None, masks)(*[ms.Tensor(x) for x in lm_batch(0)])
    assert masks and {g.dtype for g in grads} == {p.dtype for p in masks} == {ms.float32}
    assert all(np.all(np.isfinite(g.asnumpy())) and np.any(g.asnumpy() != 0) for g in grads)


def test_bf16_is_refused_on_cpu_naming_the_operator():
    with pytest.raises(RuntimeError, match=r"precision='bf16' cannot run on the CPU back-end: its MatMul kernel"):
        Trainer(small_gpt2(), lm_loss, lm_batch, max_steps=1, precision="bf16")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(precision="float16"), ValueError, r"Trainer: precision must be one of \['fp32', 'fp16', 'bf16'\], got "
                                            r"'float16'"),
    (dict(loss_scale=1024.0), ValueError, r"loss_scale and loss_scale_window apply to precision='fp16' only"),
    (dict(precision="fp16", loss_scale=0.5), ValueError, r"Trainer: loss_scale must be in \[1.0, inf\]"),
    (dict(precision="fp16", loss_scale_window=0), ValueError, r"Trainer: loss_scale_window must be an int in \[1"),
])
def test_precision_arguments_are_checked_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        Trainer(small_gpt2(), lm_loss, lm_batch, max_steps=1, **kwargs)


@pytest.fixture
def graph():
    set_context("graph", seed=0)
    yield
    set_context("pynative")
