"""The distillation losses against their papers' formulas, computed independently.

Every expected value here is written out from the paper's formula with plain Python (lists,
loops and the math module) on tiny hand-made or seeded inputs; the implementation's helpers
are never used to build an expected value. Where the arithmetic is small enough, a constant
computed by hand is checked as well (the arithmetic is in the comment next to it).

    kdcli/losses/logit.py      kd, soft_ce, mse, dkd, dist, ls / standardize, kd_loss
    kdcli/losses/feature.py    at, rkd (distance, angle), pkt, sp, nst, fitnet, crd
    kdcli/losses/objective.py  Schedule, merge_teachers, confidence_weights, Objective
"""

from __future__ import annotations

import math

import pytest
import torch

import kdcli.losses.logit  # noqa: F401  (registers the logit losses)
from kdcli.core.errors import KdError
from kdcli.core.registry import LOSSES
from kdcli.losses.feature import (
    FEATURE_LOSSES,
    Shapes,
    at_loss,
    nst_loss,
    pkt_loss,
    rkd_angle,
    rkd_distance,
    sp_loss,
)
from kdcli.losses.logit import dist_term, dkd_term, kd_loss, kd_term, mse_term, soft_ce_term, standardize
from kdcli.losses.objective import FeatureTerm, Objective, Schedule, confidence_weights, merge_teachers

D = torch.float64
LN_1_125 = math.log(1.125)  # recurs in the hand values: 0.117783...

# ---------------------------------------------------------------- plain-Python reference helpers


def softmax(z, T=1.0):
    m = max(z)
    e = [math.exp((v - m) / T) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    """KL(p || q) = sum_i p_i log(p_i / q_i)."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def entropy(p):
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def l2normalize(v):
    n = math.sqrt(dot(v, v))
    return [x / n for x in v] if n > 0 else [0.0] * len(v)


def pearson(a, b):
    ma, mb = mean(a), mean(b)
    da, db = [x - ma for x in a], [y - mb for y in b]
    return dot(da, db) / (math.sqrt(dot(da, da)) * math.sqrt(dot(db, db)))


def huber(x):
    """Smooth L1 with beta = 1: 0.5 x^2 for |x| < 1, |x| - 0.5 otherwise."""
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def flat(x):
    """A nested list (C, H, W) or (D,) flattened row-major."""
    if isinstance(x, list):
        return [v for item in x for v in flat(item)]
    return [x]


def logits_of(probs, T=1.0):
    """Logits whose softmax(./T) is `probs` (T * log p)."""
    return [[T * math.log(p) for p in row] for row in probs]


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# ================================================================= logit terms
# ---------------------------------------------------------------- kd (Hinton et al. 2015)


def test_kd_term_hand_value():
    # T = 2, teacher logits [2 ln 2, 0, 0] -> softmax(t/2) = [2, 1, 1] / 4 = [.5, .25, .25];
    # student [0, 0, 0] -> uniform 1/3. KL = .5 ln(1.5) + 2 * .25 ln(.75) = .5 ln(1.125) = 0.0588915;
    # times T^2 = 4: 0.2355661.
    s = torch.zeros(1, 3, dtype=D)
    t = torch.tensor([[2 * math.log(2), 0.0, 0.0]], dtype=D)
    assert kd_term(s, t, 2.0).item() == pytest.approx(0.2355661, abs=1e-7)
    assert kd_term(s, t, 2.0).item() == pytest.approx(2 * LN_1_125, rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 2.5, 7.0])
def test_kd_term_is_T2_kl_teacher_student_per_sample(T):
    # Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T)), one value per sample.
    s, t = randn(3, 4, seed=0) * 2, randn(3, 4, seed=1) * 2
    expected = [T * T * kl(softmax(ti, T), softmax(si, T)) for si, ti in zip(s.tolist(), t.tolist())]
    value = kd_term(s, t, T)
    assert value.shape == (3,)
    assert value.tolist() == pytest.approx(expected, rel=1e-10)
    # The direction matters: KL(q || p) is a different number on these inputs.
    reverse = [T * T * kl(softmax(si, T), softmax(ti, T)) for si, ti in zip(s.tolist(), t.tolist())]
    assert value.tolist() != pytest.approx(reverse, rel=1e-3)


def test_kd_builder_is_kd_term():
    s, t, y = randn(3, 5, seed=2), randn(3, 5, seed=3), torch.tensor([0, 4, 2])
    expected = [16 * kl(softmax(ti, 4), softmax(si, 4)) for si, ti in zip(s.tolist(), t.tolist())]
    assert LOSSES.build("kd")(s, t, y, 4.0).tolist() == pytest.approx(expected, rel=1e-10)


def test_kd_loss_T1_hand_value():
    # T = 1, student [1, 2, 3], teacher [3, 2, 1]: the log-sum-exps are equal, so
    # KL = sum p_i (t_i - s_i) = 2 p_0 - 2 p_2 with p = softmax([3, 2, 1]) = [.665241, .244728, .090031]:
    # 2 * (.665241 - .090031) = 1.150420.
    s, t, y = torch.tensor([[1.0, 2, 3]], dtype=D), torch.tensor([[3.0, 2, 1]], dtype=D), torch.tensor([0])
    loss, parts = kd_loss(s, t, y, T=1.0, alpha=0.0)
    assert loss.item() == pytest.approx(1.150420, abs=1e-6)
    assert parts["kl"].item() == pytest.approx(1.150420, abs=1e-6)


def test_kd_loss_alpha_zero_is_batchmean_T2_kl():
    s, t, y = randn(4, 3, seed=4), randn(4, 3, seed=5), torch.tensor([0, 1, 2, 1])
    T = 3.0
    kls = [kl(softmax(ti, T), softmax(si, T)) for si, ti in zip(s.tolist(), t.tolist())]
    loss, parts = kd_loss(s, t, y, T=T, alpha=0.0)
    assert loss.item() == pytest.approx(T * T * mean(kls), rel=1e-10)
    assert parts["kl"].item() == pytest.approx(mean(kls), rel=1e-10)  # the logged KL is without T^2


def test_kd_loss_alpha_one_is_plain_cross_entropy():
    s, t, y = randn(4, 3, seed=6), randn(4, 3, seed=7), torch.tensor([2, 0, 1, 1])
    ce = mean(-math.log(softmax(si)[yi]) for si, yi in zip(s.tolist(), y.tolist()))
    loss, parts = kd_loss(s, t, y, T=4.0, alpha=1.0)
    assert loss.item() == pytest.approx(ce, rel=1e-10)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-10)
    # Hand value: logits [0, ln 3], label 1 -> softmax [1/4, 3/4] -> CE = ln(4/3) = 0.2876821.
    loss, _ = kd_loss(
        torch.tensor([[0.0, math.log(3)]], dtype=D), torch.zeros(1, 2, dtype=D), torch.tensor([1]), 2.0, 1.0
    )
    assert loss.item() == pytest.approx(0.2876821, abs=1e-7)


def test_kd_loss_mixes_ce_and_kd():
    # alpha * CE + (1 - alpha) * T^2 * batchmean KL.
    s, t, y = randn(3, 4, seed=8), randn(3, 4, seed=9), torch.tensor([3, 0, 1])
    T, alpha = 2.0, 0.3
    ce = mean(-math.log(softmax(si)[yi]) for si, yi in zip(s.tolist(), y.tolist()))
    kd = mean(kl(softmax(ti, T), softmax(si, T)) for si, ti in zip(s.tolist(), t.tolist()))
    loss, _ = kd_loss(s, t, y, T=T, alpha=alpha)
    assert loss.item() == pytest.approx(alpha * ce + (1 - alpha) * T * T * kd, rel=1e-10)


def test_kd_loss_gradient_is_T_q_minus_p_over_B():
    # d/dz_s [T^2 * mean_b KL(p || q)] = T (q - p) / B, q = softmax(z_s/T), p = softmax(z_t/T).
    B, T = 3, 2.5
    s, t = randn(B, 5, seed=10).requires_grad_(), randn(B, 5, seed=11)
    loss, _ = kd_loss(s, t, torch.zeros(B, dtype=torch.long), T=T, alpha=0.0)
    loss.backward()
    expected = [
        [T * (qi - pi) / B for qi, pi in zip(softmax(si, T), softmax(ti, T))]
        for si, ti in zip(s.detach().tolist(), t.tolist())
    ]
    torch.testing.assert_close(s.grad, torch.tensor(expected, dtype=D), rtol=1e-10, atol=1e-12)


def test_kd_loss_high_temperature_gradient_tends_to_logit_difference():
    # Hinton et al. 2015, section 2.1: for zero-mean logits and T >> |z|, T (q - p) / B approaches
    # (z_s - z_t) / (C B); the error is O(|z|^2 / (C B T)).
    B, C = 4, 5
    s, t = randn(B, C, seed=12), randn(B, C, seed=13)
    s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    limit = torch.tensor(
        [[(a - b) / (C * B) for a, b in zip(si, ti)] for si, ti in zip(s.tolist(), t.tolist())], dtype=D
    )

    def grad(T):
        z = s.clone().requires_grad_()
        kd_loss(z, t, torch.zeros(B, dtype=torch.long), T=T, alpha=0.0)[0].backward()
        return z.grad

    error = {T: (grad(T) - limit).abs().max().item() for T in (1.0, 100.0, 1000.0, 10000.0)}
    assert error[1000.0] < 2e-4  # gradients here are ~0.05-0.2
    assert error[10000.0] < 2e-5
    assert error[1000.0] < error[100.0] / 5  # shrinking like 1 / T ...
    assert error[1.0] > 1e-2  # ... and far from the limit at T = 1


# ---------------------------------------------------------------- soft_ce


def test_soft_ce_is_kd_plus_T2_teacher_entropy():
    # -T^2 sum p log q = T^2 KL(p || q) + T^2 H(p).
    T = 3.0
    s, t = randn(3, 4, seed=14), randn(3, 4, seed=15)
    expected = [
        T * T * (-sum(pi * math.log(qi) for pi, qi in zip(softmax(ti, T), softmax(si, T))))
        for si, ti in zip(s.tolist(), t.tolist())
    ]
    entropies = [T * T * entropy(softmax(ti, T)) for ti in t.tolist()]
    assert soft_ce_term(s, t, T).tolist() == pytest.approx(expected, rel=1e-10)
    assert (soft_ce_term(s, t, T) - kd_term(s, t, T)).tolist() == pytest.approx(entropies, rel=1e-10)
    assert LOSSES.build("soft_ce")(s, t, None, T).tolist() == pytest.approx(expected, rel=1e-10)


def test_soft_ce_gradient_equals_kd_gradient():
    T = 2.0
    t = randn(3, 4, seed=16)
    s1, s2 = randn(3, 4, seed=17).requires_grad_(), randn(3, 4, seed=17).requires_grad_()
    soft_ce_term(s1, t, T).sum().backward()
    kd_term(s2, t, T).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-12)
    assert s1.grad.abs().max() > 1e-3  # a real gradient, not two zeros


# ---------------------------------------------------------------- mse (Ba & Caruana 2014)


def test_mse_term_hand_value_and_formula():
    # Logits [1, 2, 3] vs [1, 0, 0]: differences 0, 2, 3 -> (0 + 4 + 9) / 3 = 13/3 (mean over classes).
    s, t = torch.tensor([[1.0, 2, 3]], dtype=D), torch.tensor([[1.0, 0, 0]], dtype=D)
    assert mse_term(s, t, 4.0).item() == pytest.approx(13 / 3, rel=1e-12)
    s, t = randn(3, 5, seed=18), randn(3, 5, seed=19)
    expected = [mean((a - b) ** 2 for a, b in zip(si, ti)) for si, ti in zip(s.tolist(), t.tolist())]
    assert mse_term(s, t, 4.0).tolist() == pytest.approx(expected, rel=1e-12)  # T plays no part
    assert LOSSES.build("mse")(s, t, None, 4.0).tolist() == pytest.approx(expected, rel=1e-12)


def test_mse_term_on_softened_probabilities():
    # probs=True: mean over classes of (softmax(s/T) - softmax(t/T))^2. Hand value: T = 2,
    # s = 0 -> [1/3]*3, t = [2 ln 2, 0, 0] -> [.5, .25, .25]:
    # ((1/6)^2 + 2 (1/12)^2) / 3 = (1/36 + 1/72) / 3 = 1/72 = 0.0138889.
    s = torch.zeros(1, 3, dtype=D)
    t = torch.tensor([[2 * math.log(2), 0.0, 0.0]], dtype=D)
    assert mse_term(s, t, 2.0, probs=True).item() == pytest.approx(1 / 72, rel=1e-12)
    T = 3.0
    s, t = randn(3, 5, seed=20), randn(3, 5, seed=21)
    expected = [
        mean((a - b) ** 2 for a, b in zip(softmax(si, T), softmax(ti, T))) for si, ti in zip(s.tolist(), t.tolist())
    ]
    assert mse_term(s, t, T, probs=True).tolist() == pytest.approx(expected, rel=1e-10)
    assert LOSSES.build("mse", probs=True)(s, t, None, T).tolist() == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------- DKD (Zhao et al., CVPR 2022)


def dkd_parts(s, t, y, T):
    """(TCKD, NCKD) of one sample, as in the paper: TCKD = KL(b^T || b^S) with b = (p_y, 1 - p_y);
    NCKD = KL(p^T || p^S) over the non-target classes renormalised (p_c / (1 - p_y))."""
    ps, pt = softmax(s, T), softmax(t, T)
    tckd = kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    ns = [ps[c] / (1 - ps[y]) for c in range(len(s)) if c != y]
    nt = [pt[c] / (1 - pt[y]) for c in range(len(t)) if c != y]
    return tckd, kl(nt, ns)


def test_dkd_hand_values():
    # T = 1, target 0, student uniform 1/3. Teacher [.5, .375, .125]:
    #   TCKD = KL((.5, .5) || (1/3, 2/3)) = .5 ln 1.5 + .5 ln .75 = .5 ln 1.125 = 0.0588915
    #   NCKD = KL((.75, .25) || (.5, .5)) = .75 ln 1.5 + .25 ln .5 = 0.3040988 - 0.1732868 = 0.1308120
    # tckd=1, nckd=8: 0.0588915 + 8 * 0.1308120 = 1.1053876.
    s = torch.zeros(1, 3, dtype=D)
    t = torch.tensor(logits_of([[0.5, 0.375, 0.125]]), dtype=D)
    y = torch.tensor([0])
    assert dkd_term(s, t, y, 1.0, 1.0, 0.0).item() == pytest.approx(0.0588915, abs=1e-7)
    assert dkd_term(s, t, y, 1.0, 0.0, 1.0).item() == pytest.approx(0.1308120, abs=1e-7)
    assert dkd_term(s, t, y, 1.0, 1.0, 8.0).item() == pytest.approx(1.1053876, abs=1e-6)
    assert LOSSES.build("dkd", tckd=1.0, nckd=8.0)(s, t, y, 1.0).item() == pytest.approx(1.1053876, abs=1e-6)
    # Same probabilities at T = 2 (logits doubled): everything x T^2 = 4.
    assert dkd_term(s, 2 * t, y, 2.0, 1.0, 8.0).item() == pytest.approx(4 * 1.1053876, abs=1e-6)
    # Teacher [.5, .25, .25]: the non-target parts agree with the student's, NCKD = 0.
    t = torch.tensor(logits_of([[0.5, 0.25, 0.25]]), dtype=D)
    assert dkd_term(s, t, y, 1.0, 0.0, 1.0).item() == pytest.approx(0.0, abs=1e-12)


def test_dkd_matches_paper_formula():
    T, a, b = 3.0, 1.5, 6.0
    s, t, y = randn(4, 5, seed=22) * 3, randn(4, 5, seed=23) * 3, torch.tensor([0, 4, 2, 2])
    expected = []
    for si, ti, yi in zip(s.tolist(), t.tolist(), y.tolist()):
        tckd, nckd = dkd_parts(si, ti, yi, T)
        expected.append(T * T * (a * tckd + b * nckd))
    assert dkd_term(s, t, y, T, a, b).tolist() == pytest.approx(expected, rel=1e-9)
    assert LOSSES.build("dkd", tckd=a, nckd=b)(s, t, y, T).tolist() == pytest.approx(expected, rel=1e-9)


def test_dkd_decomposition_identity():
    # Zhao et al. eq. (1)-(3): KD = TCKD + (1 - p_target^teacher) * NCKD (all at the same T).
    T = 2.0
    s, t, y = randn(4, 5, seed=24) * 2, randn(4, 5, seed=25) * 2, torch.tensor([1, 3, 0, 4])
    kd = kd_term(s, t, T)
    tckd, nckd = dkd_term(s, t, y, T, 1.0, 0.0), dkd_term(s, t, y, T, 0.0, 1.0)
    for b, (si, ti, yi) in enumerate(zip(s.tolist(), t.tolist(), y.tolist())):
        pt_y = softmax(ti, T)[yi]
        # Independent check of the identity itself on the reference implementation ...
        ref_tckd, ref_nckd = dkd_parts(si, ti, yi, T)
        assert kl(softmax(ti, T), softmax(si, T)) == pytest.approx(ref_tckd + (1 - pt_y) * ref_nckd, rel=1e-10)
        # ... then on the implementation: split terms, and one call with nckd = 1 - p_target^teacher.
        assert kd[b].item() == pytest.approx(tckd[b].item() + (1 - pt_y) * nckd[b].item(), rel=1e-9)
        one = dkd_term(s[b : b + 1], t[b : b + 1], y[b : b + 1], T, 1.0, 1 - pt_y)
        assert one.item() == pytest.approx(kd[b].item(), rel=1e-9)


@pytest.mark.parametrize("scale", [1.0, 30.0, 200.0])
def test_dkd_gradient_is_finite(scale):
    # The -inf masking of the target logit must not leak NaN into the gradients, also when the
    # softmax saturates (non-target mass underflowing).
    s = (randn(4, 5, seed=26) * scale).requires_grad_()
    t = randn(4, 5, seed=27) * scale
    y = torch.tensor([0, 1, 2, 3])
    s32 = s.detach().float().requires_grad_()
    for z in (s, s32):
        value = LOSSES.build("dkd", tckd=1.0, nckd=8.0)(z, t.to(z.dtype), y, 4.0).sum()
        value.backward()
        assert torch.isfinite(value)
        assert torch.isfinite(z.grad).all()


def test_dkd_rejects_negative_weights():
    with pytest.raises(KdError):
        LOSSES.build("dkd", tckd=-1.0, nckd=8.0)


# ---------------------------------------------------------------- DIST (Huang et al., NeurIPS 2022)


def dist_reference(s, t, T, inter, intra):
    ps, pt = [softmax(r, T) for r in s], [softmax(r, T) for r in t]
    inter_value = 1 - mean(pearson(a, b) for a, b in zip(ps, pt))
    cols = range(len(ps[0]))
    intra_value = 1 - mean(pearson([r[c] for r in ps], [r[c] for r in pt]) for c in cols)
    return T * T * (inter * inter_value + intra * intra_value)


def test_dist_hand_value():
    # B = 2, C = 2: every Pearson correlation of two 2-vectors is +-1.
    # student rows [.7, .3], [.2, .8]; teacher rows [.6, .4], [.9, .1].
    # inter: row 0 both decrease (+1), row 1 opposite (-1): 1 - mean(1, -1) = 1.
    # intra: column 0 s (.7, .2) t (.6, .9) -> -1; column 1 s (.3, .8) t (.4, .1) -> -1: 1 - (-1) = 2.
    # T = 1, inter = 1, intra = 1: 3; inter = 0.5, intra = 2, T = 2: 4 * (0.5 + 4) = 18.
    s = torch.tensor(logits_of([[0.7, 0.3], [0.2, 0.8]]), dtype=D)
    t = torch.tensor(logits_of([[0.6, 0.4], [0.9, 0.1]]), dtype=D)
    assert dist_term(s, t, 1.0, 1.0, 1.0).item() == pytest.approx(3.0, abs=1e-6)
    assert dist_term(2 * s, 2 * t, 2.0, 0.5, 2.0).item() == pytest.approx(18.0, abs=1e-5)


def test_dist_matches_paper_formula_and_is_a_batch_scalar():
    T, inter, intra = 2.0, 0.7, 2.0
    s, t = randn(4, 5, seed=28) * 2, randn(4, 5, seed=29) * 2
    value = LOSSES.build("dist", inter=inter, intra=intra)(s, t, torch.zeros(4, dtype=torch.long), T)
    assert value.shape == ()
    assert value.item() == pytest.approx(dist_reference(s.tolist(), t.tolist(), T, inter, intra), rel=1e-6)
    assert dist_term(s, t, T, inter, intra).item() == pytest.approx(value.item(), rel=1e-12)


def test_dist_invariant_to_positive_affine_map_of_teacher_probabilities():
    # Pearson correlation is invariant to x -> a x + c (a > 0). p' = a p + (1 - a) / C is still a
    # distribution (so it is softmax(T log p' / T)), and the same a, c apply to every row and
    # column, so both the inter and the intra terms keep their value.
    T, C = 2.0, 5
    s, t = randn(4, C, seed=30), randn(4, C, seed=31)
    pt = [softmax(r, T) for r in t.tolist()]
    a = 0.3
    t_affine = torch.tensor(logits_of([[a * p + (1 - a) / C for p in row] for row in pt], T), dtype=D)
    base = dist_term(s, t, T, 1.0, 1.0).item()
    assert dist_term(s, t_affine, T, 1.0, 1.0).item() == pytest.approx(base, rel=1e-6)
    # A different a_i per row keeps every row's correlation (the inter term) but not the columns'
    # (the intra term): there the map is no longer one affine map of the whole column.
    a_rows = [0.3, 0.9, 0.5, 0.7]
    mixed = [[ai * p + (1 - ai) / C for p in row] for ai, row in zip(a_rows, pt)]
    t_mixed = torch.tensor(logits_of(mixed, T), dtype=D)
    inter_only, intra_only = dist_term(s, t, T, 1.0, 0.0).item(), dist_term(s, t, T, 0.0, 1.0).item()
    assert dist_term(s, t_mixed, T, 1.0, 0.0).item() == pytest.approx(inter_only, rel=1e-6)
    assert dist_term(s, t_mixed, T, 0.0, 1.0).item() != pytest.approx(intra_only, rel=1e-2)
    assert dist_term(s, t_mixed, T, 0.0, 1.0).item() == pytest.approx(
        dist_reference(s.tolist(), t_mixed.tolist(), T, 0.0, 1.0), rel=1e-6
    )


def test_dist_rejects_negative_weights():
    with pytest.raises(KdError):
        LOSSES.build("dist", inter=-1.0)


# ---------------------------------------------------------------- ls / standardize (Sun et al., CVPR 2024)


def zscore(row):
    """(z - mean) / std with the unbiased (n - 1) std."""
    m = mean(row)
    sd = math.sqrt(sum((v - m) ** 2 for v in row) / (len(row) - 1))
    return [(v - m) / sd for v in row]


def test_standardize_hand_values():
    # [1, 2, 3]: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1]
    #   (the biased std sqrt(2/3) would give [-1.2247, 0, 1.2247]).
    # [2, 2, 5]: mean 3, deviations -1, -1, 2, std sqrt(6 / 2) = sqrt 3 -> [-0.5773503, -0.5773503, 1.1547005].
    z = standardize(torch.tensor([[1.0, 2, 3], [2.0, 2, 5]], dtype=D))
    torch.testing.assert_close(
        z, torch.tensor([[-1.0, 0, 1], [-0.5773503, -0.5773503, 1.1547005]], dtype=D), rtol=0, atol=1e-6
    )


def test_standardize_is_rowwise_zscore_with_unbiased_std():
    z = randn(3, 5, seed=32) * 4 + 2
    expected = torch.tensor([zscore(r) for r in z.tolist()], dtype=D)
    torch.testing.assert_close(standardize(z), expected, rtol=1e-6, atol=1e-6)


def test_ls_is_kd_on_standardized_logits():
    T = 2.0
    s, t, y = randn(3, 5, seed=33) * 3, randn(3, 5, seed=34) + 1, torch.tensor([0, 1, 2])
    expected = [T * T * kl(softmax(zscore(ti), T), softmax(zscore(si), T)) for si, ti in zip(s.tolist(), t.tolist())]
    assert LOSSES.build("ls")(s, t, y, T).tolist() == pytest.approx(expected, rel=1e-5)
    assert LOSSES.build("kd", standardize=True)(s, t, y, T).tolist() == pytest.approx(expected, rel=1e-5)
    # and it is not plain kd on these inputs
    assert LOSSES.build("kd")(s, t, y, T).tolist() != pytest.approx(expected, rel=1e-2)


def test_ls_invariant_to_shift_and_positive_scale():
    T = 2.0
    s, t, y = randn(3, 5, seed=35), randn(3, 5, seed=36), torch.tensor([0, 1, 2])
    ls = LOSSES.build("ls")
    base = ls(s, t, y, T)
    torch.testing.assert_close(ls(3.7 * s - 2.1, t, y, T), base, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ls(s, 0.2 * t + 5.0, y, T), base, rtol=1e-5, atol=1e-7)
    # A negative scale is not an invariance: the student's ranking flips.
    assert (ls(-s, t, y, T) - base).abs().max() > 1e-2


@pytest.mark.parametrize(
    "name, kwargs",
    [("kd", {}), ("ls", {}), ("dkd", {"tckd": 1.0, "nckd": 8.0}), ("dist", {}), ("mse", {}), ("mse", {"probs": True})],
)
def test_identical_logits_give_zero_term(name, kwargs):
    z = randn(4, 5, seed=37) * 2
    y = torch.tensor([0, 1, 2, 3])
    value = LOSSES.build(name, **kwargs)(z, z.clone(), y, 3.0)
    # dist: the 1e-8 in the Pearson denominators leaves ~1e-6 x T^2 for identical inputs.
    assert value.abs().max().item() == pytest.approx(0.0, abs=1e-4 if name == "dist" else 1e-9)
    # ... and a different teacher gives a positive term.
    assert LOSSES.build(name, **kwargs)(z, z.flip(1), y, 3.0).mean().item() > 1e-3


# ================================================================= feature terms
# ---------------------------------------------------------------- AT (Zagoruyko & Komodakis 2017)


def attention_reference(fb):
    """One sample (C, H, W) -> the channel mean of A^2 at each position, flattened, L2-normalised."""
    C, H, W = len(fb), len(fb[0]), len(fb[0][0])
    return l2normalize([mean(fb[c][h][w] ** 2 for c in range(C)) for h in range(H) for w in range(W)])


def at_reference(fs, ft):
    diffs = [(a - b) ** 2 for xs, xt in zip(fs, ft) for a, b in zip(attention_reference(xs), attention_reference(xt))]
    return mean(diffs)


def test_at_loss_hand_value():
    # One channel, 1x2 maps: student [1, 2] -> A^2 [1, 4] / sqrt 17; teacher [2, 1] -> [4, 1] / sqrt 17.
    # Differences -+3 / sqrt 17, squared 9 / 17 each; mean 9 / 17 = 0.5294118.
    fs = torch.tensor([[[[1.0, 2.0]]]], dtype=D)
    ft = torch.tensor([[[[2.0, 1.0]]]], dtype=D)
    assert at_loss(fs, ft).item() == pytest.approx(9 / 17, rel=1e-10)


def test_at_loss_matches_formula():
    fs, ft = randn(2, 3, 2, 3, seed=40), randn(2, 4, 2, 3, seed=41)  # channel counts may differ
    assert at_loss(fs, ft).item() == pytest.approx(at_reference(fs.tolist(), ft.tolist()), rel=1e-10)


def test_at_loss_average_pools_the_larger_map():
    # Student 4x4, teacher 2x2: the student map is averaged over 2x2 blocks first.
    fs, ft = randn(2, 2, 4, 4, seed=42), randn(2, 3, 2, 2, seed=43)
    pooled = [
        [
            [[mean(x[c][2 * h + i][2 * w + j] for i in range(2) for j in range(2)) for w in range(2)] for h in range(2)]
            for c in range(2)
        ]
        for x in fs.tolist()
    ]
    assert at_loss(fs, ft).item() == pytest.approx(at_reference(pooled, ft.tolist()), rel=1e-10)


# ---------------------------------------------------------------- RKD (Park et al., CVPR 2019)


def rkd_distance_reference(es, et, penalty=huber):
    B = len(es)
    pairs = [(i, j) for i in range(B) for j in range(B) if i != j]

    def normalised(e):
        d = {(i, j): math.dist(e[i], e[j]) for i, j in pairs}
        mu = mean(d.values())
        return {k: v / mu for k, v in d.items()}

    ds, dt = normalised(es), normalised(et)
    return mean(penalty(ds[k] - dt[k]) for k in pairs)


def rkd_angle_reference(es, et):
    B = len(es)

    def cos(e, i, j, k):
        u = l2normalize([a - b for a, b in zip(e[i], e[j])])
        v = l2normalize([a - b for a, b in zip(e[k], e[j])])
        return dot(u, v)  # 0 when either difference vector is zero

    triplets = [(i, j, k) for i in range(B) for j in range(B) for k in range(B)]
    return mean(huber(cos(es, *x) - cos(et, *x)) for x in triplets)


def test_rkd_distance_hand_value():
    # 1-D embeddings. Student 0, 1, 3: distances (01, 02, 12) = 1, 3, 2, mean 2 -> .5, 1.5, 1.
    # Teacher 0, 2, 4: 2, 4, 2, mean 8/3 -> .75, 1.5, .75. Differences -.25, 0, .25;
    # Huber .5 * .0625 = .03125 twice; mean over the 3 pairs (6 ordered ones): .0625 / 3 = 0.0208333.
    es = torch.tensor([[0.0], [1.0], [3.0]], dtype=D)
    et = torch.tensor([[0.0], [2.0], [4.0]], dtype=D)
    assert rkd_distance(es, et).item() == pytest.approx(0.0625 / 3, rel=1e-6)


def test_rkd_distance_matches_formula():
    es, et = randn(4, 3, seed=44), randn(4, 2, seed=45) * 5  # dims may differ; scale is normalised away
    assert rkd_distance(es, et).item() == pytest.approx(rkd_distance_reference(es.tolist(), et.tolist()), rel=1e-6)


def test_rkd_distance_uses_linear_huber_branch():
    # Four students packed together and one far away: the far pairs' normalised distances are ~2.5,
    # against a spread-out teacher, so some |differences| exceed 1 (Huber's linear part).
    es = torch.tensor([[0.0, 0.0], [0.01, 0.0], [0.0, 0.02], [0.03, 0.01], [10.0, 0.0]], dtype=D)
    et = randn(5, 3, seed=46)
    ref = rkd_distance_reference(es.tolist(), et.tolist())
    assert rkd_distance(es, et).item() == pytest.approx(ref, rel=1e-6)
    # A purely quadratic penalty 0.5 x^2 would give another value here, so the branch is exercised.
    quadratic = rkd_distance_reference(es.tolist(), et.tolist(), penalty=lambda x: 0.5 * x * x)
    assert rkd_distance(es, et).item() != pytest.approx(quadratic, rel=1e-3)


def test_rkd_angle_hand_value():
    # Student (0,0), (1,0), (0,1): angles at j=0, 1, 2 have cos 0, 1/sqrt2, 1/sqrt2.
    # Teacher (0,0), (1,0), (2,0) collinear: cos at j=0 is 1, at j=1 is -1, at j=2 is 1.
    # Triplets with i = k (i != j) have cos 1 in both; those with i = j or k = j are 0 in both.
    # The i != k ones (two per j): Huber(0 - 1) = .5, Huber(.7071 + 1) = .7071 + .5 = 1.2071,
    # Huber(.7071 - 1) = .5 (1 - .7071)^2 = .0429: 2 * (.5 + 1.25) = 3.5 over 27 triplets = 0.1296296.
    es = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=D)
    et = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=D)
    assert rkd_angle(es, et).item() == pytest.approx(3.5 / 27, rel=1e-9)


def test_rkd_angle_matches_formula_with_degenerate_triplets():
    es, et = randn(4, 3, seed=47), randn(4, 4, seed=48)
    assert rkd_angle(es, et).item() == pytest.approx(rkd_angle_reference(es.tolist(), et.tolist()), rel=1e-9)
    # Two equal student embeddings: e_i - e_j = 0 for i != j, counted as cosine 0.
    es[2] = es[0]
    assert rkd_angle(es, et).item() == pytest.approx(rkd_angle_reference(es.tolist(), et.tolist()), rel=1e-9)


def test_rkd_builder_weights_the_two_terms():
    fs, ft = randn(4, 3, seed=49), randn(4, 2, seed=50)
    term = FEATURE_LOSSES.build("rkd", Shapes([(3,)], [(2,)], 10), weight=2.0, distance=25.0, angle=50.0)
    expected = 2.0 * (
        25.0 * rkd_distance_reference(fs.tolist(), ft.tolist()) + 50.0 * rkd_angle_reference(fs.tolist(), ft.tolist())
    )
    assert term([fs], [ft], None).item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- PKT (Passalis & Tefas, ECCV 2018)


def pkt_reference(fs, ft):
    def conditional(f):
        f = [l2normalize(flat(x)) for x in f]
        k = [[(dot(a, b) + 1) / 2 for b in f] for a in f]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = conditional(fs), conditional(ft)
    B = len(fs)
    return sum(kl(rt, rs) for rs, rt in zip(ps, pt)) / (B * B)


def test_pkt_hand_value():
    # Student (1,0), (0,1): cos 0 -> kernel [[1, .5], [.5, 1]] -> P = [[2/3, 1/3], [1/3, 2/3]].
    # Teacher (1,0), (1,0): kernel all 1 -> P = .5 everywhere.
    # Each row: KL((.5, .5) || (2/3, 1/3)) = .5 ln .75 + .5 ln 1.5 = .5 ln 1.125 = 0.0588915;
    # two rows / B^2 = 4: 0.0294457.
    fs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    ft = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    assert pkt_loss(fs, ft).item() == pytest.approx(LN_1_125 / 4, rel=1e-5)


def test_pkt_matches_formula():
    fs, ft = randn(3, 2, 2, seed=51), randn(3, 4, seed=52)  # flattened; (2, 2) and (4,)
    assert pkt_loss(fs, ft).item() == pytest.approx(pkt_reference(fs.tolist(), ft.tolist()), rel=1e-4, abs=1e-8)


# ---------------------------------------------------------------- SP (Tung & Mori, ICCV 2019)


def sp_reference(fs, ft):
    def gram(f):
        f = [flat(x) for x in f]
        return [l2normalize([dot(a, b) for b in f]) for a in f]

    gs, gt = gram(fs), gram(ft)
    B = len(fs)
    return sum((a - b) ** 2 for rs, rt in zip(gs, gt) for a, b in zip(rs, rt)) / (B * B)


def test_sp_hand_value():
    # Student (1,0), (0,1): G = I, rows already unit. Teacher (1,0), (1,0): G = all 1, rows (1, 1)/sqrt2.
    # Per row (1 - 1/sqrt2)^2 + 1/2 = 2 - sqrt2; two rows / B^2 = 4: (2 - sqrt2) / 2 = 0.2928932.
    fs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    ft = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    assert sp_loss(fs, ft).item() == pytest.approx((2 - math.sqrt(2)) / 2, rel=1e-10)


def test_sp_matches_formula():
    fs, ft = randn(3, 2, 2, 2, seed=53), randn(3, 4, 1, 1, seed=54)
    assert sp_loss(fs, ft).item() == pytest.approx(sp_reference(fs.tolist(), ft.tolist()), rel=1e-10)


# ---------------------------------------------------------------- NST (Huang & Wang 2017)


def nst_reference(fs, ft):
    def channels(x):
        return [l2normalize(flat(c)) for c in x]

    def k(a, b):
        return mean(dot(u, v) ** 2 for u in a for v in b)

    out = []
    for xs, xt in zip(fs, ft):
        s, t = channels(xs), channels(xt)
        out.append(k(t, t) + k(s, s) - 2 * k(s, t))
    return mean(out)


def test_nst_hand_value():
    # 1x2 maps. Student channels [1, 0], [0, 1]: k(s, s) = mean([[1, 0], [0, 1]]) = .5.
    # Teacher one channel [1, 1] / sqrt2: k(t, t) = 1; k(s, t) = mean(.5, .5) = .5.
    # MMD^2 = 1 + .5 - 2 * .5 = .5.
    fs = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], dtype=D)
    ft = torch.tensor([[[[1.0, 1.0]]]], dtype=D)
    assert nst_loss(fs, ft).item() == pytest.approx(0.5, rel=1e-10)


def test_nst_matches_formula():
    fs, ft = randn(2, 2, 2, 3, seed=55), randn(2, 3, 2, 3, seed=56)
    assert nst_loss(fs, ft).item() == pytest.approx(nst_reference(fs.tolist(), ft.tolist()), rel=1e-9)


# ---------------------------------------------------------------- shared properties, builders


@pytest.mark.parametrize(
    "fn, shape",
    [
        (at_loss, (2, 3, 2, 2)),
        (rkd_distance, (4, 3)),
        (rkd_angle, (4, 3)),
        (pkt_loss, (4, 3)),
        (sp_loss, (3, 2, 2, 2)),
        (nst_loss, (2, 3, 2, 2)),
    ],
)
def test_feature_loss_is_zero_for_identical_features(fn, shape):
    f = randn(*shape, seed=57)
    assert fn(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert fn(f, randn(*shape, seed=58)).item() > 1e-4


def test_fitnet_conv_adapter_for_maps_of_the_same_size():
    # (C_s, H, W) = (2, 3, 3) -> (4, 3, 3): a bias-free 1x1 conv, out[o] = sum_c W[o, c] f[c].
    term = FEATURE_LOSSES.build("fitnet", Shapes([(2, 3, 3)], [(4, 3, 3)], 10), weight=2.0)
    conv = term.adapters[0].map
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
    fs, ft = randn(2, 2, 3, 3, seed=59).float(), randn(2, 4, 3, 3, seed=60).float()
    W = conv.weight.detach()[:, :, 0, 0].tolist()
    x, tt = fs.tolist(), ft.tolist()
    sq = [
        (sum(W[o][c] * x[b][c][h][w] for c in range(2)) - tt[b][o][h][w]) ** 2
        for b in range(2)
        for o in range(4)
        for h in range(3)
        for w in range(3)
    ]
    assert term([fs], [ft], None).item() == pytest.approx(2.0 * mean(sq), rel=1e-5)


def test_fitnet_linear_adapter_for_flat_features():
    term = FEATURE_LOSSES.build("fitnet", Shapes([(3,)], [(5,)], 10), weight=3.0)
    lin = term.adapters[0].map
    assert isinstance(lin, torch.nn.Linear) and (lin.in_features, lin.out_features) == (3, 5)
    fs, ft = randn(2, 3, seed=61).float(), randn(2, 5, seed=62).float()
    W, bias = lin.weight.detach().tolist(), lin.bias.detach().tolist()
    sq = [
        (sum(W[o][i] * fs[b, i].item() for i in range(3)) + bias[o] - ft[b, o].item()) ** 2
        for b in range(2)
        for o in range(5)
    ]
    assert term([fs], [ft], None).item() == pytest.approx(3.0 * mean(sq), rel=1e-5)
    # Maps of different spatial size are also mapped by a Linear on the flattened features.
    other = FEATURE_LOSSES.build("fitnet", Shapes([(2, 4, 4)], [(3, 2, 2)], 10))
    assert isinstance(other.adapters[0].map, torch.nn.Linear)
    assert other([randn(2, 2, 4, 4, seed=63).float()], [randn(2, 3, 2, 2, seed=64).float()], None).shape == ()


def test_fitnet_identity_for_equal_shapes():
    term = FEATURE_LOSSES.build("fitnet", Shapes([(2, 2, 2)], [(2, 2, 2)], 10), weight=5.0)
    assert isinstance(term.adapters[0].map, torch.nn.Identity)
    assert not list(term.parameters())
    fs, ft = randn(3, 2, 2, 2, seed=65), randn(3, 2, 2, 2, seed=66)
    expected = 5.0 * mean((a - b) ** 2 for a, b in zip(flat(fs.tolist()), flat(ft.tolist())))
    assert term([fs], [ft], None).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("name", ["at", "nst"])
def test_spatial_losses_reject_flat_features(name):
    with pytest.raises((ValueError, KdError), match="spatial feature maps"):
        FEATURE_LOSSES.build(name, Shapes([(8,)], [(8,)], 10))
    FEATURE_LOSSES.build(name, Shapes([(2, 3, 3)], [(4, 3, 3)], 10))  # maps are fine


# ---------------------------------------------------------------- CRD (Tian et al., ICLR 2020)


def make_crd(**kw):
    params = dict(negatives=3, dim=2, tau=0.5, momentum=0.5, weight=1.0) | kw
    return FEATURE_LOSSES.build("crd", Shapes(student=[(4,)], teacher=[(3,)], num_samples=10, seed=0), **params)


def embed(linear, x):
    W, b = linear.weight.detach().tolist(), linear.bias.detach().tolist()
    return [l2normalize([dot(w, row) + bo for w, bo in zip(W, b)]) for row in x]


def crd_scores(anchors, bank, contrast, tau):
    """exp(<m_k, v> / tau) for each sample's contrast set (positive first)."""
    return [[math.exp(dot(bank[k], v) / tau) for k in ks] for v, ks in zip(anchors, contrast)]


def nce_reference(scores, z, K, N):
    """NCE with P = score / Z and noise probability K / N: -(log P0/(P0 + K/N) + sum log (K/N)/(Pk + K/N)),
    averaged over the batch."""
    pn = K / N
    out = []
    for row in scores:
        p = [v / z for v in row]
        out.append(-(math.log(p[0] / (p[0] + pn)) + sum(math.log(pn / (pk + pn)) for pk in p[1:])))
    return mean(out)


def test_crd_nce_loss_matches_manual_computation():
    crd = make_crd(weight=0.8)
    idx = torch.tensor([1, 4, 7])
    contrast = torch.tensor([[1, 0, 4, 9], [4, 4, 2, 5], [7, 3, 3, 8]])  # the positive first, then K = 3 noise
    crd.sample = lambda i: contrast
    fs, ft = randn(3, 4, seed=70).float(), randn(3, 3, seed=71).float()
    mem_s, mem_t = crd.memory_s.tolist(), crd.memory_t.tolist()
    vs, vt = embed(crd.embed_s, fs.tolist()), embed(crd.embed_t, ft.tolist())
    out_s = crd_scores(vs, mem_t, contrast.tolist(), 0.5)  # student anchored on the teacher's bank
    out_t = crd_scores(vt, mem_s, contrast.tolist(), 0.5)
    zs, zt = mean(flat(out_s)) * 10, mean(flat(out_t)) * 10  # Z = mean score x N, from this first batch
    expected = 0.8 * (nce_reference(out_s, zs, 3, 10) + nce_reference(out_t, zt, 3, 10))
    loss = crd([fs], [ft], idx)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert crd.z.tolist() == pytest.approx([zs, zt], rel=1e-5)


def test_crd_memory_momentum_update_and_fixed_normaliser():
    crd = make_crd(momentum=0.3)
    m = 0.3
    idx1 = torch.tensor([2, 5])
    c1 = torch.tensor([[2, 0, 1, 9], [5, 6, 6, 3]])
    fs1, ft1 = randn(2, 4, seed=72).float(), randn(2, 3, seed=73).float()
    mem_s, mem_t = crd.memory_s.tolist(), crd.memory_t.tolist()
    vs, vt = embed(crd.embed_s, fs1.tolist()), embed(crd.embed_t, ft1.tolist())
    crd.sample = lambda i: c1
    crd([fs1], [ft1], idx1)
    z = crd.z.tolist()
    # mem[i] <- normalize(m * mem[i] + (1 - m) * v_i) for the batch's own indices; the rest unchanged.
    for bank, old, v in ((crd.memory_s, mem_s, vs), (crd.memory_t, mem_t, vt)):
        for b, i in enumerate(idx1.tolist()):
            old[i] = l2normalize([m * a + (1 - m) * x for a, x in zip(old[i], v[b])])
        torch.testing.assert_close(bank, torch.tensor(old, dtype=bank.dtype), rtol=1e-5, atol=1e-6)

    # Second batch: Z stays the first batch's; the contrast set uses the updated entries 2 and 5.
    idx2 = torch.tensor([0, 5])
    c2 = torch.tensor([[0, 2, 5, 8], [5, 2, 1, 4]])
    crd.sample = lambda i: c2
    fs2, ft2 = randn(2, 4, seed=74).float(), randn(2, 3, seed=75).float()
    vs, vt = embed(crd.embed_s, fs2.tolist()), embed(crd.embed_t, ft2.tolist())
    out_s = crd_scores(vs, mem_t, c2.tolist(), 0.5)
    out_t = crd_scores(vt, mem_s, c2.tolist(), 0.5)
    expected = nce_reference(out_s, z[0], 3, 10) + nce_reference(out_t, z[1], 3, 10)
    loss = crd([fs2], [ft2], idx2)
    assert crd.z.tolist() == z
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Re-estimating Z on this batch would give another value.
    assert expected != pytest.approx(
        nce_reference(out_s, mean(flat(out_s)) * 10, 3, 10) + nce_reference(out_t, mean(flat(out_t)) * 10, 3, 10),
        rel=1e-3,
    )


def test_crd_default_sampler_puts_the_positive_first():
    crd = make_crd()
    idx = torch.tensor([3, 8, 0])
    contrast = crd.sample(idx)
    assert contrast.shape == (3, 4)
    assert contrast[:, 0].tolist() == [3, 8, 0]
    assert ((contrast >= 0) & (contrast < 10)).all()


# ================================================================= objective


@pytest.mark.parametrize(
    "kind, values",
    [
        ("constant", [4.0, 4.0, 4.0, 4.0, 4.0]),
        # progress (e - 1) / 4 = 0, .25, .5, .75, 1; value 4 - 3 f(progress)
        ("linear", [4.0, 3.25, 2.5, 1.75, 1.0]),
        # f = (1 - cos(pi p)) / 2 = 0, .1464466, .5, .8535534, 1
        ("cosine", [4.0, 3.5606602, 2.5, 1.4393398, 1.0]),
        # the end value once the fraction step_at = .5 of the 5 epochs is done: epochs done e - 1 >= 2.5
        ("step", [4.0, 4.0, 4.0, 1.0, 1.0]),
    ],
)
def test_schedule_hand_values(kind, values):
    schedule = Schedule(kind, 4.0, 1.0)
    assert [schedule.at(e, 5) for e in range(1, 6)] == pytest.approx(values, abs=1e-7)


def test_schedule_edge_cases():
    assert Schedule("linear", 4.0).at(3, 5) == 4.0  # no end: constant
    assert Schedule("linear", 4.0, 1.0).at(1, 1) == 1.0  # a single epoch is the last one
    assert Schedule("step", 0.0, 1.0, step_at=0.8).at(4, 5) == 0.0  # 3 of 5 epochs done < 4
    assert Schedule("step", 0.0, 1.0, step_at=0.8).at(5, 5) == 1.0


def test_merge_teachers_probs_hand_value():
    # Teacher A on classes [0, 1], logits 0 -> (.5, .5); teacher B on [2, 3, 4], logits 0 -> 1/3 each.
    # Weights 1 and 3: p = (1 * .5, 1 * .5, 3/3, 3/3, 3/3) / 4 = (.125, .125, .25, .25, .25).
    T = 2.0
    merged = merge_teachers(
        [torch.zeros(1, 2, dtype=D), torch.zeros(1, 3, dtype=D)],
        [torch.tensor([0, 1]), torch.tensor([2, 3, 4])],
        5,
        T,
        [1.0, 3.0],
    )
    p = torch.softmax(merged / T, 1)
    assert p[0].tolist() == pytest.approx([0.125, 0.125, 0.25, 0.25, 0.25], rel=1e-10)
    assert merged[0].tolist() == pytest.approx([T * math.log(v) for v in [0.125, 0.125, 0.25, 0.25, 0.25]])


def test_merge_teachers_probs_is_weighted_placement():
    T, w = 3.0, [2.0, 0.5]
    za, zb = randn(3, 2, seed=80), randn(3, 3, seed=81)
    maps = [torch.tensor([0, 1]), torch.tensor([2, 3, 4])]
    merged = merge_teachers([za, zb], maps, 5, T, w, mode="probs")
    expected = []
    for ra, rb in zip(za.tolist(), zb.tolist()):
        pa, pb = softmax(ra, T), softmax(rb, T)
        expected.append([w[0] * pa[0], w[0] * pa[1], w[1] * pb[0], w[1] * pb[1], w[1] * pb[2]])
        expected[-1] = [v / sum(w) for v in expected[-1]]
    p = torch.softmax(merged / T, 1)
    torch.testing.assert_close(p, torch.tensor(expected, dtype=D), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p.sum(1), torch.ones(3, dtype=D))
    # An ensemble (both teachers on all classes) gives the weighted mean of their distributions.
    z1, z2 = randn(2, 4, seed=82), randn(2, 4, seed=83)
    full = torch.arange(4)
    merged = merge_teachers([z1, z2], [full, full], 4, T, [1.0, 3.0])
    expected = [
        [(1 * a + 3 * b) / 4 for a, b in zip(softmax(r1, T), softmax(r2, T))]
        for r1, r2 in zip(z1.tolist(), z2.tolist())
    ]
    torch.testing.assert_close(torch.softmax(merged / T, 1), torch.tensor(expected, dtype=D), rtol=1e-10, atol=1e-12)


def test_merge_teachers_logits_is_weighted_mean_of_covering_teachers():
    # A covers [0, 1, 2], B covers [2, 3, 4]: class 2 is (w_A z_A[2] + w_B z_B[0]) / (w_A + w_B),
    # the others are their single teacher's logit.
    za, zb = randn(2, 3, seed=84), randn(2, 3, seed=85)
    w = [1.0, 3.0]
    merged = merge_teachers([za, zb], [torch.tensor([0, 1, 2]), torch.tensor([2, 3, 4])], 5, 4.0, w, mode="logits")
    expected = [[a[0], a[1], (w[0] * a[2] + w[1] * b[0]) / 4, b[1], b[2]] for a, b in zip(za.tolist(), zb.tolist())]
    torch.testing.assert_close(merged, torch.tensor(expected, dtype=D), rtol=1e-12, atol=1e-12)
    # hand value: A = (0, 0, 2), B = (6, 1, 1): class 2 = (1 * 2 + 3 * 6) / 4 = 5
    merged = merge_teachers(
        [torch.tensor([[0.0, 0, 2]]), torch.tensor([[6.0, 1, 1]])],
        [torch.tensor([0, 1, 2]), torch.tensor([2, 3, 4])],
        5,
        4.0,
        w,
        mode="logits",
    )
    assert merged[0].tolist() == pytest.approx([0.0, 0.0, 5.0, 1.0, 1.0])


def test_confidence_weights_hand_value_and_formula():
    # Teacher rows [0, 0] -> max prob .5; [ln 3, 0] -> [.75, .25], max .75. temperature .25:
    # softmax over the batch of (2, 3) = (1, e) / (1 + e) = (.2689414, .7310586); x B = 2:
    # (0.5378828, 1.4621172).
    t = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], dtype=D)
    assert confidence_weights(t, 0.25).tolist() == pytest.approx([0.5378828, 1.4621172], abs=1e-7)
    t = randn(4, 5, seed=86) * 2
    conf = [max(softmax(r)) for r in t.tolist()]
    expected = [4 * v for v in softmax(conf, 0.7)]
    w = confidence_weights(t, 0.7)
    assert w.tolist() == pytest.approx(expected, rel=1e-10)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-12)


def test_objective_combines_alpha_warmup_and_confidence_weights():
    # L = alpha(e) CE + (1 - alpha(e)) r(e) mean_i w_i T(e)^2 KL_i + r(e) * weight * feature term.
    # set_epoch(2, 3): T linear 4 -> 2 gives 3, alpha linear .9 -> .5 gives .7, r = min(1, 2 / 4) = .5.
    sp = FEATURE_LOSSES.build("sp", Shapes([(3,)], [(2,)], 10), weight=10.0)
    objective = Objective(
        LOSSES.build("kd"),
        T=Schedule("linear", 4.0, 2.0),
        alpha=Schedule("linear", 0.9, 0.5),
        warmup=4,
        confidence=0.5,
        features=[FeatureTerm("sp", sp, ["a"], ["b"])],
    )
    assert objective.set_epoch(2, 3) == {"T": 3.0, "alpha": pytest.approx(0.7)}
    assert objective.ramp == 0.5
    s, t, y = randn(4, 5, seed=90), randn(4, 5, seed=91) * 2, torch.tensor([0, 3, 1, 4])
    fs, ft = randn(4, 3, seed=92), randn(4, 2, seed=93)
    T, alpha, r = 3.0, 0.7, 0.5
    sl, tl = s.tolist(), t.tolist()
    ce = mean(-math.log(softmax(si)[yi]) for si, yi in zip(sl, y.tolist()))
    conf = [max(softmax(ti)) for ti in tl]
    w = [4 * v for v in softmax(conf, 0.5)]
    kd = mean(wi * T * T * kl(softmax(ti, T), softmax(si, T)) for wi, si, ti in zip(w, sl, tl))
    feature = 10.0 * sp_reference(fs.tolist(), ft.tolist())
    loss, parts = objective(s, [t], y, [fs], [ft], torch.arange(4))
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert parts["sp"].item() == pytest.approx(feature, rel=1e-10)
    assert loss.item() == pytest.approx(alpha * ce + (1 - alpha) * r * kd + r * feature, rel=1e-10)
    # Epoch 3 of 3: T = 2, alpha = .5, r = 3 / 4; epoch 4 of 4 (T = 2, alpha = .5) ends the warm-up, r = 1.
    for epoch, epochs, r in ((3, 3, 0.75), (4, 4, 1.0)):
        objective.set_epoch(epoch, epochs)
        T, alpha = 2.0, 0.5
        kd = mean(wi * T * T * kl(softmax(ti, T), softmax(si, T)) for wi, si, ti in zip(w, sl, tl))
        loss, _ = objective(s, [t], y, [fs], [ft], torch.arange(4))
        assert loss.item() == pytest.approx(alpha * ce + (1 - alpha) * r * kd + r * feature, rel=1e-10)


def test_objective_warmup_ramp_values():
    objective = Objective(LOSSES.build("kd"), T=4.0, alpha=0.0, warmup=4)
    ramps = []
    for e in range(1, 7):
        objective.set_epoch(e, 6)
        ramps.append(objective.ramp)
    assert ramps == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_objective_merges_teachers_before_the_term():
    # Two teachers on disjoint classes, probs merge; the term sees T log p_merged.
    T = 2.0
    za, zb = randn(3, 2, seed=94), randn(3, 3, seed=95)
    s, y = randn(3, 5, seed=96), torch.tensor([0, 2, 4])
    objective = Objective(
        LOSSES.build("kd"),
        T=T,
        alpha=0.0,
        class_maps=[torch.tensor([0, 1]), torch.tensor([2, 3, 4])],
        teacher_weights=[1.0, 1.0],
        num_classes=5,
    )
    expected = []
    for si, ra, rb in zip(s.tolist(), za.tolist(), zb.tolist()):
        p = [v / 2 for v in softmax(ra, T)] + [v / 2 for v in softmax(rb, T)]
        expected.append(T * T * kl(p, softmax(si, T)))
    loss, parts = objective(s, [za, zb], y)
    assert parts["kd"].item() == pytest.approx(mean(expected), rel=1e-8)
    assert loss.item() == pytest.approx(mean(expected), rel=1e-8)


def test_objective_confidence_needs_a_per_sample_term():
    objective = Objective(LOSSES.build("dist"), T=2.0, alpha=0.5, confidence=1.0)
    with pytest.raises(KdError):
        objective(randn(3, 4, seed=97), [randn(3, 4, seed=98)], torch.tensor([0, 1, 2]))


def test_crd_shared_noise_takes_the_matmul_path_with_the_same_scores():
    # The default sampler shares one noise draw across the batch; scores must equal the formula.
    crd = make_crd()
    bank = torch.randn(10, 2)
    v = torch.nn.functional.normalize(torch.randn(3, 2), dim=1)
    contrast = torch.tensor([[1, 0, 4, 9], [4, 0, 4, 9], [7, 0, 4, 9]])
    expected = crd_scores(v.tolist(), bank.tolist(), contrast.tolist(), 0.5)
    torch.testing.assert_close(crd.scores(v, bank, contrast, 0.5), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    shared = crd.sample(torch.tensor([3, 8, 0]))
    assert (shared[:, 1:] == shared[0, 1:]).all()


def test_conditional_merge_compares_each_teacher_on_its_own_classes():
    # Vongkulbhisal et al. (2019): teacher k vs the student's softmax restricted to k's classes.
    from kdcli.core.registry import LOSSES
    from kdcli.losses import Objective

    T = 2.0
    s = [[0.3, -1.0, 2.0, 0.5, 0.0]]
    ta, tb = [[1.0, 0.0]], [[0.5, -0.5, 2.0]]  # teacher A: classes 3, 0; teacher B: classes 1, 2, 4
    maps = [torch.tensor([3, 0]), torch.tensor([1, 2, 4])]

    def kl(p_logits, q_logits):
        p, q = softmax([v / T for v in p_logits]), softmax([v / T for v in q_logits])
        return T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    expected_a = kl(ta[0], [s[0][3], s[0][0]])
    expected_b = kl(tb[0], [s[0][1], s[0][2], s[0][4]])
    objective = Objective(
        LOSSES.build("kd"), T=T, alpha=0.0, class_maps=maps, teacher_weights=[1.0, 3.0], merge="conditional",
        num_classes=5,
    )  # fmt: skip
    value = objective.logit_term(torch.tensor(s), [torch.tensor(ta), torch.tensor(tb)], torch.tensor([2]))
    assert value.item() == pytest.approx((expected_a + 3 * expected_b) / 4, rel=1e-5)
    # As one prediction (the teacher row, agreement), disjoint teachers' logits are concatenated.
    merged = objective.teacher_logits([torch.tensor(ta), torch.tensor(tb)], T)
    assert merged.tolist() == [[0.0, 0.5, -0.5, 1.0, 2.0]]
