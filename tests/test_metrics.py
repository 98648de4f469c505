"""evaluate's figures against hand computation and independent formulas."""

import math

import pytest
import torch

from kdcli.core.metrics import classification, confusion, kl_to, per_class_accuracy, reliability, top_k
from kdcli.deploy import latency


def test_top_k_counts_labels_among_the_k_highest_logits():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [1, 0, 0, 0, 0, 9]])
    y = torch.tensor([4, 0, 5])
    # row 0: top-5 = classes 0..4 -> hit; row 1: top-5 = 5,4,3,2,1 -> miss; row 2: top-1 is 5 -> hit
    assert top_k(logits, y, 5) == pytest.approx(2 / 3)
    assert top_k(logits, y, 1) == pytest.approx(1 / 3)
    assert top_k(logits[:, :3], torch.tensor([0, 1, 2]), 5) is None  # fewer classes than k


def test_ece_by_hand():
    # Three rows with top-1 probabilities 0.9, 0.9 (bin 14 of 15) and 0.5 (bin 7: (7/15, 8/15]).
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]])
    logits = p.log()
    y = torch.tensor([0, 0, 0])  # right, wrong, right (argmax of a tie is the first class)
    r = reliability(logits, y)
    # bin 14: confidence 0.9, accuracy 1/2 -> |0.5 - 0.9| * 2/3; bin 7: |1 - 0.5| * 1/3
    assert r["ece"] == pytest.approx(0.4 * 2 / 3 + 0.5 / 3, abs=1e-6)
    assert r["count"][13] == 2 and r["count"][7] == 1 and sum(r["count"]) == 3
    assert r["confidence"][13] == pytest.approx(0.9) and r["accuracy"][13] == pytest.approx(0.5)


def test_ece_against_an_independent_loop():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(500, 7, generator=g)
    y = torch.randint(0, 7, (500,), generator=g)
    probs = torch.softmax(logits, 1)
    bins = 15
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        rows = [i for i in range(500) if lo < probs[i].max().item() <= hi]
        if rows:
            conf = sum(probs[i].max().item() for i in rows) / len(rows)
            acc = sum(int(probs[i].argmax() == y[i]) for i in rows) / len(rows)
            total += len(rows) / 500 * abs(acc - conf)
    assert reliability(logits, y, bins)["ece"] == pytest.approx(total, abs=1e-6)


def test_confusion_and_per_class_accuracy():
    logits = torch.eye(3)[[0, 1, 1, 2, 0]]  # predictions 0, 1, 1, 2, 0
    y = torch.tensor([0, 1, 2, 2, 1])
    m = confusion(logits, y, 3)
    assert m.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert per_class_accuracy(m) == [1.0, 0.5, 0.5]
    assert per_class_accuracy(confusion(logits[:1], y[:1], 3)) == [1.0, None, None]  # absent classes


def test_kl_to_reference_is_the_mean_of_the_row_formula():
    a = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    ref = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    expected = 0.0
    for s_row, t_row in zip(a, ref):
        p = [math.exp(v) / sum(math.exp(u) for u in t_row) for v in t_row]
        q = [math.exp(v) / sum(math.exp(u) for u in s_row) for v in s_row]
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 2
    assert kl_to(a, ref) == pytest.approx(expected, rel=1e-5)
    assert kl_to(ref, ref) == pytest.approx(0.0, abs=1e-7)


def test_classification_with_a_reference():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    out = classification(logits, y, reference=torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))
    assert out["acc"] == pytest.approx(2 / 3) and out["agreement"] == pytest.approx(2 / 3)
    assert out["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item())
    assert out["top5"] is None and out["confusion"] == [[1, 0], [1, 1]]


def _clock(monkeypatch, durations):
    """perf_counter returning start/stop pairs whose differences are `durations` (seconds)."""
    ticks = [t for i, d in enumerate(durations) for t in (float(i), i + d)]
    it = iter(ticks)
    monkeypatch.setattr(latency.time, "perf_counter", lambda: next(it))


def test_latency_is_the_median_and_iqr_of_the_timed_runs_after_warm_up(monkeypatch):
    calls = []
    _clock(monkeypatch, [0.003, 0.001, 0.010, 0.002, 0.004])  # five timed runs, in ms: 3, 1, 10, 2, 4
    t = latency.time_ms(lambda x: calls.append(len(x)), torch.zeros(4), torch.device("cpu"), warmup=2, repeats=5)
    assert calls == [4] * 7  # 2 warm-up + 5 timed
    # sorted 1, 2, 3, 4, 10: median 3; quartiles by linear interpolation (numpy's and torch's default) 2 and 4
    assert t.median_ms == pytest.approx(3.0) and t.iqr_ms == pytest.approx(2.0) and t.runs == 5
    assert t.spread == pytest.approx(2 / 3) and t.noisy


def test_latency_within_a_tenth_of_the_median_is_not_noise(monkeypatch):
    # torch.utils.benchmark's rule: an interquartile range over 10 % of the median is fluctuation
    _clock(monkeypatch, [0.0100, 0.0102, 0.0104, 0.0101, 0.0103])
    t = latency.time_ms(lambda x: x, torch.zeros(1), torch.device("cpu"), warmup=0, repeats=5)
    assert t.iqr_ms == pytest.approx(0.2) and not t.noisy
    # one slow run among five moves neither the median nor the quartiles much: not noise
    _clock(monkeypatch, [0.0100, 0.0130, 0.0104, 0.0101, 0.0103])
    t = latency.time_ms(lambda x: x, torch.zeros(1), torch.device("cpu"), warmup=0, repeats=5)
    assert t.median_ms == pytest.approx(10.3) and t.iqr_ms == pytest.approx(0.3) and not t.noisy
    # two runs in five 20 % slower: quartiles 10 and 12, a spread of 20 %
    _clock(monkeypatch, [0.010, 0.012, 0.010, 0.012, 0.010])
    t = latency.time_ms(lambda x: x, torch.zeros(1), torch.device("cpu"), warmup=0, repeats=5)
    assert t.spread == pytest.approx(0.2) and t.noisy


def test_noisy_latency_is_named_with_its_spread_and_the_fix():
    calm = {"latency_ms_bs1": 1.0, "latency_iqr_ms_bs1": 0.05, "latency_ms_batch": 10.0, "latency_iqr_ms_batch": 0.2}
    busy = {"latency_ms_bs1": 1.0, "latency_iqr_ms_bs1": 0.84, "latency_ms_batch": 10.0, "latency_iqr_ms_batch": 1.0}
    assert latency.spread(calm) == pytest.approx(0.05) and latency.spread(busy) == pytest.approx(0.84)
    assert latency.spread({"params": 3}) is None
    assert latency.noisy_warning({"a": {**calm, "latency_noisy": False}}) is None
    text = latency.noisy_warning({"a": {**calm, "latency_noisy": False}, "b": {**busy, "latency_noisy": True}})
    assert "latency of b is noise" in text and "84 %" in text and "latency.threads=1" in text and " a," not in text
