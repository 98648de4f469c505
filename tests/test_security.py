"""Files from someone else: a model file never runs its author's code unless told to trust it,
a name read from a file never decides where kdcli writes, and what a file claims (its
architecture, its bytes) is checked against what it holds before anything is built. Crafted
files whose payload would create a marker file; every written file must lie inside the chosen
folder; memory stays bounded by the file's real size."""

import contextlib
import io
import json
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import run_kd, start_kd
from test_faults import RunsCode, assert_one_error
from test_formats import DATA

from kdcli.core.errors import KdError
from kdcli.core.files import safe_name
from kdcli.deploy import formats
from kdcli.training import checkpoint

PROGRAM_SUFFIXES = {fmt: formats.SUFFIXES[fmt] for fmt in formats.PROGRAMS}


def rewrite_member(src: Path, dst: Path, member: str, payload: bytes) -> None:
    """A copy of the zip `src` whose member ending in `member` holds `payload` instead."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        hits = 0
        for info in zin.infolist():
            hit = info.filename.endswith(member)
            hits += hit
            zout.writestr(info, payload if hit else zin.read(info.filename))
    assert hits == 1, f"{src} has no member {member}"


def crafted(genuine: Path, fmt: str, marker: Path) -> Path:
    """The file `genuine` with a payload that creates `marker` when unpickled: in a torch.export
    archive its sample inputs (torch.export falls back to a full unpickling of them), in a
    TorchScript file its constants."""
    dst = genuine.with_name(f"crafted{formats.SUFFIXES[fmt]}")
    if fmt == "torch_export":
        buffer = io.BytesIO()
        torch.save(RunsCode(os.system, f"touch {marker}"), buffer)
        rewrite_member(genuine, dst, "sample_inputs/model.pt", buffer.getvalue())
    else:
        payload = pickle.dumps(RunsCode(os.system, f"touch {marker}"), protocol=2)
        rewrite_member(genuine, dst, "constants.pkl", payload)
    return dst


def write_exports(ck_path: Path, out: Path, fmts) -> dict[str, Path]:
    """A checkpoint's exports written in-process (the writers of kd export)."""
    ck = checkpoint.load(ck_path)
    model = checkpoint.build_from(ck).eval()
    x = torch.zeros(2, *ck["data"]["input_shape"])
    paths = {}
    for fmt in fmts:
        paths[fmt] = out / f"genuine{formats.SUFFIXES[fmt]}"
        formats.EXPORTERS[fmt](model, x, paths[fmt], formats.card_of(ck, ck_path), 18)
    return paths


# ----------------------------------------------------------------------------------------------
# Programs are refused unless trusted; data formats never unpickle


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> dict[str, Path]:
    """A tiny mlp checkpoint and its exports in every format."""
    from kdcli.models import build_model

    out = tmp_path_factory.mktemp("genuine")
    data = {**DATA, "dataset": {"name": "mnist5k"}}
    torch.manual_seed(0)
    model = build_model("mlp", data["input_shape"], 10)
    checkpoint.save(out / "student.pt", model, arch={"name": "mlp", "kwargs": {}}, data=data, role="student")
    return {"checkpoint": out / "student.pt", **write_exports(out / "student.pt", out, formats.EXPORTERS)}


@pytest.mark.parametrize("fmt", list(formats.PROGRAMS))
def test_a_crafted_program_is_refused_before_anything_is_unpickled(genuine, tmp_path, fmt):
    marker = tmp_path / "ran"
    evil = crafted(genuine[fmt], fmt, marker)
    with pytest.raises(KdError, match=f"Refusing to load {evil}: it is a .* program.*trust_programs=true"):
        formats.open_model(evil)
    renamed = tmp_path / "student_best.pt"  # a program renamed to a checkpoint's name is still one
    renamed.write_bytes(evil.read_bytes())
    assert formats.detect(renamed) == fmt
    with pytest.raises(KdError, match="Refusing to load"):
        formats.open_model(renamed)
    assert not marker.exists()


def test_the_torch_export_payload_is_live(genuine, tmp_path):
    """Without the refusal, torch.export.load would have run the crafted file's code."""
    marker = tmp_path / "ran"
    evil = crafted(genuine["torch_export"], "torch_export", marker)
    with contextlib.suppress(Exception):  # what fails after the payload ran (its result is no input) varies
        torch.export.load(evil)
    assert marker.exists()


@pytest.mark.parametrize("fmt", list(formats.PROGRAMS))
def test_a_trusted_genuine_program_opens(genuine, fmt):
    opened = formats.open_model(genuine[fmt], trust_programs=True)
    assert opened.fmt == fmt and opened.card["role"] == "student"
    assert opened.run(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("fmt", ["onnx", "safetensors", "checkpoint"])
def test_data_formats_open_without_unpickling_anything(genuine, monkeypatch, fmt):
    from kdcli.commands.evaluate import _sparsity

    def refuse(*args, **kwargs):
        raise AssertionError("a data format was unpickled")

    for owner, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch.jit, "load")]:
        monkeypatch.setattr(owner, name, refuse)
    monkeypatch.setattr(torch.export, "load", refuse)
    if fmt != "checkpoint":  # a checkpoint is read by torch.load with weights_only=True
        monkeypatch.setattr(torch, "load", refuse)
    opened = formats.open_model(genuine[fmt])
    assert opened.run(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert _sparsity(opened, formats.rebuild(opened.card)) is not None


def test_export_reads_back_only_the_file_it_wrote(genuine, tmp_path):
    from kdcli.deploy.export import check, export_file

    ck = checkpoint.load(genuine["checkpoint"])
    model = checkpoint.build_from(ck).eval()
    x = torch.zeros(4, 1, 28, 28)
    target = tmp_path / "m.pt2"
    written = export_file("torch_export", model, x, target, formats.card_of(ck, "src.pt"), 18, Path("src.pt"))
    with torch.no_grad():
        reference = model(x)
    assert check(target, x, reference, 4, 1e-4, written)["ok"]
    marker = tmp_path / "ran"
    evil = crafted(target, "torch_export", marker)
    os.replace(evil, target)  # another process swaps the file between the write and the check
    with pytest.raises(KdError, match="changed after kd export wrote it"):
        check(target, x, reference, 4, 1e-4, written)
    with pytest.raises(KdError, match="Refusing to load"):
        check(target, x, reference, 4, 1e-4)  # without the identity of its own write: not trusted
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# End to end with the real kd


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A smoke distill run (its student checkpoint) and the student's genuine programs."""
    root = tmp_path_factory.mktemp("trained")
    r = run_kd("distill", "debug=smoke", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = (root / "runs" / "distill").iterdir()
    student = run / "checkpoints" / "student_best.pt"
    return {"root": root, "run": run, "student": student, **write_exports(student, root, formats.PROGRAMS)}


@pytest.mark.slow
def test_kd_evaluate_refuses_crafted_programs_and_runs_none(trained, tmp_path):
    cwd = tmp_path
    marker = tmp_path / "ran"
    evil = {fmt: crafted(trained[fmt], fmt, marker) for fmt in formats.PROGRAMS}
    # A run folder whose files are programs: a student_best.pt that is a torch.export archive, and
    # a teacher (named by its metrics.json) that is a TorchScript file.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "student_best.pt").write_bytes(evil["torch_export"].read_bytes())
    (run / "metrics.json").write_text(
        json.dumps({"status": "completed", "teacher": {"checkpoint": str(evil["torchscript"])}})
    )
    student = trained["student"]
    cases = [
        ([f"checkpoints=[{evil['torch_export']}]"], evil["torch_export"]),
        ([f"checkpoints=[{student},{evil['torchscript']}]"], evil["torchscript"]),
        ([f"checkpoints=[{student}]", f"reference={evil['torch_export']}"], evil["torch_export"]),
        ([f"checkpoints=[{student}]", f"reference={evil['torchscript']}"], evil["torchscript"]),
        ([f"run={run}"], evil["torchscript"]),  # the teacher comes first
    ]
    for args, named in cases:
        r = run_kd("evaluate", *args, "latency.repeats=0", "figures=false", cwd=cwd)
        assert_one_error(r, "Refusing to load", "program", "trust_programs=true", names=named)
        assert not marker.exists(), f"kd evaluate {args} ran the file's code"
    (run / "metrics.json").write_text(json.dumps({"status": "completed"}))
    r = run_kd("evaluate", f"run={run}", "latency.repeats=0", "figures=false", cwd=cwd)
    assert_one_error(r, "Refusing to load", "torch.export program", names=run / "checkpoints" / "student_best.pt")
    assert not marker.exists()

    # Trusted, the genuine programs evaluate, and score as their checkpoint
    programs = ",".join(str(trained[fmt]) for fmt in formats.PROGRAMS)
    r = run_kd(
        "evaluate",
        f"checkpoints=[{student},{programs}]",
        "trust_programs=true",
        "latency.repeats=0",
        "figures=false",
        cwd=cwd,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (ev,) = (cwd / "runs" / "evaluate").glob("*/evaluation.json")
    accs = {row["format"]: row["acc"] for row in json.loads(ev.read_text())["models"]}
    assert set(accs) == {"checkpoint", *formats.PROGRAMS} and len(set(accs.values())) == 1


# ----------------------------------------------------------------------------------------------
# Names read from files


ORDINARY = ["mlp_student", "convnet_teacher", "resnet18_scratch", "tv_resnet18_student", "mlp-v2.1", "a+b"]
HOSTILE = [
    "../../evil",
    "/../../../evil",
    "/tmp/evil",
    "..",
    ".",
    "",
    "a\x00b",
    "\x00",
    ".hidden",
    "-rf",
    "a/../b",
    "C:\\Windows\\evil",
    "x" * 300,
    "é" * 300,
    "\n\t",
]


@pytest.mark.parametrize("name", ORDINARY)
def test_ordinary_names_are_kept(name):
    assert safe_name(name) == name


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_name_becomes_one_harmless_path_component(tmp_path, name):
    safe = safe_name(name)
    assert safe and len(safe) <= 100
    assert not {"/", "\\", "\x00"} & set(safe) and ".." not in safe and safe[0] not in ".-"
    assert (tmp_path / f"{safe}.int8-dynamic.onnx").resolve().parent == tmp_path.resolve()
    (tmp_path / f".{safe}.int8-dynamic.onnx.123456-abcdefgh.tmp").write_text("")  # atomic_write's temp name fits


def test_long_names_stay_apart():
    a, b = "r" * 300 + "a", "r" * 300 + "b"
    assert safe_name(a) != safe_name(b) and len(safe_name(a)) == 100


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_names_in_a_checkpoint_never_steer_where_files_are_written(trained, tmp_path):
    ck = torch.load(trained["student"], weights_only=True)
    escape = tmp_path / "escaped"  # where an absolute role would have pointed
    roles = {
        "traversal": "/../../../../../escaped/evil",
        "dots": "../../../../evil",
        "absolute": str(escape / "evil"),
        "nul": "evil\x00name",
        "long": "r" * 300,
    }
    sources = {}
    for case, role in roles.items():
        sources[case] = tmp_path / "in" / f"{case}.pt"
        sources[case].parent.mkdir(exist_ok=True)
        checkpoint.write(sources[case], {**ck, "role": role})
    before = _files(tmp_path)

    for case, source in sources.items():
        out = tmp_path / "a" / "b" / "c" / case
        fmts = [] if case == "traversal" else ["formats=[safetensors]"]  # every format once
        r = run_kd("export", f"checkpoint={source}", f"out_dir={out}", *fmts, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        new = {p for p in _files(tmp_path) - before if "runs" not in p.relative_to(tmp_path).parts}
        assert new and all(p.parent == out for p in new), sorted(map(str, new))
        suffixes = {"".join(p.suffixes[-2:]) if p.name.endswith(".torchscript.pt") else p.suffix for p in new}
        assert suffixes == ({".json", *formats.SUFFIXES.values()} if case == "traversal" else {".json", ".safetensors"})
        assert all(len(p.name) < 128 for p in new)
        before |= new
    assert not escape.exists()

    out = tmp_path / "a" / "b" / "c" / "quantized"
    r = run_kd(
        "quantize", f"checkpoint={sources['traversal']}", f"out_dir={out}", "modes=[dynamic]", "latency.repeats=0",
        "limit=64", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    new = {p for p in _files(tmp_path) - before if "runs" not in p.relative_to(tmp_path).parts}
    assert {p.name for p in new} == {
        f"mlp_escaped_evil{s}" for s in (".float.onnx", ".int8-dynamic.onnx", ".quantization.json")
    }
    assert all(p.parent == out for p in new)

    # kd evaluate names its files itself; the role is only a label
    r = run_kd("evaluate", f"checkpoints=[{sources['traversal']}]", "latency.repeats=0", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (ev,) = (tmp_path / "runs" / "evaluate").glob("*/evaluation.json")
    assert json.loads(ev.read_text())["models"][0]["role"] == roles["traversal"]
    assert {p.name for p in ev.parent.iterdir() if p.is_file()} >= {"evaluation.json", "confusion.png"}
    assert not escape.exists() and not list(tmp_path.rglob("evil*"))


@pytest.mark.slow
def test_an_unknown_arch_name_is_one_error(trained, tmp_path):
    ck = torch.load(trained["student"], weights_only=True)
    source = tmp_path / "arch.pt"
    checkpoint.write(source, {**ck, "arch": {"name": "../../evil", "kwargs": {}}})
    r = run_kd("export", f"checkpoint={source}", f"out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert_one_error(r)
    assert not (tmp_path / "out").exists() and not list(tmp_path.rglob("evil*"))


# ----------------------------------------------------------------------------------------------
# What a file claims is checked against what it holds


def _claiming(ck: dict, hidden: list[int]) -> dict:
    return {**ck, "arch": {"name": "mlp", "kwargs": {"hidden": hidden}}}


@pytest.mark.parametrize("hidden", [[1_500_000], [10**12], [10**30], []])
def test_a_claimed_architecture_is_refused_before_anything_is_allocated(genuine, monkeypatch, hidden):
    ck = torch.load(genuine["checkpoint"], weights_only=True)
    real, built_on = checkpoint.build_arch, []

    def spy(arch, data):
        built_on.append(torch.empty(0).device.type)  # the device factories default to here
        return real(arch, data)

    monkeypatch.setattr(checkpoint, "build_arch", spy)
    with pytest.raises(KdError, match=r"(do not fit model 'mlp'|Cannot build model 'mlp').*"):
        checkpoint.build_from(_claiming(ck, hidden), genuine["checkpoint"])
    assert built_on == ["meta"]


def test_a_safetensors_card_that_claims_another_architecture_is_refused(genuine, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(genuine["safetensors"]), framework="pt") as f:
        card, state = json.loads(f.metadata()[formats.CARD]), {k: f.get_tensor(k) for k in f.keys()}
    card["arch"]["kwargs"] = {"hidden": [10**12]}
    path = tmp_path / "claims.safetensors"
    save_file(state, path, metadata={formats.CARD: json.dumps(card)})
    with pytest.raises(
        KdError, match=r"do not fit model 'mlp' .*size mismatch for 1.weight: the file holds \[256, 784\]"
    ):
        formats.open_model(path)


def test_an_onnx_card_that_claims_more_weights_than_the_file_holds_is_refused(genuine, tmp_path):
    import shutil

    assert formats.rebuild(formats.open_model(genuine["onnx"]).card, genuine["onnx"]) is not None
    path = tmp_path / "claims.onnx"
    shutil.copy(genuine["onnx"], path)
    card = formats.open_model(path).card
    formats.set_onnx_card(path, {**card, "arch": {"name": "mlp", "kwargs": {"hidden": [10**12]}}})
    opened = formats.open_model(path)  # its graph is genuine: it runs
    with pytest.raises(KdError, match=r"model card of .*claims.onnx claims mlp .*more than the file's"):
        formats.rebuild(opened.card, opened.path)


def _member_bytes(path: Path, member: str) -> tuple[int, int]:
    """Where a stored member's bytes start in the zip file, and how many there are."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member))
    data = path.read_bytes()
    header = data[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    return start, info.file_size


def _flipped(src: Path, dst: Path, offsets) -> Path:
    data = bytearray(src.read_bytes())
    for o in offsets:
        data[o] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("member", ["data/0", "data.pkl"])
def test_flipped_bytes_in_a_checkpoint_fail_its_crc(genuine, tmp_path, member):
    start, size = _member_bytes(genuine["checkpoint"], member)
    bad = _flipped(genuine["checkpoint"], tmp_path / "flipped.pt", range(start + size // 2, start + size // 2 + 42))
    with pytest.raises(KdError, match=f"Cannot read checkpoint {bad}: the file is corrupt .*{member} fails its CRC"):
        checkpoint.load(bad)


def test_random_bytes_in_a_checkpoint_never_load(genuine, tmp_path):
    import random

    size = genuine["checkpoint"].stat().st_size
    for seed in range(10):
        r = random.Random(seed)
        bad = _flipped(genuine["checkpoint"], tmp_path / f"r{seed}.pt", [r.randrange(size) for _ in range(16)])
        with pytest.raises(KdError, match="Cannot read checkpoint|Refusing to load|not a kdcli checkpoint"):
            checkpoint.load(bad)


def test_a_compressed_bomb_is_refused_by_its_claimed_size(genuine, tmp_path):
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(genuine["checkpoint"]) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        zout.writestr("archive/data/99", bytes(64 * 2**20))  # 64 MiB of zeros in a few KiB
    assert bomb.stat().st_size < 4 * 2**20
    with pytest.raises(KdError, match="the file is corrupt .*claim 67,.* bytes, far more than the file's"):
        checkpoint.load(bomb)


def test_a_trusted_program_with_flipped_bytes_is_refused(genuine, tmp_path):
    start, size = _member_bytes(genuine["torchscript"], "data/0")
    bad = _flipped(genuine["torchscript"], tmp_path / "flipped.torchscript.pt", [start + size // 2])
    with pytest.raises(KdError, match="the file is corrupt .*fails its CRC"):
        formats.open_model(bad, trust_programs=True)


def _kd_measured(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, int]:
    """Run `kd` like run_kd, and also return the peak memory (bytes) of that process alone."""
    p = start_kd(cwd, *args)
    out = p.stdout.read()
    p.stdout.close()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return subprocess.CompletedProcess(p.args, p.returncode, out, ""), usage.ru_maxrss * 1024


@pytest.mark.slow
def test_kd_refuses_claimed_sizes_and_flipped_bytes_in_bounded_memory(trained, tmp_path):
    ck = torch.load(trained["student"], weights_only=True)
    huge = tmp_path / "huge.pt"
    checkpoint.write(huge, _claiming(ck, [1_500_000]))  # 4.7 GB of float32 weights if it were built
    start, size = _member_bytes(trained["student"], "data/0")
    flipped = _flipped(trained["student"], tmp_path / "flipped.pt", range(start + size // 2, start + size // 2 + 42))
    for args, phrase, named in [
        (["evaluate", f"checkpoints=[{huge}]", "latency.repeats=0"], "do not fit model 'mlp'", huge),
        (["export", f"checkpoint={huge}", f"out_dir={tmp_path / 'out'}"], "do not fit model 'mlp'", huge),
        (["evaluate", f"checkpoints=[{flipped}]", "latency.repeats=0"], "fails its CRC check", flipped),
        (["distill", f"teacher.ckpt={flipped}", "debug=smoke"], "fails its CRC check", flipped),
    ]:
        r, peak = _kd_measured(*args, cwd=tmp_path)
        assert_one_error(r, phrase, names=named)
        assert peak < 2 * 2**30, f"kd {args[0]} peaked at {peak / 2**30:.1f} GiB"
    assert not (tmp_path / "out").exists()
