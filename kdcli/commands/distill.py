"""kd distill: the method the config names (kdcli/methods/: standard, teacher-assistant chains,
born-again generations, mutual and joint learning) and the results table."""

from __future__ import annotations

import logging

from kdcli import methods
from kdcli.core.run import Context
from kdcli.report import console, pct, table
from kdcli.training.build import dataset_config, device_data

log = logging.getLogger("kdcli")


def run(cfg, ctx: Context) -> dict:
    data = device_data(cfg, ctx)
    results = methods.run(cfg, data, ctx)
    _print_results(results)
    results.update(settings(cfg))
    return results


def settings(cfg) -> dict:
    """The settings a distill run records in metrics.json beside its results (kd distill and kdcli.api)."""
    return {
        "T": cfg.T,
        "alpha": cfg.alpha,
        "loss": cfg.loss.name,
        "method": cfg.method.name,
        "dataset": dataset_config(cfg),
    }


def _print_results(results: dict) -> None:
    rows = []
    for r in results.values():
        if not isinstance(r, dict) or "label" not in r:
            continue
        rows.append(
            [
                r["label"],
                r.get("model", r.get("arch", {}).get("name", "")),
                pct(r["test_acc"]),
                pct(r.get("test_acc_last")),
                pct(r.get("teacher_agreement")),
                f"{r['params']:,}" if "params" in r else "-",
                f"{r['flops'] / 1e6:.2f}" if "flops" in r else "-",
            ]
        )
    console.print(
        table(
            "Test accuracy (the checkpoint trainer.selection keeps)",
            ["", "model", "test acc %", "last epoch %", "agrees w. teacher %", "params", "MFLOPs/img"],
            rows,
        )
    )
    cache = results.get("teacher_cache")
    if cache and cache["used"]:
        how = "computed once" if cache["computed"] else "reused"
        console.print(f"Teacher outputs: {how}, looked up at each step ({cache['path']})", soft_wrap=True)
    if "kd_gain" in results:
        console.print(gain_line(results["kd_gain_test"]), soft_wrap=True)
    for r in results.values():
        if isinstance(r, dict) and "sparsity" in r:  # params and FLOPs above count the zeros too
            console.print(
                f"{r['label']}: {r['sparsity']:.2%} of its prunable weights are zero "
                f"(prune.kind={r['pruning']['kind']}, classifier kept dense)"
            )


def gain_line(g: dict) -> str:
    """The KD gain with its uncertainty, as the results table's last line."""
    lo, hi = (100 * v for v in g["ci"])
    if g["p_value"] >= 0.05:
        verdict = "within chance"
    else:
        verdict = "a significant gain (p < 0.05)" if g["gain"] > 0 else "a significant loss (p < 0.05)"
    return (
        f"KD gain over the scratch student: [bold]{100 * g['gain']:+.2f}[/bold] points of test accuracy "
        f"({100 * g['level']:.0f} % interval {lo:+.2f} to {hi:+.2f}; McNemar exact p = {g['p_value']:.2g}: "
        f"{g['only_new']} test images only the distilled student gets right, {g['only_base']} only the scratch "
        f"one, of {g['n']}): {verdict}"
    )
