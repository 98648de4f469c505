"""What a user ships after distilling, end to end with the real `kd`: a distilled student with
adapters (FitNets) and a pruned one, exported in every format, quantized to int8, and
everything compared by one `kd evaluate`."""

import json
from pathlib import Path

import pytest
import torch

from kdcli.deploy import formats, latency
from kdcli.models import build_model
from kdcli.training import checkpoint

pytestmark = pytest.mark.slow

TINY = ["trainer.epochs=2", "dataset.limit=600", "trainer.batch_size=64", "device=cpu"]
PNG = b"\x89PNG\r\n\x1a\n"


def newest(root: Path) -> Path:
    return max((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_distill_prune_export_quantize_evaluate(kd):
    runs = kd.dir / "runs"
    r = kd("distill", "features=[fitnet]", "features.fitnet.weight=1", *TINY)
    assert r.returncode == 0, r.stdout + r.stderr
    d_dir = newest(runs / "distill")
    m = metrics(d_dir)
    # 600 images, val 10 % -> 540 train -> 9 steps of 64 per epoch, 18 in all
    r = kd("distill", "baseline=false", "prune.kind=unstructured", "prune.end_step=12", "prune.every=3", *TINY)
    assert r.returncode == 0, r.stdout + r.stderr
    p_dir = newest(runs / "distill")
    assert p_dir != d_dir

    # export: the student only (the FitNets adapter stays behind), every format checked
    r = kd("export", f"run={d_dir}")
    assert r.returncode == 0, r.stdout + r.stderr
    e_dir = newest(runs / "export")
    exports = metrics(e_dir)["exports"]
    assert sorted(exports) == sorted(formats.EXPORTERS)
    for fmt, e in exports.items():
        assert e["ok"] and e["top1_agreement"] == 1.0 and e["max_abs_diff"] < 1e-4, fmt
    from safetensors import safe_open

    with safe_open(exports["safetensors"]["path"], framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(build_model("mlp", (1, 28, 28), 10).state_dict())  # nothing but the student
    state = torch.load(d_dir / "checkpoints" / "student_resume.pt", weights_only=True)
    adapter = state["objectives"]["student"]  # the FitNets regressor exists, in the training state only
    assert any(k.endswith("weight") for k in adapter) and not keys & set(adapter)
    card = json.loads((e_dir / "mlp_student.json").read_text())
    assert card["arch"]["name"] == "mlp" and card["onnx_opset"] == 18 and card["class_names"][0] == "0"

    # quantize: int8 files that keep the accuracy and shrink the file
    r = kd("quantize", f"run={d_dir}", "latency.repeats=2", "latency.warmup=1")
    assert r.returncode == 0, r.stdout + r.stderr
    q_dir = newest(runs / "quantize")
    q = json.loads((q_dir / "mlp_student.quantization.json").read_text())["models"]
    assert set(q) == {"float, pytorch", "float, onnx", "int8 dynamic, onnx", "int8 static, onnx"}
    assert q["float, onnx"]["acc"] == q["float, pytorch"]["acc"]
    for mode in ("dynamic", "static"):
        row = q[f"int8 {mode}, onnx"]
        assert abs(row["acc_change"]) <= 0.02 and row["agreement_with_float"] >= 0.97
        assert row["size_ratio"] < 0.3  # int8 weights: about a quarter of float32
        assert formats.open_model(row["path"]).card["quantization"]["mode"] == mode
    for row in q.values():  # a speed-up only from timings whose spread is not noise
        noisy = row["latency_noisy"] or q["float, pytorch"]["latency_noisy"]
        assert (row["speedup_bs1"] is None) == noisy and (row["speedup_batch"] is None) == noisy
        assert row["latency_noisy"] == (latency.spread(row) > latency.NOISY)

    # evaluate: one table for teacher, scratch, distilled, pruned, exported and int8 students
    teacher = m["teacher"]["checkpoint"]
    files = [
        teacher,
        d_dir / "checkpoints" / "scratch_best.pt",
        d_dir / "checkpoints" / "student_best.pt",
        p_dir / "checkpoints" / "student_best.pt",
        exports["onnx"]["path"],
        exports["torch_export"]["path"],
        exports["torchscript"]["path"],
        q_dir / "mlp_student.int8-dynamic.onnx",
    ]
    r = kd(
        "evaluate",
        f"checkpoints=[{','.join(map(str, files))}]",
        "trust_programs=true",  # the .pt2 and .torchscript.pt files are programs, exported above
        "latency.repeats=2",
        "latency.warmup=1",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    v_dir = newest(runs / "evaluate")
    ev = json.loads((v_dir / "evaluation.json").read_text())
    rows = {row["name"]: row for row in ev["models"]}
    assert list(rows) == [
        "teacher",
        "scratch",
        "student",
        "student (pruned 75% unstructured)",
        "student (onnx)",
        "student (torch_export)",
        "student (torchscript)",
        "student (int8 dynamic, onnx)",
    ]
    for name in rows:
        assert name in r.stdout
    assert rows["teacher"]["acc"] == pytest.approx(m["teacher"]["test_acc"])
    assert rows["student"]["acc"] == pytest.approx(m["student"]["test_acc"])
    assert rows["student (onnx)"]["acc"] == rows["student"]["acc"]  # the export scores as its checkpoint
    assert rows["student (torch_export)"]["acc"] == rows["student"]["acc"]
    assert rows["student (torchscript)"]["acc"] == rows["student"]["acc"]
    assert rows["student"]["agreement"] == pytest.approx(m["student"]["teacher_agreement"])
    assert rows["student (pruned 75% unstructured)"]["sparsity"] == pytest.approx(0.75, abs=0.005)
    assert rows["student"]["sparsity"] == 0.0 and rows["teacher"]["agreement"] == 1.0
    assert rows["student"]["flops"] == 2 * (784 * 256 + 256 * 10)  # two matmuls, a multiply-add = 2
    assert rows["student"]["params"] == 784 * 256 + 256 + 256 * 10 + 10
    assert rows["student (int8 dynamic, onnx)"]["flops"] == rows["student"]["flops"]  # the same architecture
    for row in rows.values():
        assert row["latency_ms_bs1"] > 0 and row["throughput_per_s"] > 0 and row["size_mb"] > 0
        assert row["latency_iqr_ms_bs1"] >= 0 and row["latency_iqr_ms_batch"] >= 0 and row["latency_runs"] == 2
        assert row["latency_noisy"] == (latency.spread(row) > latency.NOISY)
        assert len(row["per_class_acc"]) == 10 and sum(map(sum, row["confusion"])) == ev["images"]
    # top-5 and per-class accuracy recomputed from the checkpoint, independently of evaluate
    ck = checkpoint.load(d_dir / "checkpoints" / "student_best.pt")
    model = checkpoint.build_from(ck).eval()
    from kdcli.training.build import checkpoint_data

    test = checkpoint_data(ck["data"], str(kd.dir / "data"), torch.device("cpu")).test
    with torch.no_grad():
        out = torch.cat([model(x) for x in test.batches(256)])
    top5 = (out.topk(5, 1).indices == test.y[:, None]).any(1).float().mean().item()
    assert rows["student"]["top5"] == pytest.approx(top5)
    c0 = test.y == 0
    assert rows["student"]["per_class_acc"][0] == pytest.approx((out[c0].argmax(1) == 0).float().mean().item())
    for fig in ("confusion.png", "reliability.png", "tradeoff.png"):
        assert (v_dir / fig).read_bytes()[:8] == PNG and (v_dir / fig).stat().st_size > 10_000


def test_bad_requests_fail_with_one_message(kd):
    r = kd("export", "formats=[tflite]")
    assert r.returncode == 1 and "formats=['tflite']: choose from torchscript, onnx, torch_export" in r.stdout
    r = kd("quantize", "modes=[int4]")
    assert r.returncode == 1 and "modes=['int4']: choose from dynamic, static" in r.stdout
    r = kd("export", "run=/nowhere")
    assert r.returncode == 1 and "run=/nowhere: no such directory" in r.stdout
    r = kd("export", "checkpoint=a.pt", "run=b")
    assert r.returncode == 1 and "not both" in r.stdout
    r = kd("evaluate", "latency.repeats=-1")
    assert r.returncode == 1 and "latency.repeats must be a number >= 0" in r.stdout
    r = kd("evaluate", "checkpoints=[missing.onnx]")
    assert r.returncode == 1 and "Model file not found" in r.stdout and "missing.onnx" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
