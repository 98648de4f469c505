"""augment=affine: random rotation, scaling and translation of the batches held in memory."""

import torch

from kdcli.data.device import ROTATE_DEG, SCALE, affine_batch


def blob(b: int = 8, size: int = 28) -> torch.Tensor:
    """A bright square in the middle of a black (-1) image."""
    x = torch.full((b, 1, size, size), -1.0)
    x[:, :, 10:18, 10:18] = 1.0
    return x


def test_black_stays_black_and_shapes_are_kept():
    fill = torch.tensor([-1.0])
    x = torch.full((4, 1, 28, 28), -1.0)
    out = affine_batch(x, 2, fill, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.allclose(out, x)


def test_the_blob_moves_at_most_the_shift_and_keeps_its_mass_within_the_scaling():
    fill = torch.tensor([-1.0])
    x = blob()
    out = affine_batch(x, 2, fill, torch.Generator().manual_seed(1))
    mass = lambda t: (t + 1).sum(dim=(1, 2, 3))  # noqa: E731  (bright pixels above black)
    ratio = mass(out) / mass(x)
    assert ((ratio > (1 - SCALE) ** 2 * 0.95) & (ratio < (1 + SCALE) ** 2 * 1.05)).all()
    grid = torch.arange(28.0)
    for img in out:
        w = (img[0] + 1).clamp(min=0)
        cy, cx = (w.sum(1) * grid).sum() / w.sum(), (w.sum(0) * grid).sum() / w.sum()
        # rotation and scale about the centre; the translation is of the sampling grid, so the
        # content moves by up to shift / scale pixels
        bound = 2 / (1 - SCALE) + 0.05
        assert abs(cy - 13.5) <= bound and abs(cx - 13.5) <= bound
    assert not torch.allclose(out[0], out[1])  # each image its own draw
    assert ROTATE_DEG == 15.0


def test_a_process_part_gets_the_rows_of_the_whole_batch():
    fill = torch.tensor([-1.0])
    x = blob(6)
    whole = affine_batch(x, 2, fill, torch.Generator().manual_seed(3))
    part = affine_batch(x[2:5], 2, fill, torch.Generator().manual_seed(3), rows=(2, 5, 6))
    assert torch.allclose(whole[2:5], part, atol=1e-6)
