"""ConcreteGate against the published Hard-Concrete formulas (Louizos et al. 2018; Voita et al.
2019), in GRAPH_MODE and PyNative."""
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from ms_prune.heads import CLOSED_THRESHOLD, ConcreteGate
from ms_prune.training import set_context

T, GAMMA, ZETA = 0.33, -0.1, 1.1


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def logit(p):
    return math.log(p / (1.0 - p))


def eval_formula(log_a):
    return np.clip(sigmoid(log_a) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def cdf(x, log_a):
    """P(training gate <= x) for 0 <= x < 1: s <= (x - gamma) / (zeta - gamma) with
    s = sigmoid((L + log_a) / T), L standard logistic."""
    return sigmoid(T * logit((x - GAMMA) / (ZETA - GAMMA)) - log_a)


@pytest.fixture(params=["graph", "pynative"])
def mode(request):
    set_context(request.param, seed=7)
    yield request.param
    set_context("graph")


class GateAndPenalty(nn.Cell):
    def __init__(self, gate):
        super().__init__()
        self.gate = gate

    def construct(self, values):
        return self.gate(values), self.gate.get_penalty()


def test_defaults_and_gates_start_open(mode):
    gate = ConcreteGate(5)
    assert (gate.temperature, gate.stretch_limits, gate.l0_penalty, gate.eps) == (0.33, (-0.1, 1.1), 1.0, 1e-6)
    assert gate.threshold == CLOSED_THRESHOLD
    gate.set_train(False)
    values = Tensor(np.ones((2, 3, 5, 4), np.float32))
    np.testing.assert_array_equal(gate(values).asnumpy(), 1.0)
    np.testing.assert_array_equal(gate.gate_values(), 1.0)


def test_eval_gates_are_the_formula_and_draw_no_noise(mode):
    log_a = np.array([4.0, 1.0, 0.3, 0.0, -0.2, -2.0, -5.0], np.float32)
    net = GateAndPenalty(ConcreteGate(7, threshold=0.0, init_log_a=log_a))
    net.set_train(False)
    values = Tensor(np.random.default_rng(0).normal(size=(2, 3, 7, 4)).astype(np.float32))
    out1, penalty = net(values)
    out2, _ = net(values)
    np.testing.assert_array_equal(out1.asnumpy(), out2.asnumpy())  # deterministic
    expected = values.asnumpy() * eval_formula(log_a).reshape(1, 1, 7, 1)
    np.testing.assert_allclose(out1.asnumpy(), expected, rtol=1e-5, atol=1e-6)
    expected_l0 = np.sum(sigmoid(log_a - T * math.log(-GAMMA / ZETA)))
    np.testing.assert_allclose(float(penalty.asnumpy()), expected_l0, rtol=1e-5)


def test_default_threshold_closes_gates_at_or_below_half(mode):
    log_a = np.array([1.0, 0.1, -0.1, -1.0], np.float32)
    gate = ConcreteGate(4, init_log_a=log_a)
    gate.set_train(False)
    raw = eval_formula(log_a)
    want = np.where(raw > 0.5, raw, 0.0)
    got = gate(Tensor(np.ones((4, 1), np.float32))).asnumpy().reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(gate.gate_values(), want, rtol=1e-5)
    assert got[2] == 0.0 and got[1] > 0.5


def test_training_noise_matches_the_hard_concrete_distribution(mode):
    # One call with many heads sharing log_a draws that many independent gates.
    n = 40000
    for log_a in (-0.5, 0.8):
        gate = ConcreteGate(n, init_log_a=log_a)
        gate.set_train(True)
        samples = gate(Tensor(np.ones((n, 1), np.float32))).asnumpy().reshape(-1)
        again = gate(Tensor(np.ones((n, 1), np.float32))).asnumpy().reshape(-1)
        assert not np.array_equal(samples, again)  # fresh noise every call, also when compiled
        assert samples.min() >= 0.0 and samples.max() <= 1.0
        p_zero = cdf(0.0, log_a)
        p_one = 1.0 - cdf(1.0 - 1e-12, log_a)
        tol = 5 * math.sqrt(0.25 / n)
        assert abs(np.mean(samples == 0.0) - p_zero) < tol
        assert abs(np.mean(samples == 1.0) - p_one) < tol
        assert abs(np.mean(samples <= 0.5) - cdf(0.5, log_a)) < tol
        # expected L0 is the probability of a non-zero gate
        expected_l0 = float(gate.get_penalty().asnumpy()) / n
        assert abs(np.mean(samples > 0.0) - expected_l0) < tol


def test_gradients_of_penalty_and_training_gates(mode):
    log_a = np.array([2.0, 0.0, -1.0], np.float32)
    gate = ConcreteGate(3, init_log_a=log_a, l0_penalty=0.25)
    net = GateAndPenalty(gate)
    net.set_train(True)

    def penalty_only(values):
        return net(values)[1]

    grad = ms.grad(penalty_only, None, [gate.log_a])(Tensor(np.ones((3, 1), np.float32)))[0].asnumpy()
    z = log_a - T * math.log(-GAMMA / ZETA)
    np.testing.assert_allclose(grad, 0.25 * sigmoid(z) * (1 - sigmoid(z)), rtol=1e-4)

    def gated_sum(values):
        return net(values)[0].sum()

    grads = [ms.grad(gated_sum, None, [gate.log_a])(Tensor(np.ones((3, 1), np.float32)))[0].asnumpy()
             for _ in range(20)]
    assert np.all(np.stack(grads) >= 0) and np.any(np.stack(grads) > 0)  # d gate / d log_a >= 0


def test_keep_and_close():
    gate = ConcreteGate(4, init_log_a=[1.0, 2.0, 3.0, 4.0])
    gate.keep([1, 3])
    assert gate.num_heads == 2
    np.testing.assert_array_equal(gate.log_a.asnumpy(), [2.0, 4.0])
    gate.close([0])
    assert gate.gate_values()[0] == 0.0 and gate.gate_values()[1] == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=0), "num_heads"),
    (dict(num_heads=2.5), "num_heads"),
    (dict(num_heads=2, temperature=0.0), "temperature"),
    (dict(num_heads=2, stretch_limits=(0.0, 1.1)), "stretch_limits"),
    (dict(num_heads=2, stretch_limits=(-0.1,)), "stretch_limits"),
    (dict(num_heads=2, l0_penalty=-1.0), "l0_penalty"),
    (dict(num_heads=2, eps=0.7), "eps"),
    (dict(num_heads=2, threshold=1.0), "threshold"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConcreteGate(**kwargs)


def test_gate_values_under_a_decision_not_written():
    gate = ConcreteGate(3)
    gate.set_log_a([4.0, 0.3, -5.0])
    written = gate.gate_values()
    np.testing.assert_array_equal(gate.gate_values([0]), [written[0], 0.0, 0.0])
    np.testing.assert_array_equal(gate.gate_values(), written)  # nothing was written
    gate.write_decision([0])
    np.testing.assert_array_equal(gate.gate_values(), gate.gate_values([0]))
