"""Every export format written and read back in-process: same logits as PyTorch at any batch
size, the model card inside the file, and clear errors for files kdcli cannot use."""

import json
import os

import pytest
import torch

from kdcli.core.errors import KdError
from kdcli.deploy import formats
from kdcli.models import build_model

UMASK = os.umask(0o022)
os.umask(UMASK)

DATA = {
    "name": "mnist5k",
    "input_shape": [1, 28, 28],
    "num_classes": 10,
    "class_names": [str(i) for i in range(10)],
    "mean": [0.13],
    "std": [0.31],
    "dataset": {"name": "mnist5k", "val_size": 500, "split_seed": 0, "classes": None, "limit": None},
}


def _checkpoint(arch: str) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = build_model(arch, DATA["input_shape"], 10).eval()
    ck = {"role": "student", "arch": {"name": arch, "kwargs": {}}, "data": DATA, "state_dict": model.state_dict()}
    return model, ck


@pytest.mark.parametrize("fmt", list(formats.EXPORTERS))
@pytest.mark.parametrize("arch", ["mlp", "convnet"])
def test_export_reads_back_with_the_same_logits_and_card(tmp_path, fmt, arch):
    model, ck = _checkpoint(arch)
    card = formats.card_of(ck, "src.pt")
    path = tmp_path / f"m{formats.SUFFIXES[fmt]}"
    x = torch.randn(7, 1, 28, 28)
    formats.EXPORTERS[fmt](model, x[:2], path, card, 18)
    assert path.stat().st_mode & 0o777 == 0o666 & ~UMASK  # as any other output (safetensors replaces its file)
    opened = formats.open_model(path, trust_programs=True)  # written just above: its own program
    assert opened.fmt == fmt and formats.detect(path) == fmt
    assert opened.card == json.loads(json.dumps(card))  # the card travels inside the file
    with torch.no_grad():
        want = model(x)
    for batch in (1, 3, 7):  # a dynamic batch axis: other sizes than the example's
        got = opened.run(x[:batch])
        assert got.shape == (batch, 10)
        torch.testing.assert_close(got, want[:batch], atol=1e-5, rtol=1e-5)
    assert opened.label == f"student ({fmt})"


def test_a_torchscript_file_is_recognised_whatever_its_name(tmp_path):
    model, ck = _checkpoint("mlp")
    path = tmp_path / "renamed.pt"
    formats.export_torchscript(model, torch.zeros(2, 1, 28, 28), path, formats.card_of(ck, "src.pt"), 18)
    assert formats.detect(path) == "torchscript"


def test_files_without_a_card_or_unreadable_are_refused(tmp_path):
    from safetensors.torch import save_file

    model, _ = _checkpoint("mlp")
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, bare)
    with pytest.raises(KdError, match="has no kdcli model card"):
        formats.open_model(bare)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(KdError, match=r"Cannot read .*broken.onnx as onnx"):
        formats.open_model(broken)
    with pytest.raises(KdError, match="Model file not found"):
        formats.open_model(tmp_path / "nope.onnx")


def test_labels_name_pruning_and_quantization():
    card = {"role": "student", "pruning": {"final": 0.75, "kind": "unstructured"}, "quantization": {"mode": "static"}}
    m = formats.ModelFile(path=None, fmt="onnx", card=card, run=None, device=torch.device("cpu"))
    assert m.label == "student (pruned 75% unstructured, int8 static, onnx)"


def test_an_export_that_differs_from_pytorch_fails_its_check(tmp_path):
    from kdcli.deploy.export import check

    model, ck = _checkpoint("mlp")
    path = tmp_path / "m.onnx"
    x = torch.randn(20, 1, 28, 28)
    formats.export_onnx(model, x[:2], path, formats.card_of(ck, "src.pt"), 18)
    with torch.no_grad():
        reference = model(x)
    assert check(path, x, reference, 8, atol=1e-4)["ok"]
    shifted = reference.clone()
    shifted[3, 0] += 0.01  # one logit off by 0.01: the agreement may stay, the check must not pass
    r = check(path, x, shifted, 8, atol=1e-4)
    assert not r["ok"] and r["max_abs_diff"] == pytest.approx(0.01, abs=1e-4) and r["checked_images"] == 20


@pytest.mark.parametrize("fmt", list(formats.EXPORTERS))
def test_sparsity_is_read_from_every_float_format(tmp_path, fmt):
    from kdcli.commands.evaluate import _sparsity
    from kdcli.training.prune import sparsity

    model, ck = _checkpoint("mlp")
    with torch.no_grad():
        model[1].weight[:, ::2] = 0  # half the first layer's weights; the classifier is not counted
    path = tmp_path / f"m{formats.SUFFIXES[fmt]}"
    formats.EXPORTERS[fmt](model, torch.zeros(2, 1, 28, 28), path, formats.card_of(ck, "src.pt"), 18)
    opened = formats.open_model(path, trust_programs=True)  # written just above: its own program
    assert sparsity(model) == pytest.approx(0.5)
    assert _sparsity(opened, formats.rebuild(opened.card)) == pytest.approx(0.5)
