"""Trainer options of issue #21 (items 4 and 6): gradient accumulation equal to one update on the
larger batch, clipping to a global norm, learning-rate schedules that resume, weight-decay groups,
progress printed without any logging set-up, and the summary of a fit; GRAPH_MODE and PyNative."""
import logging
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from ms_prune.engine import Algorithm, Event, Trainer
from ms_prune.engine.trainer import lr_multiplier
from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
from ms_prune.training import lm_cross_entropy

VOCAB = 40


def tiny_gpt2():
    ms.set_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def big_batch(step, rows=4):
    ids = np.random.default_rng(step).integers(0, VOCAB, (rows, 9)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def half_batch(index):
    """Micro-batch ``index``: half of ``big_batch(index // 2)``, so two micro-batches are one big batch."""
    inputs, labels = big_batch(index // 2)
    rows = slice(2 * (index % 2), 2 * (index % 2) + 2)
    return inputs[rows], labels[rows]


def sgd(lr):
    def build(params):
        return nn.SGD(params, learning_rate=lr)
    return build


def weights(model):
    return {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulation_equals_one_update_on_the_larger_batch(mode, optimizer):
    factory = sgd(0.5) if optimizer == "sgd" else None
    big_model, micro_model = tiny_gpt2(), tiny_gpt2()
    big = Trainer(big_model, lm_cross_entropy, big_batch, max_steps=3, optimizer=factory, log_interval=0)
    micro = Trainer(micro_model, lm_cross_entropy, half_batch, max_steps=3, optimizer=factory, grad_accumulation=2,
                    log_interval=0)
    big_losses = [r["loss"] for r in big.fit()]
    micro_losses = [r["loss"] for r in micro.fit()]
    np.testing.assert_allclose(micro_losses, big_losses, rtol=1e-5, atol=1e-6)
    before, after, accumulated = weights(tiny_gpt2()), weights(big_model), weights(micro_model)
    assert max(np.abs(after[n] - before[n]).max() for n in before) > 1e-3, "training changed nothing"
    for name in after:
        np.testing.assert_allclose(accumulated[name], after[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert micro.state.step == 3 and micro.state.batches == 6 and micro.state.samples == big.state.samples


@pytest.mark.parametrize("grad_accumulation", [1, 2])
def test_max_grad_norm_bounds_the_update(mode, grad_accumulation):
    lr, max_norm = 100.0, 1e-3

    def update_norm(**kwargs):
        model = tiny_gpt2()
        before = weights(model)
        Trainer(model, lm_cross_entropy, half_batch, max_steps=1, optimizer=sgd(lr), log_interval=0,
                grad_accumulation=grad_accumulation, **kwargs).fit()
        after = weights(model)
        return math.sqrt(sum(float(np.sum((after[n] - before[n]) ** 2)) for n in before))

    # SGD moves by lr * gradient: a clipped gradient of global norm max_norm moves lr * max_norm
    assert update_norm() > 10 * lr * max_norm
    np.testing.assert_allclose(update_norm(max_grad_norm=max_norm), lr * max_norm, rtol=1e-3)


class LearningRates(Algorithm):
    """Records the learning rate each step trained with."""

    def __init__(self):
        self.seen = []

    def match(self, event, state):
        return event == Event.BATCH_END

    def apply(self, event, state, logger):
        self.seen.append(float(state.optimizer.learning_rate.asnumpy()))


def test_lr_multiplier_values():
    assert [lr_multiplier("constant", t, 6, 2) for t in range(6)] == [0.5, 1, 1, 1, 1, 1]
    assert [lr_multiplier("linear", t, 6, 2) for t in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    np.testing.assert_allclose([lr_multiplier("cosine", t, 6, 2) for t in range(2, 6)],
                               [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2])
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_multiplier("step", 0, 6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_schedule_is_written_each_step_and_resumes(mode, schedule, tmp_path):
    def run(steps, **kwargs):
        recorder = LearningRates()
        trainer = Trainer(tiny_gpt2(), lm_cross_entropy, big_batch, max_steps=6, lr=0.01, lr_schedule=schedule,
                          warmup_steps=2, algorithms=[recorder], log_interval=0, checkpoint_dir=str(tmp_path),
                          **kwargs)
        trainer.max_steps = steps
        return [r["loss"] for r in trainer.fit()], recorder.seen

    losses, seen = run(6, checkpoint_interval=3)
    expected = [0.01 * lr_multiplier(schedule, t, 6, 2) for t in range(6)]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)
    assert seen[0] == pytest.approx(0.005) and seen[-1] < 0.003
    resumed_losses, resumed_seen = run(6, resume_from=str(tmp_path / "step_3"))
    np.testing.assert_allclose(resumed_seen, expected[3:], rtol=1e-6)
    assert resumed_losses == losses[3:]


def test_a_schedule_needs_number_learning_rates():
    def scheduled(params):
        return nn.AdamWeightDecay(params, learning_rate=[1e-3, 1e-3, 1e-3])
    with pytest.raises(ValueError, match=r"lr_schedule='linear'.*schedule of its own"):
        Trainer(tiny_gpt2(), lm_cross_entropy, big_batch, max_steps=3, optimizer=scheduled, lr_schedule="linear")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(grad_accumulation=0), ValueError, "grad_accumulation"), (dict(grad_accumulation=1.5), TypeError,
                                                                   "grad_accumulation"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"), (dict(max_grad_norm="1"), TypeError, "max_grad_norm"),
    (dict(lr_schedule="step"), ValueError, "lr_schedule"), (dict(warmup_steps=5), ValueError, "warmup_steps"),
    (dict(no_decay="bias"), TypeError, "no_decay")])
def test_new_options_are_checked_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        Trainer(tiny_gpt2(), lm_cross_entropy, big_batch, max_steps=4, **kwargs)


class Gate(Algorithm):
    """Trains a 2-D tensor of its own in a group that does not mention weight decay."""

    def __init__(self):
        self.gate = Parameter(Tensor(np.ones((2, 2), np.float32)), name="gate.log_a")

    def match(self, event, state):
        return False

    def apply(self, event, state, logger):
        pass

    def param_groups(self, state):
        return [{"params": [self.gate], "lr": 0.1}]

    def parameters(self):
        return [self.gate]


def decay_of(trainer):
    optimizer = trainer.state.optimizer
    decay = optimizer.weight_decay  # one value per Parameter with groups, else one for all
    decay = decay if isinstance(decay, tuple) else [decay] * len(optimizer.parameters)
    return {p.name: float(wd.asnumpy()) for p, wd in zip(optimizer.parameters, decay)}


def test_weight_decay_spares_norms_biases_and_gates():
    trainer = Trainer(tiny_gpt2(), lm_cross_entropy, big_batch, max_steps=1, weight_decay=0.1, algorithms=[Gate()],
                      log_interval=0)
    decay = decay_of(trainer)
    params = {p.name: p for p in trainer.state.optimizer.parameters}
    assert decay.pop("gate.log_a") == 0.0
    assert {n for n, wd in decay.items() if wd == 0.0} == {n for n in decay if len(params[n].shape) <= 1}
    np.testing.assert_allclose([wd for n, wd in decay.items() if len(params[n].shape) > 1], 0.1, rtol=1e-6)
    everything = Trainer(tiny_gpt2(), lm_cross_entropy, big_batch, max_steps=1, weight_decay=0.1, no_decay=None,
                         log_interval=0)
    np.testing.assert_allclose(list(decay_of(everything).values()), 0.1, rtol=1e-6)


def test_progress_is_printed_without_logging_set_up(monkeypatch, capsys):
    # as in a plain script: no handler anywhere (pytest installs its own on the root logger)
    monkeypatch.setattr(logging.root, "handlers", [])
    trainer_logger = logging.getLogger("ms_prune.trainer")
    handlers, level = list(trainer_logger.handlers), trainer_logger.level
    Trainer(tiny_gpt2(), lm_cross_entropy, big_batch, max_steps=2, log_interval=1).fit()
    printed = capsys.readouterr().out
    assert "step 1/2 | loss" in printed and "step 2/2 | loss" in printed
    assert "Trainer: 2 steps in" in printed and "tokens/s" in printed
    assert trainer_logger.handlers == handlers and trainer_logger.level == level
    Trainer(tiny_gpt2(), lm_cross_entropy, big_batch, max_steps=2, log_interval=0).fit()
    assert capsys.readouterr().out == ""


def test_fit_summary(mode, caplog):
    trainer = Trainer(tiny_gpt2(), lm_cross_entropy, big_batch, max_steps=3, log_interval=3)
    with caplog.at_level(logging.INFO, logger="ms_prune.trainer"):
        trainer.fit()
    summary = trainer.summary
    assert summary["steps"] == 3 and summary["step"] == 3 and summary["tokens"] == 3 * 4 * 8
    assert summary["compilations"] == trainer.compilations >= 1
    assert summary["tokens_per_second"] > 0 and summary["peak_host_memory_mb"] > 0
    assert summary["peak_device_memory_mb"] is None  # CPU: MindSpore does not count it
    assert any("Trainer: 3 steps in" in r.getMessage() for r in caplog.records)
    trainer.max_steps = 4
    trainer.fit()
    assert trainer.summary["steps"] == 1 and trainer.summary["compilations"] == 0
