"""kd train-teacher: train the teacher, keep its best-on-validation and last checkpoints."""

from __future__ import annotations

from kdcli.core.run import Context
from kdcli.report import console, pct, table
from kdcli.teachers.recipe import results, train
from kdcli.training.build import device_data


def run(cfg, ctx: Context) -> dict:
    data = device_data(cfg, ctx)
    teacher = train(cfg, data, ctx.run_dir, ctx)
    console.print(
        table(
            "Teacher",
            ["model", "test acc % (best val)", "test acc % (last)", "val acc %", "params"],
            [
                [
                    teacher["arch"]["name"],
                    pct(teacher["test_acc"]),
                    pct(teacher["test_acc_last"]),
                    pct(teacher["val_acc"]),
                    f"{teacher['params']:,}",
                ]
            ],
        )
    )
    return results(cfg, teacher)
