"""kd evaluate: models side by side on one split of their dataset: accuracy, calibration,
agreement with the teacher, per-class accuracy, and what each costs (parameters, sparsity,
size, FLOPs, latency, throughput). Any file kdcli writes can be compared: checkpoints and the
exports of `kd export` / `kd quantize` (TorchScript, ONNX, torch.export, safetensors)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kdcli.core.errors import KdError
from kdcli.core.files import write_json
from kdcli.core.metrics import classification
from kdcli.core.run import Context
from kdcli.deploy import formats, latency
from kdcli.models import count_flops, count_params
from kdcli.report import console, pct, plots, table
from kdcli.training.build import checkpoint_data, data_identity, latest_run
from kdcli.training.resume import read_metrics

log = logging.getLogger("kdcli")

ROLE_ORDER = ("teacher", "scratch", "student")


def _checkpoints_of_run(run_dir: Path) -> list[Path]:
    """The teacher (as used by the run) and the best checkpoints of a run directory."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise KdError(f"run={run_dir}: no such directory.")
    paths = []
    teacher = (read_metrics(run_dir).get("teacher") or {}).get("checkpoint")
    if teacher and Path(teacher).is_file():
        paths.append(Path(teacher).resolve())
    elif teacher:
        log.warning(f"warning  the teacher of {run_dir}, {teacher}, is gone; evaluating without it")
    for role in ROLE_ORDER:
        p = (run_dir / "checkpoints" / f"{role}_best.pt").resolve()
        if p.is_file() and p not in paths:
            paths.append(p)
    if not paths:
        raise KdError(f"run={run_dir} holds no checkpoints (looked for checkpoints/*_best.pt).")
    return paths


def _select(cfg) -> list[Path]:
    if cfg.checkpoints:
        return [Path(p).expanduser().resolve() for p in cfg.checkpoints]
    if cfg.run:
        return _checkpoints_of_run(Path(cfg.run))
    run = latest_run(cfg.runs_dir, "distill")
    if run is None:
        raise KdError(
            f"Nothing to evaluate: no checkpoints=[...], no run=DIR, and no completed distill run under "
            f"{Path(cfg.runs_dir).expanduser()}. Run `kd distill` first or name the checkpoints."
        )
    return _checkpoints_of_run(run)


def _refuse_programs(paths: list[Path], cfg) -> None:
    """A program among the files (TorchScript, torch.export: loading one runs its code) is refused
    before any model is loaded, unless trust_programs=true."""
    if cfg.trust_programs:
        return
    reference = [Path(cfg.reference).expanduser().resolve()] if cfg.reference else []
    for path in paths + reference:
        if path.is_file() and (fmt := formats.detect(path)) in formats.PROGRAMS:
            raise formats.untrusted(path, fmt)


def _same_data(cards: list[tuple[Path, dict]]) -> dict:
    """The data of the first model, after checking that all were trained on the same split of
    the same dataset (otherwise their test sets, and so their accuracies, differ)."""
    first_path, first = cards[0]

    def key(d: dict) -> dict:
        return {
            "input_shape": list(d["input_shape"]),
            "class_names": list(d["class_names"]),
            **data_identity(d["dataset"]),
        }

    for path, card in cards[1:]:
        theirs, ours = key(card["data"]), key(first["data"])
        if theirs != ours:
            diff = ", ".join(
                f"{k}: {ours.get(k)} vs {theirs.get(k)}" for k in {**ours, **theirs} if ours.get(k) != theirs.get(k)
            )
            raise KdError(
                f"{path} and {first_path} were trained on different data ({diff}); evaluate compares models on "
                "one split of one dataset at a time."
            )
    return first["data"]


def _sparsity(model: formats.ModelFile, arch: torch.nn.Module | None) -> float | None:
    """Zero weights of the prunable layers, read from the file's own weights (None for files
    that do not hold them by name, such as int8 ONNX files)."""
    from kdcli.training.prune import prunable, sparsity

    if model.module is not None:
        return sparsity(model.module)
    if arch is None or model.weights is None:
        return None
    state, own = model.weights(), arch.state_dict()
    needed = {f"{name}.weight" for name, _ in prunable(arch)}
    if not needed or not all(k in state and state[k].shape == own[k].shape for k in needed):
        return None
    arch.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)
    return sparsity(arch)


def costs_of(model: formats.ModelFile, x_large: torch.Tensor, cfg, counts: bool = True) -> dict:
    """Parameters, sparsity, size on disk, forward FLOPs per image (counts=False: neither
    parameters nor FLOPs), latency and throughput."""
    arch = model.module if model.module is not None else formats.rebuild(model.card, model.path)
    out = {"params": count_params(arch) if arch is not None else None} if counts else {}
    out.update(sparsity=_sparsity(model, arch), size_mb=model.path.stat().st_size / 2**20)
    if counts:
        out["flops"] = count_flops(arch, model.card["data"]["input_shape"]) if arch is not None else None
    out.update(device=str(model.device), threads=model.threads if model.device.type == "cpu" else None)
    if cfg.latency.repeats:
        x = x_large.to(model.device)
        out.update(latency.costs(model.run, x[:1], x, model.device, cfg.latency.warmup, cfg.latency.repeats))
    return out


def run(cfg, ctx: Context) -> dict:
    with latency.threads(cfg.latency.threads):
        return _run(cfg, ctx)


def _run(cfg, ctx: Context) -> dict:
    paths = _select(cfg)
    if cfg.labels and len(cfg.labels) != len(paths):
        raise KdError(f"labels has {len(cfg.labels)} entries for {len(paths)} models: give one label per model.")
    _refuse_programs(paths, cfg)
    models = [formats.open_model(p, ctx.device, cfg.trust_programs) for p in paths]
    data_info = _same_data([(m.path, m.card) for m in models])
    split = checkpoint_data(data_info, cfg.data_root, ctx.device).split(cfg.split)
    if cfg.limit:
        split = split.subset(cfg.limit)
    y = split.y.cpu()

    logits = [m.logits(split, cfg.eval_batch_size) for m in models]
    ref_path, ref = _reference(cfg, models, logits, split, data_info)
    x_large = split.head(cfg.latency.batch_size).cpu()

    names = list(cfg.labels) or _unique([m.label for m in models])
    results = []
    for name, m, out in zip(names, models, logits):
        log.info(f"measure  {name}: {m.path.name}")
        results.append(
            {
                "name": name,
                "path": str(m.path),
                "format": m.fmt,
                "role": m.card["role"],
                "model": m.card["arch"]["name"],
                **({"pruning": m.card["pruning"]} if "pruning" in m.card else {}),
                **({"quantization": m.card["quantization"]} if "quantization" in m.card else {}),
                **classification(out, y, ref),
                **costs_of(m, x_large, cfg),
            }
        )
    _print(results, data_info, cfg, len(y), ref_path)
    summary = {
        "split": cfg.split,
        "images": len(y),
        "reference": str(ref_path) if ref_path else None,
        "threads": torch.get_num_threads(),
        "latency": {
            "warmup": cfg.latency.warmup,
            "repeats": cfg.latency.repeats,
            "statistic": "median; latency_iqr_ms_*: the interquartile range",
            "noisy_above": latency.NOISY,
        },
        "class_names": list(data_info["class_names"]),
        "models": results,
    }
    if cfg.figures:
        summary["figures"] = _figures(results, list(data_info["class_names"]), ctx.run_dir)
    write_json(ctx.run_dir / "evaluation.json", summary)
    return {k: v for k, v in summary.items() if k != "models"} | {"models": [_brief(r) for r in results]}


def _reference(cfg, models, logits, split, data_info) -> tuple[Path | None, torch.Tensor | None]:
    """The logits agreement and KL are measured against: reference=PATH, else the teacher."""
    if cfg.reference:
        path = Path(cfg.reference).expanduser().resolve()
        for m, out in zip(models, logits):
            if m.path == path:
                return path, out
        ref = formats.open_model(path, models[0].device, cfg.trust_programs)
        _same_data([(models[0].path, models[0].card), (path, ref.card)])
        return path, ref.logits(split, cfg.eval_batch_size)
    for m, out in zip(models, logits):
        if m.card["role"] == "teacher":
            return m.path, out
    return None, None


def _unique(names: list[str]) -> list[str]:
    """Labels as they are, numbered where two models would share one."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n} #{seen[n]}")
    return out


def _brief(row: dict) -> dict:
    """A model's row without the per-bin and per-cell lists (metrics.json stays small)."""
    return {k: v for k, v in row.items() if k not in ("confusion", "reliability", "per_class_acc")}


def _num(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def _print(results: list[dict], data_info: dict, cfg, images: int, ref_path: Path | None) -> None:
    title = f"{data_info['name']} {cfg.split} split, {images} images"
    if ref_path:
        title += f"; agreement and KL against {_short(str(ref_path))}"
    console.print(
        table(
            title,
            ["model", "arch", "acc %", "top-5 %", "NLL", "ECE", "agrees %", "KL to ref", "file"],
            (
                [
                    r["name"],
                    r["model"],
                    pct(r["acc"]),
                    pct(r["top5"]),
                    _num(r["nll"], ".4f"),
                    _num(r["ece"], ".4f"),
                    pct(r.get("agreement")),
                    _num(r.get("kl_to_reference"), ".4f"),
                    Path(r["path"]).name,
                ]
                for r in results
            ),
        )
    )
    timed = bool(cfg.latency.repeats)
    batch = results[0].get("latency_batch", cfg.latency.batch_size)
    columns = ["model", "params", "sparsity %", "size MB", "MFLOPs/img", "device"]
    if timed:
        columns += ["ms at bs 1", f"ms at bs {batch}", "img/s", "spread"]
    rows = []
    for r in results:
        row = [
            r["name"],
            _num(r["params"], ","),
            pct(r["sparsity"]),
            _num(r["size_mb"], ".3f"),
            _num(r["flops"] and r["flops"] / 1e6, ".2f"),
            r["device"],
        ]
        if timed:
            row += [
                _num(r["latency_ms_bs1"], ".3f"),
                _num(r["latency_ms_batch"], ".2f"),
                _num(r["throughput_per_s"], ",.0f"),
                _num(latency.spread(r), ".0%"),
            ]
        rows.append(row)
    console.print(table("Cost", columns, rows))
    if timed:
        console.print(
            f"Latency: median of {cfg.latency.repeats} timed runs after {cfg.latency.warmup} warm-up runs; "
            "spread: their interquartile range as a share of the median (the larger of the two batch sizes); "
            f"{torch.get_num_threads()} CPU thread(s) for PyTorch and ONNX Runtime (latency.threads); img/s at batch "
            f"{batch}. Size: the file on disk. FLOPs: forward pass, multiply-add = 2."
        )
        noisy = latency.noisy_warning({r["name"]: r for r in results})
        if noisy:
            log.warning(f"warning  {noisy}")
    classes = list(data_info["class_names"])
    if len(classes) <= 20:
        console.print(
            table(
                "Per-class accuracy %",
                ["class", *(r["name"] for r in results)],
                ([c, *(pct(r["per_class_acc"][i]) for r in results)] for i, c in enumerate(classes)),
            )
        )


def _figures(results: list[dict], classes: list[str], out_dir: Path) -> list[str]:
    names = [r["name"] for r in results]
    written = [out_dir / "confusion.png", out_dir / "reliability.png", out_dir / "tradeoff.png"]
    plots.confusion_matrices(written[0], names, [r["confusion"] for r in results], classes)
    plots.reliability_diagram(written[1], names, [r["reliability"] for r in results], [r["ece"] for r in results])
    costs = {"size on disk (MB)": [r["size_mb"] for r in results]}
    if "latency_ms_bs1" in results[0]:  # timings that are noise are left out
        timed = [None if r["latency_noisy"] else r["latency_ms_bs1"] for r in results]
        costs = {"latency at batch 1 (ms)": timed, **costs}
    plots.tradeoff(written[2], names, [r["acc"] for r in results], costs)
    return [str(p) for p in written]


def _short(path: str, keep: int = 3) -> str:
    parts = Path(path).parts
    return str(Path(*parts[-keep:])) if len(parts) > keep else path
