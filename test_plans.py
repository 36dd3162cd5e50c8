"""Plans as data (plans/*.plan, config.read_plan): the syntax and its errors, the runs a plan makes (seeds, warm
starts, tuning), the generated documentation, tuning on validation through run_train_ex.sh, and summarize.py's
paired p-values and Holm adjustment. (The GPU-sized study's plan on a real SLURM: test_slurm.py.)"""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from scipy import stats

import config
import summarize
import utils

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "run_train_ex.sh"


def plan_file(tmp_path, text, name="p.plan"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------
# the syntax
# --------------------------------------------------------------------------------------------------

GOOD = """
# a comment
about   | a small plan
default | SEEDS | 3 4 5
common  | --d_model 8
tune    | --lr | 1e-3 1e-2 | seed=7
setting | s5      | --ssm_type s5
setting | big     | --ssm_type s5 --ssm_size_base {size} | seeds=2
setting | lru     | --ssm_type lru | tune=no
group   | copy    | --dataset copying | size=20; about=copying
group   | recall  | --dataset associative_recall | size=30
group   | own     | --dataset adding
setting | s4d     | --ssm_type s4d
setting | warm    | --ssm_type extend --freeze base | after=s4d; tune=no
"""


def test_a_plan_reads_into_groups_shared_settings_variables_and_tuning(tmp_path):
    plan = config.read_plan(plan_file(tmp_path, GOOD))
    assert plan.about == "a small plan" and plan.defaults == {"SEEDS": "3 4 5"} and plan.common == ["--d_model", "8"]
    assert plan.tune == config.Tune("--lr", ["1e-3", "1e-2"], 7)
    assert [g.name for g in plan.groups] == ["copy", "recall", "own"]
    copy, recall, own = plan.groups
    assert [s.name for s in copy.settings] == ["s5", "big", "lru"] == [s.name for s in recall.settings]
    assert copy.settings[1].flags[-1] == "20" and recall.settings[1].flags[-1] == "30"  # {size} per group
    assert [s.name for s in own.settings] == ["s4d", "warm"] and own.settings[1].after == "s4d"

    runs = config.plan_runs(plan, [3, 4, 5])
    ids = [r["id"] for r in runs]
    # tuning first (two values at seed 7), then the setting's seeds, which wait for them
    assert ids[:5] == ["copy/s5/lr=1e-3/seed7", "copy/s5/lr=1e-2/seed7", "copy/s5/seed3", "copy/s5/seed4",
                       "copy/s5/seed5"]
    s5 = runs[2]
    assert s5["role"] == "tuned" and s5["deps"] == ids[:2] and s5["tune"] == {"flag": "--lr", "runs": ids[:2]}
    assert runs[0]["flags"][-2:] == ["--lr", "1e-3"] and runs[0]["role"] == "tune"
    assert [r["seed"] for r in runs if r["setting"] == "big" and r["group"] == "copy"] == [3, 4]  # seeds=2
    lru = [r for r in runs if r["setting"].startswith("lru") and r["group"] == "copy"]
    assert [r["role"] for r in lru] == ["run"] * 3  # tune=no
    warm = next(r for r in runs if r["id"] == "own/warm/seed4")
    assert warm["after"] == "own/s4d/seed4" and warm["deps"] == ["own/s4d/seed4"]
    # groups and globs select
    assert {r["group"] for r in config.plan_runs(plan, [3], groups=[2])} == {"recall"}
    assert [r["id"] for r in config.plan_runs(plan, [3, 4], only=["own/*/seed4"])] == ["own/s4d/seed4",
                                                                                      "own/warm/seed4"]


@pytest.mark.parametrize("text, message", [
    ("group | g | --x\n", "group 'g' has no settings and the plan has no shared ones"),
    ("setting | s | --ssm_type s5\n", "no group"),
    ("group | g |\nsetting | s | --a | colour=red\n", "unknown setting option(s) ['colour']"),
    ("group | g |\nsetting | s | --a | seeds=0\n", "seeds must be a positive integer"),
    ("group | g |\nsetting | s | --a | after=t\n", "starts after 't', which the group does not have"),
    ("tune | --lr | 1e-3 1e-2 | seed=1\ngroup | g |\nsetting | b | --a\nsetting | s | --a | after=b\n",
     "both tuned and a warm start"),
    ("group | g |\nsetting | s | --a {missing}\n", "{missing} is not a variable of the group"),
    ("group | g |\nsetting | s s | --a\n", "is not a usable name"),
    ("group | g |\nsetting | s | --a\nsetting | s | --b\n", "setting 's' appears twice"),
    ("frobnicate | x\n", "unknown line kind 'frobnicate'"),
    ("default | PARALLEL | 2\ngroup | g |\nsetting | s | --a\n", "may default only"),
    ("tune | lr | 1 2 | seed=1\ngroup | g |\nsetting | s | --a\n", "a tune line is"),
    ("group | g | --data_options 'unclosed\nsetting | s | --a\n", "No closing quotation"),
])
def test_a_bad_plan_names_its_file_line_and_what_to_change(tmp_path, text, message):
    path = plan_file(tmp_path, text)
    with pytest.raises(config.PlanError, match=None) as e:
        config.read_plan(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_a_setting_train_ex_refuses_fails_the_check_naming_it(tmp_path):
    plan = config.read_plan(plan_file(tmp_path, "group | g | --dataset copying\nsetting | ok | --ssm_type s5\n"
                                                "setting | bad | --ssm_type s5 --R 4\n"))
    with pytest.raises(config.PlanError) as e:
        config.check_plan(plan, [], [])
    assert "setting 'bad'" in str(e.value) and "--ssm_type s5 does not take --R" in str(e.value)


def test_every_plan_in_plans_reads_and_every_setting_is_accepted():
    for name in config.plan_names():
        plan = config.read_plan(name)
        head = [] if plan.sets_dataset() else ["--dataset", plan.defaults.get("DATASET", "listops-classification")]
        config.check_plan(plan, head, [])
        if plan.smoke or any(g.smoke for g in plan.groups):
            config.check_plan(plan, head, [], smoke=True)


# --------------------------------------------------------------------------------------------------
# written once: the documentation and the shell are generated from, or free of, the plans
# --------------------------------------------------------------------------------------------------


def test_the_documentation_tables_and_recipe_commands_are_generated_from_the_plans():
    for name in config.DOCS:
        text = (HERE / name).read_text()
        assert config.fill_plan_blocks(text) == text, f"{name} is out of date: run python config.py docs"
    series = (HERE / "SERIES.md").read_text()
    for name in ("series", "study-cpu", "study-gpu"):
        assert f"<!-- plan:{name} -->" in series


def test_no_group_setting_or_recipe_is_written_in_the_shell_or_the_readme():
    shell = SCRIPT.read_text()
    readme = (HERE / "README.md").read_text()
    for name in ("series", "study-cpu", "study-cpu1", "study-gpu"):
        plan = config.read_plan(name)
        for g in plan.groups:
            for text in (" ".join(g.flags) if len(g.flags) > 2 else "", g.about):
                assert not text or (text not in shell and text not in readme), (name, g.name, text)
            for s in g.settings:
                flags = " ".join(s.flags)
                if len(s.flags) > 3:  # a distinctive setting line: not copied into the scheduler or the README
                    assert flags not in shell and flags not in readme, (name, s.name)
    for argv, _ in config.s5_recipes_by_name().values():
        seed = argv[argv.index("--jax_seed") + 1]
        assert seed not in shell and seed not in readme


def test_help_prints_the_plans_groups_from_the_file():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(["bash", str(SCRIPT), "--help"], env={**env, "STUDY": "cpu"}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert config.plan_table(config.read_plan("study-cpu")) in r.stdout
    for name in config.plan_names():
        assert f"  {name} " in r.stdout


# --------------------------------------------------------------------------------------------------
# tuning on validation through the series (a fake train_ex.py whose validation accuracy depends on --lr)
# --------------------------------------------------------------------------------------------------

FAKE = r'''
import json, os, sys
from pathlib import Path
argv = sys.argv[1:]
run_dir = Path(argv[argv.index("--run_dir") + 1])
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(argv) + "\n")
lr = float([argv[i + 1] for i, a in enumerate(argv) if a == "--lr"][-1]) if "--lr" in argv else 0.0
seed = int(argv[argv.index("--jax_seed") + 1])
if lr > 0.05:  # a learning rate that diverges
    (run_dir / "results.json").write_text(json.dumps(dict(config={"epochs": 1}, epochs=[], status="failed")))
    sys.exit("non-finite loss")
val = {0.001: 0.3, 0.01: 0.6, 0.03: 0.5}.get(lr, 0.1)  # 1e-2 is the best on validation
test = 1.0 - val  # a test figure that would pick the opposite: it must not be looked at
row = dict(epoch=1, val_acc=val, test_acc=test, seconds=1.0, steps_per_s=2.0)
(run_dir / "results.json").write_text(json.dumps(dict(
    config={"epochs": 1, "jax_seed": seed, "lr": lr}, epochs=[row], best=dict(epoch=1, val_acc=val, test_acc=test),
    wall_time_s=2.0, steps_per_s=2.0, n_params=10, device="fake", status="finished")))
'''

TUNED_PLAN = """
about   | tuning test
tune    | --lr | 1e-3 1e-2 3e-2 1e-1 | seed=9
setting | s5  | --ssm_type s5
setting | lru | --ssm_type lru | tune=no
group   | copy | --dataset copying
"""


@pytest.mark.slow
def test_the_series_tunes_on_validation_and_records_the_choice(tmp_path):
    fake = plan_file(tmp_path, FAKE, "fake_train.py")
    calls = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("SEEDS", "EPOCHS", "DATASET", "GROUPS", "RUN_GROUPS")}
    env.update(JAX_PLATFORMS="cpu", WANDB_MODE="disabled", PLAN=str(plan_file(tmp_path, TUNED_PLAN)),
               OUT_ROOT=str(tmp_path / "out"), TRAIN=str(fake), FAKE_CALLS=str(calls), SEEDS="10 11",
               DATA=str(tmp_path), PARALLEL="2")
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    argvs = {Path(a[a.index("--run_dir") + 1]).relative_to(tmp_path / "out").as_posix(): a
             for a in map(json.loads, calls.read_text().splitlines())}
    assert set(argvs) == {"copy/s5/lr=1e-3/seed9", "copy/s5/lr=1e-2/seed9", "copy/s5/lr=3e-2/seed9",
                          "copy/s5/lr=1e-1/seed9", "copy/s5/seed10", "copy/s5/seed11", "copy/lru/seed10",
                          "copy/lru/seed11"}
    for seed in (10, 11):
        a = argvs[f"copy/s5/seed{seed}"]
        assert a[a.index("--lr") + 1] == "1e-2" and "@tuned" not in " ".join(a)  # best validation, not best test
        meta = json.loads((tmp_path / "out" / f"copy/s5/seed{seed}/series_run.json").read_text())
        assert meta["role"] == "tuned" and meta["tuned"]["value"] == "1e-2"
        assert "1e-1: failed" in meta["tuned"]["why"] and "1e-2: 0.6000" in meta["tuned"]["why"]
    assert "--lr" not in argvs["copy/lru/seed10"]
    rows = {r["setting"]: r for r in _csv(tmp_path / "out" / "summary.csv")}
    assert set(rows) == {"s5", "lru"}  # the tuning runs are no settings of their own
    assert rows["s5"]["tuned"] == "1e-2" and float(rows["s5"]["compute_s"]) == 2.0 * (2 + 3)  # the failed one: none
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| group | setting | lr=1e-3 | lr=1e-2 | lr=3e-2 | lr=1e-1 | chosen |" in md
    assert "| copy | s5 | 30.00 | 60.00 | 50.00 | failed | 1e-2 |" in md
    # run again: nothing trains, the same summary
    before = md
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "0 run(s) trained" in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "out" / "summary.md").read_text() == before
    assert len(calls.read_text().splitlines()) == 8 + 1  # only the failed candidate was retried (RETRY_FAILED=1)


def _csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_tuned_run_waits_until_its_candidates_end(tmp_path):
    root = tmp_path / "out"
    ids = ["g/s/lr=1e-3/seed9", "g/s/lr=1e-2/seed9"]
    (root / ids[0]).mkdir(parents=True)
    (root / ids[0] / "results.json").write_text(json.dumps({"status": "finished", "best": {"val_acc": 0.4}}))
    value, why = utils.choose_tuned(root, ids)
    assert value is None and "g/s/lr=1e-2/seed9 is not finished (status: not started)" in why
    (root / ids[1]).mkdir(parents=True)
    (root / ids[1] / "results.json").write_text(json.dumps({"status": "finished", "best": {"val_acc": 0.4}}))
    assert utils.choose_tuned(root, ids)[0] == "1e-3"  # a tie goes to the first candidate
    (root / ids[1] / "results.json").write_text(json.dumps({"status": "finished", "best": {"val_bpd": 1.0}}))
    (root / ids[0] / "results.json").write_text(json.dumps({"status": "finished", "best": {"val_bpd": 2.0}}))
    assert utils.choose_tuned(root, ids)[0] == "1e-2"  # next-step prediction: fewer bits/dim is better


# --------------------------------------------------------------------------------------------------
# summarize.py's statistics: paired t-test p-values and Holm's adjustment, against scipy and the definition
# --------------------------------------------------------------------------------------------------


def test_paired_p_values_equal_scipy_and_holm_equals_the_step_down_procedure(tmp_path):
    root = tmp_path / "series"
    tests = {"s5": [0.50, 0.60, 0.70, 0.55, 0.65], "a": [0.60, 0.72, 0.81, 0.66, 0.74],
             "b": [0.45, 0.70, 0.62, 0.58, 0.61], "c": [0.52, 0.61, 0.73, 0.57, 0.66]}
    other = {"s5": [0.2, 0.3, 0.25], "d": [0.3, 0.45, 0.33]}
    for group, series in (("g1", tests), ("g2", other)):
        for k, (setting, values) in enumerate(series.items()):
            for seed, t in enumerate(values):
                d = root / group / setting / f"seed{seed}"
                d.mkdir(parents=True)
                (d / "results.json").write_text(json.dumps(dict(
                    config={"epochs": 1, "ssm_type": "s5" if setting == "s5" else "extend"}, status="finished",
                    epochs=[dict(epoch=1, val_acc=t, test_acc=t)], best=dict(epoch=1, val_acc=t, test_acc=t),
                    wall_time_s=1.0, steps_per_s=1.0, n_params=1)))
                (d / "series_run.json").write_text(json.dumps(dict(order=k, group_label=group, setting=setting,
                                                                   seed=seed)))
    assert summarize.main([str(root), "--no-plots"]) == 0
    rows = {(r["group"], r["setting"]): r for r in _csv(root / "summary.csv")}
    family = [("g1", "a"), ("g1", "b"), ("g1", "c"), ("g2", "d")]
    base = {"g1": tests["s5"], "g2": other["s5"]}
    want = {k: stats.ttest_rel((tests if k[0] == "g1" else other)[k[1]], base[k[0]]).pvalue for k in family}
    for k in family:
        assert math.isclose(float(rows[k]["p"]), want[k], rel_tol=1e-9), k
    assert rows[("g1", "s5")]["p"] == ""  # the baseline is compared with nothing
    # Holm (1979) as a procedure: sorted p_(1) ≤ ... ≤ p_(m), reject H_(1..k) for the largest k with
    # p_(j) ≤ α / (m − j + 1) for all j ≤ k; an adjusted p-value is the smallest α at which its hypothesis is rejected
    m, ps = len(family), sorted(want.values())
    for alpha in (0.001, 0.01, 0.05, 0.1, 0.2, 0.5):
        k = 0
        while k < m and ps[k] <= alpha / (m - k):
            k += 1
        rejected = {key for key in family if want[key] <= ps[k - 1]} if k else set()
        assert {key for key in family if float(rows[key]["p_holm"]) <= alpha} == rejected, alpha
    assert summarize.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert summarize.paired_p([0.1]) is None and summarize.paired_p([0.0, 0.0]) == 1.0
