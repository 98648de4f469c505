"""The sweep summary, on job directories written by hand."""

import csv
import json

import yaml

from kdcli.report import summarise_sweep


def job(sweep, num, overrides, metrics):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))


def test_summary_over_seeds_with_failed_jobs_and_missing_figures(tmp_path):
    done = {"status": "completed", "teacher": {"test_acc": 0.98}}
    job(
        tmp_path,
        0,
        ["seed=0", "baseline=true"],
        {**done, "student": {"test_acc": 0.90}, "scratch": {"test_acc": 0.88}, "kd_gain": 0.02},
    )
    job(
        tmp_path,
        1,
        ["seed=1", "baseline=true"],
        {**done, "student": {"test_acc": 0.94}, "scratch": {"test_acc": 0.88}, "kd_gain": 0.06},
    )
    job(tmp_path, 2, ["seed=0", "baseline=false"], {**done, "student": {"test_acc": 0.91}})
    job(tmp_path, 3, ["seed=1", "baseline=false"], {"status": "failed", "error": "T must be > 0"})
    job(tmp_path, 4, ["seed=2", "baseline=false"], None)  # killed before it wrote anything
    rows = summarise_sweep(tmp_path)
    assert [r["status"] for r in rows] == ["completed", "completed", "completed", "failed", "missing"]
    table = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert table[3]["error"] == "T must be > 0" and table[0]["seed"] == "0" and table[0]["baseline"] == "true"
    seeds = {r["baseline"]: r for r in csv.DictReader(open(tmp_path / "summary_seeds.csv"))}
    # mean and sample std of 90 and 94: 92 and sqrt(8) = 2.83; of the gains 2 and 6: 4 and 2.83
    assert seeds["true"]["student.test_acc"] == "92.00 ± 2.83" and seeds["true"]["kd_gain"] == "4.00 ± 2.83"
    assert seeds["false"]["seeds"] == "1" and seeds["false"]["kd_gain"] == "-"
    assert not (tmp_path / "summary.png").exists()  # two keys swept: no single x axis


def test_table_cells_are_text_not_markup():
    from kdcli.report import console, table

    with console.capture() as captured:
        console.print(table("fixed: features=[at]", ["overrides"], [["method.assistants=[convnet]"]]))
    assert "method.assistants=[convnet]" in captured.get() and "features=[at]" in captured.get()
