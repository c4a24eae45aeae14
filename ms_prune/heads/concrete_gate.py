"""Hard-Concrete (stretched, rectified binary Concrete) gates on attention heads.

Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through L0 Regularization", as
used for heads by Voita et al. 2019. One ``log_a`` per head:

* training: u ~ U(eps, 1 - eps), s = sigmoid((log u - log(1 - u) + log_a) / T)
* evaluation: s = sigmoid(log_a) (no noise is drawn)
* gate = clip(s * (zeta - gamma) + gamma, 0, 1), (gamma, zeta) = ``stretch_limits``
* expected L0 (open gates) = sum sigmoid(log_a - T * log(-gamma / zeta))

The stretch beyond [0, 1] followed by the clip gives exact zeros and ones with non-zero
probability while staying differentiable in ``log_a`` in between.

The evaluation gate of a head whose formula value is <= ``threshold`` (default
``CLOSED_THRESHOLD`` = 0.5) is exactly 0, and so is that of a head the LRP decision drops
(``keep_mask``, written from the host by ``write_decision``): evaluation, the training log and the
pruning follow one decision (``ms_prune.heads.lrp.decide_heads``), so the pruned model computes
what the gated model computes in evaluation. ``threshold=0`` gives the bare published evaluation
formula (what LRP uses with a head target: the decision alone closes heads).
"""
import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ms_prune.training import write_parameter

CLOSED_THRESHOLD = 0.5
# log_a of a head snapped shut: its evaluation gate is exactly 0 and its training gate is 0
# except with probability sigmoid(-12 + T*log(11)) ~ 1.4e-5; see ``close``.
CLOSED_LOG_A = -12.0


def open_log_a(stretch_limits=(-0.1, 1.1), margin=1.0):
    """The smallest log_a whose evaluation gate is exactly 1, plus ``margin``."""
    gamma, zeta = stretch_limits
    s_one = (1.0 - gamma) / (zeta - gamma)
    return math.log(s_one / (1.0 - s_one)) + margin


def check_gate_args(temperature, stretch_limits, l0_penalty, eps, threshold):
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"ConcreteGate: temperature must be a positive number, got {temperature!r}")
    try:
        gamma, zeta = (float(v) for v in stretch_limits)
    except (TypeError, ValueError):
        raise ValueError(f"ConcreteGate: stretch_limits must be a pair (gamma, zeta), got {stretch_limits!r}") from None
    if not (gamma < 0.0 and zeta > 1.0):
        raise ValueError(f"ConcreteGate: stretch_limits (gamma, zeta) need gamma < 0 < 1 < zeta (or no gate is "
                         f"ever exactly 0 or 1), got {stretch_limits!r}")
    if not isinstance(l0_penalty, (int, float)) or isinstance(l0_penalty, bool) or l0_penalty < 0:
        raise ValueError(f"ConcreteGate: l0_penalty must be a number >= 0, got {l0_penalty!r}")
    if not isinstance(eps, (int, float)) or not 0 < eps < 0.5:
        raise ValueError(f"ConcreteGate: eps must be in (0, 0.5), got {eps!r}")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold < 1:
        raise ValueError(f"ConcreteGate: threshold must be in [0, 1), got {threshold!r}")
    return gamma, zeta


class ConcreteGate(nn.Cell):
    """One Hard-Concrete gate per head of one attention layer.

    ``construct(values)`` multiplies ``values`` (..., heads, head_dim) (the per-head context that
    the attention's output projection reads, ``ms_prune.protocol.GatedInput``) by the gates:
    noisy, differentiable gates while the Cell is in training mode (``set_train(True)``),
    deterministic ones otherwise. Train versus eval is a
    compile-time branch on ``self.training``, so evaluation graphs contain no random op.
    Gates start open (evaluation gate 1) unless ``init_log_a`` says otherwise.
    """

    def __init__(self, num_heads, temperature=0.33, stretch_limits=(-0.1, 1.1), l0_penalty=1.0, eps=1e-6,
                 threshold=CLOSED_THRESHOLD, init_log_a=None, host_noise=False):
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads <= 0:
            raise ValueError(f"ConcreteGate: num_heads must be a positive int, got {num_heads!r}")
        self.gamma, self.zeta = check_gate_args(temperature, stretch_limits, l0_penalty, eps, threshold)
        self.num_heads = int(num_heads)
        self.temperature = float(temperature)
        self.stretch_limits = (self.gamma, self.zeta)
        self.l0_penalty = float(l0_penalty)
        self.eps = float(eps)
        self.threshold = float(threshold)
        # log of the stretched-gate odds shift in the expected-L0 formula: T * log(-gamma / zeta)
        self.l0_shift = self.temperature * math.log(-self.gamma / self.zeta)
        init = open_log_a(self.stretch_limits) if init_log_a is None else init_log_a
        values = np.broadcast_to(np.asarray(init, np.float32), (self.num_heads,)).copy()
        self.log_a = Parameter(Tensor(values), name="log_a")
        # The decision (1 kept, 0 dropped) that evaluation applies: written from the host by the LRP
        # algorithm after each step (``write_decision``), so evaluation, the training log and the
        # pruning all follow the same decision at any point of training, also with a head target.
        self.keep_mask = Parameter(Tensor(np.ones((self.num_heads,), np.float32)), name="keep_mask",
                                   requires_grad=False)
        # host_noise: the uniform draws come from the host (``write_noise``) instead of ops.rand, so
        # a run driven by the engine is reproducible and resumes to the same draws.
        self.host_noise = bool(host_noise)
        self.noise = Parameter(Tensor(np.full((self.num_heads,), 0.5, np.float32)), name="noise",
                               requires_grad=False)

    def get_gates(self, is_train):
        """(num_heads,) gate values: noisy when ``is_train``, else deterministic (see module doc)."""
        if is_train:
            u = self.noise if self.host_noise else ops.rand((self.num_heads,), dtype=ms.float32)
            u = u * (1.0 - 2.0 * self.eps) + self.eps
            s = ops.sigmoid((ops.log(u) - ops.log(1.0 - u) + self.log_a) / self.temperature)
            return ops.clamp(s * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)
        gates = ops.clamp(ops.sigmoid(self.log_a) * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)
        return gates * (gates > self.threshold).astype(gates.dtype) * self.keep_mask

    def construct(self, values):
        gates = self.get_gates(self.training)
        return values * gates.reshape(self.num_heads, 1).astype(values.dtype)

    def get_penalty(self):
        """``l0_penalty`` times the expected number of open gates (a differentiable scalar)."""
        return ops.sigmoid(self.log_a - self.l0_shift).sum() * self.l0_penalty

    # ---- host-side helpers (not for construct) ------------------------------------------------
    def raw_gate_values(self):
        """The published evaluation formula, before the threshold (numpy)."""
        log_a = self.log_a.asnumpy().astype(np.float64)
        return np.clip(1.0 / (1.0 + np.exp(-log_a)) * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def gate_values(self, keep_positions=None):
        """Evaluation gate values as a numpy array (exactly what ``get_gates(False)`` gives), or what
        it would give under the decision ``keep_positions`` (not written)."""
        mask = self.keep_mask.asnumpy()
        if keep_positions is not None:
            mask = np.zeros((self.num_heads,), np.float32)
            mask[list(keep_positions)] = 1.0
        gates = self.raw_gate_values() * mask
        return np.where(gates > self.threshold, gates, 0.0).astype(np.float32)

    def write_decision(self, keep_positions):
        """Evaluation keeps exactly the heads at ``keep_positions`` (the others give 0)."""
        mask = np.zeros((self.num_heads,), np.float32)
        mask[list(keep_positions)] = 1.0
        write_parameter(self.keep_mask, mask)

    def write_noise(self, rng):
        """This step's uniform draws, from the numpy Generator ``rng`` (with ``host_noise``)."""
        write_parameter(self.noise, rng.random(self.num_heads, dtype=np.float32))

    def expected_open(self):
        log_a = self.log_a.asnumpy().astype(np.float64)
        return float(np.sum(1.0 / (1.0 + np.exp(-(log_a - self.l0_shift)))))

    def keep(self, positions):
        """Keep only the gates at ``positions`` (the layer's heads were pruned)."""
        positions = [int(p) for p in positions]
        for name in ("log_a", "keep_mask", "noise"):
            old = getattr(self, name)
            kept = old.asnumpy()[positions] if positions else np.zeros((0,), np.float32)
            setattr(self, name, Parameter(Tensor(np.ascontiguousarray(kept, np.float32)), name=old.name,
                                          requires_grad=old.requires_grad))
        self.num_heads = len(positions)

    def close(self, positions):
        """Snap the gates at ``positions`` shut (evaluation gate exactly 0)."""
        log_a = self.log_a.asnumpy().copy()
        if not len(positions):
            return
        log_a[list(positions)] = CLOSED_LOG_A
        self.log_a.set_data(Tensor(log_a))

    def set_log_a(self, values):
        self.log_a.set_data(Tensor(np.asarray(values, np.float32).reshape(self.num_heads)))

    def extend_repr(self):
        return (f"num_heads={self.num_heads}, temperature={self.temperature}, stretch_limits={self.stretch_limits}, "
                f"l0_penalty={self.l0_penalty}, threshold={self.threshold}")
