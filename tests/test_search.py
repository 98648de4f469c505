"""Optimising sweeps: each job returns its objective (a validation figure) to the sweeper, the
sweep summary names the best job, and the Optuna sweeper runs a real search end to end."""

import json
import re

import pytest
import yaml

from kdcli.config import search
from kdcli.core.errors import KdError
from kdcli.report import console, summarise_sweep


def job(sweep, num, overrides, metrics):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / "metrics.json").write_text(json.dumps(metrics))


def test_a_job_returns_its_validation_figure_or_no_value():
    done = {"status": "completed", "student": {"val_acc": 0.875, "test_acc": 0.9}}
    assert search.for_sweeper(done, "student.val_acc") == 0.875
    failed = search.for_sweeper({"status": "failed", "error": "T must be > 0 (got -1.0)"}, "student.val_acc")
    with pytest.raises(TypeError):  # Optuna then counts the trial as failed and goes on
        float(failed)
    assert "the run failed (T must be > 0 (got -1.0))" in str(failed)
    with pytest.raises(TypeError):
        float(search.for_sweeper(done, "scratch.val_acc"))  # recorded no such figure


@pytest.mark.parametrize("objective", ["student.test_acc", "kd_gain", "student", "student.val_ac"])
def test_only_validation_figures_are_objectives(objective):
    with pytest.raises(KdError, match=f"objective={re.escape(objective)}: .*Give a model's validation accuracy"):
        search.check(objective)
    search.check("scratch.val_acc")  # any model's validation accuracy


def test_a_test_objective_says_why_it_is_refused():
    with pytest.raises(KdError, match="the test split is never searched on"):
        search.check("student.test_acc")


def test_an_optimising_sweeper_gets_the_objectives_direction():
    given = ["hydra/sweeper=optuna", "T=interval(1,8)"]
    assert search.sweeper_overrides("distill", given, "student.val_acc") == ["hydra.sweeper.direction=maximize"]
    assert search.sweeper_overrides("distill", [*given, "hydra.sweeper.direction=maximize"], "student.val_acc") == []
    assert search.sweeper_overrides("distill", ["T=1,2"], "student.val_acc") == []  # the basic sweeper
    with pytest.raises(KdError, match="direction=minimize: objective=student.val_acc is to maximize, so that"):
        search.sweeper_overrides("distill", [*given, "hydra.sweeper.direction=minimize"], "student.val_acc")
    nevergrad = ["hydra/sweeper=nevergrad"]  # its own key (hydra.sweeper.optim, plugin not installed here)
    assert search.sweeper_overrides("distill", nevergrad, "student.val_acc") == ["hydra.sweeper.optim.maximize=true"]
    with pytest.raises(KdError, match="hydra.sweeper.optim.maximize=false: objective=student.val_acc is to maximize"):
        search.sweeper_overrides("distill", [*nevergrad, "hydra.sweeper.optim.maximize=false"], "student.val_acc")
    with pytest.raises(KdError, match="kd evaluate has none"):
        search.sweeper_overrides("evaluate", given, "student.val_acc")


def test_the_summary_names_the_best_job_by_the_objective(tmp_path):
    def done(val, test):
        objective = {"key": "student.val_acc", "value": val, "direction": "maximize"}
        return {"status": "completed", "student": {"val_acc": val, "test_acc": test}, "objective": objective}

    job(tmp_path, 0, ["T=1", "alpha=0.1"], done(0.90, 0.99))  # the best test accuracy: not what is searched
    job(tmp_path, 1, ["T=4", "alpha=0.1"], done(0.95, 0.93))
    job(tmp_path, 2, ["T=8", "alpha=0.1"], done(0.95, 0.91))  # as good, later: the first of equals is kept
    job(tmp_path, 3, ["T=16", "alpha=0.1"], {"status": "failed", "error": "diverged"})
    with console.capture() as captured:
        rows = summarise_sweep(tmp_path)
    out = " ".join(captured.get().split())
    assert "Best student.val_acc (maximized on the validation split): 95.00 % in job 1: T=4" in out
    assert "(test: student.test_acc 93.00 %)" in out
    assert [r.get("student.val_acc") for r in rows] == [0.90, 0.95, 0.95, None]
    header = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert header.startswith("job,T,status,student.val_acc,student.test_acc")


def test_no_best_of_seeds_and_none_without_a_completed_job(tmp_path):
    objective = {"key": "student.val_acc", "value": 0.9, "direction": "maximize"}
    for seed in (0, 1):
        job(tmp_path / "seeds", seed, [f"seed={seed}"], {"status": "completed", "objective": objective})
    with console.capture() as captured:
        summarise_sweep(tmp_path / "seeds")
    assert "Best" not in captured.get()  # the best of seeds is noise: summary_seeds.csv has their mean
    job(tmp_path / "failed", 0, ["T=1"], {"status": "failed", "objective": {**objective, "value": None}})
    job(tmp_path / "failed", 1, ["T=2"], {"status": "failed"})
    with console.capture() as captured:
        summarise_sweep(tmp_path / "failed")
    assert "No completed job recorded its objective student.val_acc." in captured.get()


def test_a_search_refuses_a_test_objective_and_the_wrong_direction_before_any_job(kd):
    for args, message in (
        (["objective=student.test_acc"], "objective=student.test_acc: the test split is never searched on"),
        (["hydra.sweeper.direction=minimize"], "hydra.sweeper.direction=minimize: objective=student.val_acc is"),
    ):
        r = kd("distill", "-m", "hydra/sweeper=optuna", "T=interval(1,8)", "debug=smoke", *args)
        out = r.stdout + r.stderr
        assert r.returncode == 1 and "Traceback" not in out, out
        assert [line for line in out.splitlines() if line.startswith("error:")] == [
            next(line for line in out.splitlines() if message in line)
        ]
        assert not (kd.dir / "runs").exists()


def jobs_of(sweep) -> dict:
    """job number -> (its overrides, its metrics.json)."""
    found = {}
    for d in sweep.iterdir():
        if d.name.isdigit():
            overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
            metrics = json.loads((d / "metrics.json").read_text())
            found[int(d.name)] = (dict(o.split("=", 1) for o in overrides), metrics)
    return found


def printed_best(out: str) -> tuple[float, int, float]:
    """(value in %, job, T) from the summary's line."""
    m = re.search(r"Best student\.val_acc \(maximized on the validation split\): ([\d.]+) % in job (\d+): T=(\S+)", out)
    assert m, out
    return float(m.group(1)), int(m.group(2)), float(m.group(3))


@pytest.mark.slow
def test_an_optuna_search_of_T_finishes_and_prints_the_best_setting(kd):
    # The README's search, smoke-sized: 3 trials of TPE over T
    r = kd(
        "distill",
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.seed=0",
        "T=interval(1,8)",
        "debug=smoke",
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    (sweep,) = (kd.dir / "runs" / "distill-multirun").iterdir()
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    jobs = jobs_of(sweep)
    assert len(jobs) == 3 and all(m["status"] == "completed" for _, m in jobs.values())
    values = {n: m["student"]["val_acc"] for n, (_, m) in jobs.items()}
    assert all(m["objective"]["value"] == values[n] for n, (_, m) in jobs.items())
    # What Optuna was told is each job's validation accuracy (never the test split's): its best is their best
    best = max(values.values())
    assert results["best_value"] == best
    assert any(float(o["T"]) == results["best_params"]["T"] for n, (o, _) in jobs.items() if values[n] == best)
    assert "Directions: ['maximize']" in out
    value, number, T = printed_best(out)
    assert values[number] == best and value == round(100 * best, 2) and float(jobs[number][0]["T"]) == T
    assert (sweep / "summary.csv").is_file()


@pytest.mark.slow
def test_a_failed_trial_is_a_failed_trial_and_the_search_goes_on(kd):
    # Random draws from three values, one that fails its check: with this seed the trials are T=4, -1, 2
    r = kd(
        "distill",
        "-m",
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=2",
        "hydra.sweeper.n_trials=3",
        "T=choice(-1,2,4)",
        "debug=smoke",
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1, out  # a job failed: the sweep says so
    assert "Traceback" not in out
    (sweep,) = (kd.dir / "runs" / "distill-multirun").iterdir()
    jobs = jobs_of(sweep)
    status = {float(o["T"]): m["status"] for o, m in jobs.values()}
    assert status == {-1.0: "failed", 2.0: "completed", 4.0: "completed"}
    # Optuna's warning says why the trial has no value
    assert "Return value must be float-castable. Got 'no student.val_acc: the run failed (T must be > 0" in out
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    completed = {float(o["T"]): m["student"]["val_acc"] for o, m in jobs.values() if m["status"] == "completed"}
    assert results["best_value"] == max(completed.values())
    assert completed[results["best_params"]["T"]] == results["best_value"]
    value, number, T = printed_best(out)
    assert completed[T] == results["best_value"] and value == round(100 * results["best_value"], 2)
    assert re.search(r"job \d+ failed: T must be > 0", out)


@pytest.mark.slow
def test_a_search_whose_every_trial_fails_ends_with_the_jobs_errors(kd):
    r = kd("distill", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "T=interval(-2,-1)", "debug=smoke")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "No trials are completed yet" in out  # Optuna's own error, which Hydra prints with its traceback
    assert len(re.findall(r"job \d failed: T must be > 0", out)) == 2
    (sweep,) = (kd.dir / "runs" / "distill-multirun").iterdir()
    assert r.stdout.splitlines()[-1] == (
        f"error: the sweeper stopped the sweep with the error above, after 2 job(s), 0 completed. Each job's error "
        f"is in the table: fix it and run the sweep again. Sweep directory: {sweep}"
    )
    assert (sweep / "summary.csv").is_file() and not (sweep / "optimization_results.yaml").exists()
