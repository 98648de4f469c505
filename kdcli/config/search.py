"""What an optimising sweeper (Optuna, Nevergrad, Ax) gets from a job: the value of the config's
`objective`, a figure of the run's metrics.json measured on the validation split.

The test split is never an objective: a search that picks the setting with the best test
accuracy reports that accuracy overfitted to the test images it chose it on.
"""

from __future__ import annotations

import math

from kdcli.core.errors import KdError

# The figures a search may optimise (the leaf of `objective`), with their direction.
DIRECTIONS = {"val_acc": "maximize"}

# The commands whose runs have an objective (configs/train_teacher.yaml, configs/distill.yaml).
COMMANDS = ("train_teacher", "distill")


def direction(objective: str) -> str:
    return DIRECTIONS[objective.rsplit(".", 1)[-1]]


def check(objective: str) -> None:
    """An objective names one model's validation figure: ROLE.val_acc."""
    role, _, leaf = str(objective).rpartition(".")
    if role and leaf in DIRECTIONS:
        return
    why = "the test split is never searched on (it would then overfit the test images). " if "test" in objective else ""
    raise KdError(
        f"objective={objective}: {why}Give a model's validation accuracy: objective=student.val_acc (kd distill's "
        "default; also scratch or any other model the run trains), objective=teacher.val_acc for kd train-teacher."
    )


def value(metrics: dict, objective: str) -> float | None:
    """The objective's value in a run's metrics (None if the run recorded no such figure)."""
    node = metrics
    for part in objective.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or math.isnan(node):
        return None
    return float(node)


def recorded(metrics: dict) -> list[str]:
    """The figures of a run's metrics that can be objectives (role.val_acc, ...)."""
    return [
        f"{role}.{leaf}"
        for role, node in metrics.items()
        if isinstance(node, dict)
        for leaf in DIRECTIONS
        if isinstance(node.get(leaf), (int, float))
    ]


class NoValue:
    """What a job without an objective value returns to a sweeper. float() of it raises, so Optuna
    counts the trial as failed, says why (its message shows this object) and goes on; NaN it
    cannot take (it fails the whole search)."""

    def __init__(self, why: str):
        self.why = why

    def __float__(self) -> float:
        raise TypeError(self.why)

    def __str__(self) -> str:
        return self.why

    __repr__ = __str__


def for_sweeper(metrics: dict, objective: str) -> float | NoValue:
    """What the Hydra task returns: the objective's value, or NoValue for a run that did not
    complete or did not record it (the basic sweeper ignores what jobs return)."""
    if metrics.get("status") != "completed":
        error = str(metrics.get("error") or "").splitlines()[:1]
        return NoValue(f"no {objective}: the run {metrics.get('status')}" + (f" ({error[0]})" if error else ""))
    found = value(metrics, objective)
    return NoValue(f"no {objective}: the run recorded none") if found is None else found


# Sweepers that optimise the value a job returns (hydra/sweeper=NAME, from their Hydra plugins)
OPTIMISING = ("optuna", "nevergrad", "ax")
# Where a sweeper takes its direction, and its value for each (Ax's is left to the user: README)
DIRECTION_KEYS = {
    "optuna": ("hydra.sweeper.direction", {"maximize": "maximize", "minimize": "minimize"}),
    "nevergrad": ("hydra.sweeper.optim.maximize", {"maximize": "true", "minimize": "false"}),
}


def override_value(overrides: list[str], key: str) -> str | None:
    """The value of the last `key=value` among the overrides (`+key=`, `override key=` too)."""
    found = None
    for o in overrides:
        k, _, v = o.partition("=")
        if k.removeprefix("override ").strip().lstrip("+") == key:
            found = v.strip()
    return found


def sweeper_overrides(command: str, overrides: list[str], objective: str) -> list[str]:
    """The overrides an optimising sweeper needs from kd, after checking the command line.

    The search's direction is the objective's: with hydra/sweeper=optuna hydra.sweeper.direction
    (nevergrad: hydra.sweeper.optim.maximize) is added when it is not given (both minimise by
    default, which would search for the worst accuracy) and refused when it is the other one."""
    sweeper = override_value(overrides, "hydra/sweeper")
    if sweeper not in OPTIMISING:
        return []
    if command not in COMMANDS:
        name = command.replace("_", "-")
        raise KdError(
            f"hydra/sweeper={sweeper}: an optimising sweeper needs each job's objective, and kd {name} has none. "
            f"Search kd distill or kd train-teacher (objective=...), or sweep kd {name} with -m key=a,b."
        )
    check(objective)
    if sweeper not in DIRECTION_KEYS:
        return []
    key, values = DIRECTION_KEYS[sweeper]
    want = values[direction(objective)]
    given = override_value(overrides, key)
    if given is None:
        return [f"{key}={want}"]
    if given.lower() != want:
        several = " Each job returns one objective: a list of directions is not taken." if "[" in given else ""
        raise KdError(
            f"{key}={given}: objective={objective} is to {direction(objective)}, so that would search for the "
            f"worst setting. Give {key}={want}, or leave it out (kd sets it from the objective).{several}"
        )
    return []
