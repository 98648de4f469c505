"""mix=mixup / mix=cutmix: the mixed batch, the split label term, and the teacher on the same images."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdcli.data import DeviceData, load_splits
from kdcli.data.mix import Mixed, cut_box, mix_batch
from kdcli.losses import Objective
from kdcli.losses.logit import kd
from kdcli.training.engine import Teacher, Trainee, fit

N = 12


def basis_batch():
    """Image i is 1 at pixel i and 0 elsewhere: a mixed image says which two it came from, in what share."""
    x = torch.zeros(N, 1, 4, 4)
    x.view(N, -1)[torch.arange(N), torch.arange(N)] = 1.0
    return x, torch.arange(N) % 5, torch.arange(100, 100 + N)


@pytest.mark.parametrize("seed", range(5))
def test_mixup_blends_each_image_with_one_other_and_names_the_pair_after_its_larger_part(seed):
    x, y, idx = basis_batch()
    out, y2, idx2, mixed = mix_batch(x, y, idx, "mixup", 1.0, seed)
    assert 0.5 <= mixed.lam <= 1.0
    flat = out.view(N, -1)[:, :N]
    for i in range(N):
        # each row: lam of the image it is named after, 1 - lam of its partner (itself, when the
        # permutation leaves it in place), nothing else
        named = int(idx2[i]) - 100
        assert y2[i] == y[named]
        assert flat[i, named] >= mixed.lam - 1e-6
        rest = flat[i].clone()
        rest[named] -= mixed.lam
        partner = int(rest.argmax())
        assert mixed.partner[i] == y[partner]
        assert rest.sum() == pytest.approx(1 - mixed.lam, abs=1e-6)
    # the partners are a permutation of the batch: every image is used as a partner once
    assert sorted(flat.sum(0).tolist()) == pytest.approx([1.0] * N)


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_pastes_one_box_and_lam_is_the_share_of_the_named_image(seed):
    x = torch.arange(N, dtype=torch.float32).view(N, 1, 1, 1).expand(N, 1, 8, 8).clone()  # image i: all i
    y, idx = torch.arange(N) % 3, torch.arange(N)
    out, y2, idx2, mixed = mix_batch(x, y, idx, "cutmix", 1.0, seed)
    for i in range(N):
        values, counts = out[i].unique(return_counts=True)
        named = int(idx2[i])
        share = counts[values == named].sum().item() / 64
        assert y2[i] == y[named]
        if len(values) == 1:  # paired with itself (the permutation left it in place), or an empty box
            assert share == 1.0 and (mixed.partner[i] == y[named] or mixed.lam == 1.0)
        else:  # the other value is the partner's, and its pixels form one rectangle
            assert len(values) == 2 and share == pytest.approx(mixed.lam) and share >= 0.5
            other = int(values[values != named].item())
            assert mixed.partner[i] == y[other]
            rows, cols = (out[i, 0] == other).nonzero(as_tuple=True)
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert box == len(rows)


def test_the_box_covers_one_minus_lam_when_it_fits_and_stays_inside():
    rng = np.random.default_rng(0)
    for lam in (0.1, 0.5, 0.75, 0.99):
        for _ in range(50):
            top, bottom, left, right = cut_box(28, 28, lam, rng)
            assert 0 <= top <= bottom <= 28 and 0 <= left <= right <= 28
            assert (bottom - top) * (right - left) <= round(28 * (1 - lam) ** 0.5) ** 2


def test_the_draws_follow_from_the_seed_and_none_leaves_the_batch_alone():
    x, y, idx = basis_batch()
    a, b = mix_batch(x, y, idx, "cutmix", 1.0, 7), mix_batch(x, y, idx, "cutmix", 1.0, 7)
    assert all(torch.equal(p, q) for p, q in zip(a[:3], b[:3])) and a[3] == b[3]
    c = mix_batch(x, y, idx, "mixup", 1.0, 8)
    assert not torch.equal(a[0], c[0])
    same = mix_batch(x, y, idx, "none", 1.0, 7)
    assert same[0] is x and same[1] is y and same[2] is idx and same[3] is None


def test_the_label_term_is_split_between_the_two_labels_and_the_kd_term_is_unchanged():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y, partner, lam = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([4, 3, 2, 1, 0, 1]), 0.7
    objective = Objective(kd(), T=2.0, alpha=0.4)
    loss, parts = objective(s, [t], y, mixed=Mixed(partner, lam))
    logp = F.log_softmax(s, 1)
    ce = -(lam * logp[torch.arange(6), y] + (1 - lam) * logp[torch.arange(6), partner]).mean()
    kl = (F.softmax(t / 2, 1) * (F.log_softmax(t / 2, 1) - F.log_softmax(s / 2, 1))).sum(1).mean() * 4
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.4 * ce.item() + 0.6 * kl.item(), rel=1e-5)


class Recorder(nn.Module):
    """A linear model that keeps every batch it is given."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


def recipe(mix: str):
    return OmegaConf.create(
        {
            "seed": 0,
            "mix": mix,
            "mix_alpha": 1.0,
            "trainer": {"epochs": 1, "batch_size": 50, "eval_batch_size": 1000, "max_batches": 3, "grad_clip": None},
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "scheduler": {"name": "none"},
        }
    )


@pytest.mark.parametrize("mix", ["mixup", "cutmix", "none"])
def test_the_teacher_sees_the_student_s_mixed_batch(tmp_path, mix):
    dcfg = {"name": "mnist5k", "val_size": 100, "split_seed": 0, "classes": None, "limit": 300}
    data = DeviceData(load_splits(dcfg, "unused"), torch.device("cpu"))  # no augmentation
    student, teacher = Recorder(), Recorder()
    meta = {"arch": {"name": "mlp", "kwargs": {"hidden": []}}, "data": {**data.info.to_dict(), "dataset": dcfg}}
    fit(
        Trainee("student", student, Objective(kd(), T=4.0, alpha=0.5), meta),
        data,
        recipe(mix),
        run_dir=tmp_path,
        teachers=[Teacher(teacher.eval(), torch.arange(10))],
    )
    train_steps = 3
    assert len(teacher.seen) == train_steps
    for s_in, t_in in zip(student.seen[:train_steps], teacher.seen):
        assert torch.equal(s_in, t_in)
    images = data.train.x.flatten(1)
    is_training_image = [(images == row).all(1).any().item() for row in teacher.seen[0].flatten(1)]
    if mix == "none":
        assert all(is_training_image)
    else:  # lam < 1 almost surely: mixed images are none of the training images
        assert sum(is_training_image) < len(is_training_image) // 2


def test_augment_none_turns_mixing_off_and_the_teacher_cache_says_why_it_is_not_used():
    from kdcli.data.mix import mixing
    from kdcli.teachers.cache import why_not

    assert mixing(OmegaConf.create({"augment": "none", "mix": "cutmix", "mix_alpha": 0.4})) == ("none", 1.0)
    assert mixing(OmegaConf.create({"augment": "standard", "mix": "cutmix", "mix_alpha": 0.4})) == ("cutmix", 0.4)
    base = {"teacher_cache": "auto", "dataset": {"shift": 0, "flip": False}, "mix": "mixup", "mix_alpha": 1.0}
    reason = why_not(OmegaConf.create({**base, "augment": "standard"}), Objective(kd()), [__file__])
    assert reason == "mix=mixup: the teachers see each mixed batch"
    assert why_not(OmegaConf.create({**base, "augment": "none"}), Objective(kd()), [__file__]) is None
