"""Knowledge distillation (ms_prune.distill): the KL against a numpy reference (temperature, top-k,
chunked == unchunked, the chunked backward == the analytic gradient), the loss mix, the frozen
teacher, the resume checks, and training with the graph-mode Trainer and in PyNative, composed
with random-LTD (the generic suite's row covers resume and Model.train)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from ms_prune.distill import (Distillation, DistillationKL, apply_distillation, distillation_loss,
                              remove_distillation)
from ms_prune.engine import Trainer
from ms_prune.token_drop import RandomLTD

from algorithms.algorithm_settings import lm_batch, lm_loss, tiny_gpt2, tiny_teacher


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reference(student, teacher, temperature, top_k=None):
    """(T^2 * mean-over-tokens KL(q || p), its gradient to the student's logits), in float64."""
    s = student.reshape(-1, student.shape[-1]).astype(np.float64) / temperature
    t = teacher.reshape(-1, teacher.shape[-1]).astype(np.float64) / temperature
    if top_k is not None:
        kth = np.sort(t, -1)[:, -top_k][:, None]
        t = np.where(t >= kth, t, -np.inf)
    log_q, log_p = log_softmax(t), log_softmax(s)
    q = np.exp(log_q)
    kl = (q * (np.where(q > 0, log_q, 0.0) - log_p)).sum(-1)
    n = s.shape[0]
    grad = temperature * (np.exp(log_p) - q) / n
    return temperature ** 2 * kl.mean(), grad.reshape(student.shape)


def logits(seed, shape=(2, 5, 37)):
    return (np.random.default_rng(seed).normal(size=shape) * 3).astype(np.float32)


# (temperature, top_k, vocab_chunk): 37 columns in one piece, in 8-column chunks (the last one 5
# wide, some holding none of the top-k), and in a chunk wider than the vocabulary
@pytest.mark.parametrize("temperature, top_k, chunk", [(1.0, None, None), (2.5, None, 8), (2.5, 4, 8), (1.0, 4, 100)])
def test_kl_and_its_chunked_backward_match_numpy(temperature, top_k, chunk, mode):
    student, teacher = logits(0), logits(1)
    expected, expected_grad = reference(student, teacher, temperature, top_k)
    pure = distillation_loss(Tensor(student), Tensor(teacher), temperature, top_k, chunk)
    kl = DistillationKL(temperature, top_k, chunk)
    np.testing.assert_allclose(float(pure.asnumpy()), expected, rtol=1e-5)
    np.testing.assert_allclose(float(kl(Tensor(student), Tensor(teacher)).asnumpy()), expected, rtol=1e-5)
    grad = ms.grad(kl, grad_position=(0, 1))(Tensor(student), Tensor(teacher))
    np.testing.assert_allclose(grad[0].asnumpy(), expected_grad, atol=1e-6)
    assert not grad[1].asnumpy().any()  # nothing flows to the teacher
    if mode == "pynative":  # the automatic gradient of the pure form agrees with the custom one
        auto = ms.grad(distillation_loss)(Tensor(student), Tensor(teacher), temperature, top_k, chunk)
        np.testing.assert_allclose(auto.asnumpy(), expected_grad, atol=1e-6)


def test_kl_is_zero_for_equal_distributions_and_half_precision_is_computed_in_float32():
    z = logits(2)
    assert abs(float(distillation_loss(Tensor(z), Tensor(z + 5.0), 2.0, None, 10).asnumpy())) < 1e-5
    half = distillation_loss(Tensor(logits(0), ms.float16), Tensor(logits(1), ms.float16), 2.0)
    assert half.dtype == ms.float32
    np.testing.assert_allclose(float(half.asnumpy()), reference(logits(0).astype(np.float16),
                                                                logits(1).astype(np.float16), 2.0)[0], rtol=1e-3)


class WithHidden(nn.Cell):
    """A model whose outputs are a tuple: (logits, final hidden states)."""

    def __init__(self, seed):
        super().__init__()
        ms.set_seed(seed)
        self.embed, self.head = nn.Embedding(20, 8), nn.Dense(8, 20)

    def construct(self, ids):
        hidden = self.embed(ids)
        return self.head(hidden), hidden


def task_loss(outputs, labels):
    return lm_loss(outputs[0], labels)


def test_loss_mixes_task_kl_and_hidden_terms(mode):
    student, teacher = WithHidden(0), WithHidden(1)
    ids, labels = (Tensor(np.random.default_rng(0).integers(0, 20, (2, 6)).astype(np.int32)) for _ in range(2))
    s_logits, s_hidden = (x.asnumpy() for x in student(ids))
    t_logits, t_hidden = (x.asnumpy() for x in teacher(ids))
    task = float(task_loss(student(ids), labels).asnumpy())
    net, = apply_distillation(student, teacher, task_loss, num_inputs=1, temperature=2.0, alpha=0.3,
                              hidden_weight=0.5, vocab_chunk=7, hidden_output=1).cells
    expected = 0.7 * task + 0.3 * reference(s_logits, t_logits, 2.0)[0] + 0.5 * np.mean((s_hidden - t_hidden) ** 2)
    np.testing.assert_allclose(float(net(ids, labels).asnumpy()), expected, rtol=1e-5)
    remove_distillation(student)


def test_teacher_is_frozen_and_thawed_and_bad_arguments_are_named():
    student, teacher = tiny_gpt2(), tiny_teacher()
    names = [p.name for p in teacher.get_parameters()]
    teacher.set_train(True)
    net, = apply_distillation(student, teacher, lm_loss).cells
    assert not teacher.training and not any(p.requires_grad for p in teacher.get_parameters())
    assert all(p.name.startswith("distillation_teacher.") for p in teacher.get_parameters())
    assert not {id(p) for p in teacher.get_parameters()} & {id(p) for p in net.trainable_params()}
    net.set_train(True)  # Model.train does this to its whole network; the teacher stays in evaluation
    assert not teacher.training
    with pytest.raises(ValueError, match="already being distilled"):
        apply_distillation(student, teacher, lm_loss)
    assert remove_distillation(student) is student
    with pytest.raises(ValueError, match="not being distilled"):
        remove_distillation(student)
    assert [p.name for p in teacher.get_parameters()] == names and teacher.training
    assert all(p.requires_grad for p in teacher.get_parameters())
    with pytest.raises(ValueError, match="temperature"):
        Distillation(teacher, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        Distillation(teacher, alpha=1.5)
    with pytest.raises(ValueError, match="hidden_output"):
        Distillation(teacher, hidden_weight=0.1)
    with pytest.raises(TypeError, match="teacher"):
        Distillation("gpt2")
    with pytest.raises(ValueError, match="student itself"):
        apply_distillation(student, student, lm_loss)


def run(steps, teacher=None, **settings):
    ms.set_seed(0)
    student = tiny_gpt2()
    distillation = Distillation(teacher or tiny_teacher(), **settings)
    ltd = RandomLTD(min_value=8, max_value=16, require_steps=2, seq_per_step=8)  # kept 8, then 16 tokens
    trainer = Trainer(student, lm_loss, lm_batch, max_steps=steps, lr=3e-3, algorithms=[distillation, ltd],
                      log_interval=0)
    return trainer, distillation


def test_trains_a_gpt2_student_with_random_ltd(mode):
    """The paper's setting: the pruned student recovers on fewer tokens per layer (random-LTD) while
    it learns the teacher's distributions; the teacher sees every token and is not trained."""
    teacher = tiny_teacher()
    before = [p.asnumpy().copy() for p in teacher.get_parameters()]
    trainer, _ = run(6, teacher, temperature=2.0, alpha=0.8, top_k=16, vocab_chunk=16)
    losses = [r["loss"] for r in trainer.fit()]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert trainer.compilations == 2  # one step per kept length
    assert all(np.array_equal(p.asnumpy(), b) for p, b in zip(teacher.get_parameters(), before))
    assert not teacher.training


def test_resume_refuses_another_teacher_or_other_settings():
    trainer, _ = run(2, temperature=2.0)
    saved = trainer.state.algorithms[0].state_dict()
    other = tiny_gpt2()  # the same class and config, other weights
    with pytest.raises(ValueError, match="teacher differs"):
        Distillation(other, temperature=2.0).load_state_dict(saved)
    with pytest.raises(ValueError, match="temperature"):
        Distillation(tiny_teacher(), temperature=3.0).load_state_dict(saved)
    Distillation(tiny_teacher(), temperature=2.0, vocab_chunk=8).load_state_dict(saved)  # changes rounding only
