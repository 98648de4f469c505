"""The KD loss against hand computation and the closed forms of Hinton et al. (2015)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdcli.losses import kd_loss


def softmax(z, T=1.0):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def test_kl_term_matches_hand_computation():
    # student [1,2,3], teacher [3,2,1], T=1: log(p_i/q_i) = (t_i - s_i) - (lse_t - lse_s) and the
    # two log-sum-exps are equal, so KL = sum p_i (t_i - s_i) = 2 p_1 - 2 p_3.
    p = softmax([3, 2, 1])
    expected = 2 * p[0] - 2 * p[2]
    assert expected == pytest.approx(1.1504, abs=1e-4)
    s, t, y = torch.tensor([[1.0, 2, 3]]), torch.tensor([[3.0, 2, 1]]), torch.tensor([0])
    loss, parts = kd_loss(s, t, y, T=1.0, alpha=0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["kl"].item() == pytest.approx(expected, rel=1e-6)


def test_full_loss_matches_formula_written_out():
    s = [[0.5, -1.0, 2.0, 0.0], [1.5, 0.2, -0.3, 0.9]]
    t = [[2.0, -0.5, 1.0, 0.1], [0.0, 1.0, -1.0, 3.0]]
    y = [2, 3]
    T, alpha = 3.0, 0.3
    ce = sum(-math.log(softmax(si)[yi]) for si, yi in zip(s, y)) / 2
    kl = 0.0
    for si, ti in zip(s, t):
        p, q = softmax(ti, T), softmax(si, T)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    kl /= 2  # batchmean
    expected = alpha * ce + (1 - alpha) * T * T * kl
    loss, parts = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), T=T, alpha=alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)


def test_gradient_is_T_times_q_minus_p_over_batch():
    torch.manual_seed(0)
    B, C, T = 5, 7, 4.0
    s = torch.randn(B, C, requires_grad=True)
    t = torch.randn(B, C)
    loss, _ = kd_loss(s, t, torch.zeros(B, dtype=torch.long), T=T, alpha=0.0)
    loss.backward()
    q, p = F.softmax(s.detach() / T, 1), F.softmax(t / T, 1)
    torch.testing.assert_close(s.grad, T * (q - p) / B)


def test_high_temperature_gradient_tends_to_logit_difference():
    # Hinton et al. 2015, section 2.1: with zero-mean logits and large T the gradient of the
    # T^2-scaled term approaches (z_s - z_t) / (C B).
    torch.manual_seed(1)
    B, C, T = 3, 10, 1000.0
    s = torch.randn(B, C, dtype=torch.float64)
    t = torch.randn(B, C, dtype=torch.float64)
    s, t = (s - s.mean(1, keepdim=True)).requires_grad_(), t - t.mean(1, keepdim=True)
    loss, _ = kd_loss(s, t, torch.zeros(B, dtype=torch.long), T=T, alpha=0.0)
    loss.backward()
    torch.testing.assert_close(s.grad, (s.detach() - t) / (C * B), rtol=1e-2, atol=1e-6)


def test_alpha_one_is_cross_entropy_and_identical_logits_cost_nothing():
    s = torch.tensor([[0.2, 1.0, -0.5], [2.0, 0.0, 0.1]])
    y = torch.tensor([1, 0])
    loss, _ = kd_loss(s, torch.randn(2, 3), y, T=4.0, alpha=1.0)
    assert loss.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    loss, _ = kd_loss(s, s.clone(), y, T=4.0, alpha=0.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_registry_losses_are_terms_of_the_objective():
    from kdcli.core.registry import LOSSES
    from kdcli.losses import Objective

    y = torch.tensor([0, 2])
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    # Without a teacher the objective is the plain cross-entropy, whatever alpha.
    ce, _ = Objective(LOSSES.build("kd"), T=4.0, alpha=0.1)(s, None, y)
    assert ce.item() == pytest.approx(F.cross_entropy(s, y).item())
    kd, parts = Objective(LOSSES.build("kd"), T=2.0, alpha=0.25)(s, [s.flip(1)], y)
    assert kd.item() == pytest.approx(kd_loss(s, s.flip(1), y, 2.0, 0.25)[0].item())
    assert set(parts) == {"ce", "kd"}
