import pickle
import re
from pathlib import Path

import pytest
import torch

from kdcli.core import files
from kdcli.core.errors import KdError
from kdcli.models import build_model
from kdcli.training import checkpoint

DATA = {
    "name": "mnist5k",
    "input_shape": [1, 28, 28],
    "num_classes": 10,
    "class_names": list("0123456789"),
    "mean": [0.13],
    "std": [0.31],
    "dataset": {"name": "mnist5k"},
}


def _save(path: Path):
    model = build_model("mlp", (1, 28, 28), 10, {"hidden": [16]})
    checkpoint.save(path, model, arch={"name": "mlp", "kwargs": {"hidden": [16]}}, data=DATA, role="student", epoch=3)
    return model


def test_roundtrip_is_weights_only_and_self_describing(tmp_path):
    model = _save(tmp_path / "a.pt")
    raw = torch.load(tmp_path / "a.pt", weights_only=True)  # plain containers only
    assert raw["arch"] == {"name": "mlp", "kwargs": {"hidden": [16]}} and raw["epoch"] == 3
    rebuilt = checkpoint.build_from(checkpoint.load(tmp_path / "a.pt"))
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), model(x))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_missing_truncated_foreign_and_pickled_files_are_refused(tmp_path, capsys):
    with pytest.raises(KdError, match="Checkpoint not found"):
        checkpoint.load(tmp_path / "nope.pt")
    _save(tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(KdError, match="truncated, corrupt or not a PyTorch file"):
        checkpoint.load(tmp_path / "cut.pt")
    (tmp_path / "notes.pt").write_text("hello, not a checkpoint\n")
    with pytest.raises(KdError, match="notes.pt: the file is truncated, corrupt or not a PyTorch file"):
        checkpoint.load(tmp_path / "notes.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(KdError, match="not a kdcli checkpoint"):
        checkpoint.load(tmp_path / "other.pt")

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "kdcli-checkpoint", "x": Payload()}, f)
    torch.save({"format": "kdcli-checkpoint", "x": Payload()}, tmp_path / "evil2.pt")
    # A torch.save'd payload is caught by name; a raw pickle stream by its opcodes.
    with pytest.raises(KdError, match=r"Refusing to load .*evil2.pt: .*it would import (builtins\.)?print"):
        checkpoint.load(tmp_path / "evil2.pt")
    with pytest.raises(KdError, match=r"Refusing to load .*evil.pt: .*it would import builtins.print.*could run code"):
        checkpoint.load(tmp_path / "evil.pt")
    assert "code ran" not in capsys.readouterr().out


def test_weights_of_another_architecture_are_refused(tmp_path):
    _save(tmp_path / "a.pt")
    ck = checkpoint.load(tmp_path / "a.pt")
    ck["arch"]["kwargs"] = {"hidden": [32]}
    with pytest.raises(KdError, match="do not fit model 'mlp'"):
        checkpoint.build_from(ck, tmp_path / "a.pt")


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "m.json"
    files.write_json(target, {"v": 1})

    def crash(tmp):
        Path(tmp).write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.atomic_write(target, crash)
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def _edited(ck: dict, key: str, value) -> dict:
    """ck with key ("arch", "data.num_classes", ...) set to value, or removed for ...; a copy."""
    out = {**ck, "arch": dict(ck["arch"]), "data": dict(ck["data"])}
    parent, _, leaf = key.rpartition(".")
    node = out[parent] if parent else out
    if value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    return out


@pytest.mark.parametrize(
    "content, phrase",
    [
        ({"weights": 1}, "not a kdcli checkpoint"),
        ([1, 2], "not a kdcli checkpoint"),
        (torch.zeros(3), "not a kdcli checkpoint"),
        (None, "not a kdcli checkpoint"),
        ({"format": checkpoint.FORMAT}, "no arch {name, kwargs}"),
        (("arch", ...), "no arch {name, kwargs}"),
        (("arch", "mlp"), "no arch {name, kwargs}"),
        (("arch.name", 5), "no arch {name, kwargs}"),
        (("arch.kwargs", [1]), "arch.kwargs is not a mapping"),
        (("data", ...), "no data {input_shape"),
        (("data", "x"), "no data {input_shape"),
        (("data.input_shape", ...), "data.input_shape is not [channels, height, width]"),
        (("data.input_shape", [1, 28, -28]), "data.input_shape is not [channels, height, width]"),
        (("data.num_classes", "ten"), "data.num_classes is not a count"),
        (("data.class_names", ["0"]), "data.class_names is not one name per class"),
        (("data.mean", [0.1, 0.2]), "data.mean is not one number per channel"),
        (("data.std", "x"), "data.std is not one number per channel"),
        (("data.dataset", [1]), "data.dataset is not a mapping"),
        (("state_dict", "x"), "state_dict is not a mapping of tensors"),
        (("state_dict", {"w": [1.0]}), "state_dict is not a mapping of tensors"),
        (("role", ["student"]), "its role is not a name"),
    ],
)
def test_a_checkpoint_without_the_fields_kdcli_writes_is_refused_by_name(tmp_path, content, phrase):
    _save(tmp_path / "good.pt")
    if isinstance(content, tuple):
        content = _edited(torch.load(tmp_path / "good.pt", weights_only=True), *content)
    torch.save(content, tmp_path / "odd.pt")
    with pytest.raises(KdError, match=re.escape(phrase)) as e:
        checkpoint.read(tmp_path / "odd.pt")
    assert str(tmp_path / "odd.pt") in str(e.value)


def test_a_complete_checkpoint_reads_as_it_loads(tmp_path):
    _save(tmp_path / "good.pt")
    assert checkpoint.read(tmp_path / "good.pt").keys() == checkpoint.load(tmp_path / "good.pt").keys()
