"""run_train_ex.sh and summarize.py: the smoke series end to end, skipping finished runs, failures, resume, summary.

The end-to-end tests train 3 tiny models on a tiny generated ListOps on the CPU (about a minute on 2 cores);
the bookkeeping tests (resume, warm start without its base, Ctrl-C, misuse) use a fake train_ex.py.
"""

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import summarize

pytestmark = pytest.mark.xdist_group("series")  # its module fixtures are built once, on one worker

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "run_train_ex.sh"
PNG = b"\x89PNG\r\n\x1a\n"


def series_env(out_root, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled", "OUT_ROOT": str(out_root), "SMOKE": "1"}
    for var in ("RUN_GROUPS", "GROUPS", "DATASET", "DATA", "EPOCHS", "SEEDS", "EXTRA", "SERIES", "USE_WANDB",
                "RETRY_FAILED", "FAIL_RUNS", "PYTHON", "TRAIN", "STUDY", "MNIST_SOURCE", "PARALLEL", "DEVICES", "ONLY",
                "LAUNCHER"):
        env.pop(var, None)  # hermetic: only what the test sets
    env.update({k: str(v) for k, v in kw.items()})
    return env


def run_series(env, timeout=240):
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    return r, r.stdout + r.stderr


def md_tables(text):
    """The settings table and the runs table of summary.md, as lists of cell lists (header excluded)."""
    settings_part, runs_part = text.split("## Runs")

    def rows(part):
        lines = [ln for ln in part.splitlines() if ln.startswith("|")]
        return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]

    return rows(settings_part), rows(runs_part)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def results_state(root):
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("results.json")}


# --------------------------------------------------------------------------------------------------
# the smoke series end to end: groups 1 and 6 (the warm start), one run made to fail
# --------------------------------------------------------------------------------------------------

RUN_IDS = ["g1-aux/aux-off/seed0", "g1-aux/aux-on/seed0", "g6-warm-start/s5-base/seed0",
           "g6-warm-start/extend-warm/seed0"]
FAILING = "g1-aux/aux-on/seed0"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("series")
    env = series_env(root, GROUPS="1 6", FAIL_RUNS="g1-aux/aux-on/*")
    r, out = run_series(env)
    assert r.returncode == 0, out
    return root, env, out


@pytest.mark.slow
def test_smoke_series_runs_and_summarises(smoke):
    root, _, out = smoke
    for k, rid in enumerate(RUN_IDS, 1):
        group, setting, _ = rid.split("/")
        assert f"[{k}/4] {group} {setting} seed 0 → {root / rid}" in out
    assert "3 run(s) trained, 0 skipped (finished before), 1 failed, of 4" in out
    assert "--epochs must be at least 1" in out  # the failing run's error is shown

    for rid in RUN_IDS:
        res = json.loads((root / rid / "results.json").read_text()) if rid != FAILING else None
        if res:
            assert res["status"] == "finished" and len(res["epochs"]) == 1, rid
            assert res["config"]["jax_seed"] == 0 and res["config"]["run_dir"] == str(root / rid)
    assert not (root / FAILING / "results.json").exists()
    assert "--epochs must be at least 1" in (root / FAILING / "train.log").read_text()  # the log is kept
    assert json.loads((root / FAILING / "series_run.json").read_text())["exit_code"] == 2

    cfg = lambda rid: json.loads((root / rid / "results.json").read_text())["config"]  # noqa: E731
    assert cfg("g1-aux/aux-off/seed0")["ssm_type"] == "s5"
    warm = cfg("g6-warm-start/extend-warm/seed0")
    assert warm["ssm_type"] == "extend" and warm["freeze"] == "base"
    assert warm["load_checkpoint"] == str(root / "g6-warm-start/s5-base/seed0/ckpt_best.msgpack")

    # summary: printed, one row per setting (= per run: one seed) and per run, the failure marked
    assert "# Series summary" in out
    settings, runs = md_tables((root / "summary.md").read_text())
    assert [(s[0], s[1]) for s in settings] == [tuple(rid.split("/")[:2]) for rid in RUN_IDS]
    assert [r[0] for r in runs] == RUN_IDS
    status = {f"{s[0]}/{s[1]}": s[-1] for s in settings}
    assert status == {"g1-aux/aux-off": "finished", "g1-aux/aux-on": "failed", "g6-warm-start/s5-base": "finished",
                      "g6-warm-start/extend-warm": "finished"}
    rows = read_csv(root / "summary.csv")
    assert len(rows) == 4 and len(read_csv(root / "runs.csv")) == 4
    for row in rows:
        ok = row["status"] == "finished"
        assert (row["n"] == "1") == ok and (row["test_mean"] != "") == ok and (row["epochs_done"] == "1") == ok
        if ok:
            assert 0 <= float(row["test_mean"]) <= 1 and int(row["n_params"]) > 0
    for png in ("val_acc_g1-aux.png", "val_acc_g6-warm-start.png", "test_acc.png"):
        assert (root / png).read_bytes()[:8] == PNG, png


@pytest.mark.slow
def test_second_invocation_skips_finished_runs(smoke):
    root, env, _ = smoke
    before = results_state(root)
    assert len(before) == 3
    r, out = run_series(env, timeout=120)
    assert r.returncode == 0, out
    assert out.count("finished, skipped") == 3
    for rid in RUN_IDS:
        if rid != FAILING:
            group, setting, _ = rid.split("/")
            assert f"{group} {setting} seed 0 → {root / rid}: finished, skipped" in out
    assert "0 run(s) trained, 3 skipped (finished before), 1 failed, of 4" in out  # the failed one was retried
    assert results_state(root) == before  # no results.json touched
    log = (root / FAILING / "train.log").read_text()
    assert log.count("=== ") == 2 and log.count("--epochs must be at least 1") == 2  # both attempts kept
    settings, _ = md_tables((root / "summary.md").read_text())
    assert len(settings) == 4 and [s[-1] for s in settings].count("failed") == 1


# --------------------------------------------------------------------------------------------------
# bookkeeping with a fake train_ex.py: resume, rerun, warm start without its base, Ctrl-C, misuse
# --------------------------------------------------------------------------------------------------

FAKE = r'''
import json, os, sys
from pathlib import Path
argv = sys.argv[1:]
run_dir = Path(argv[argv.index("--run_dir") + 1])
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(argv) + "\n")
epochs = [int(argv[i + 1]) for i, a in enumerate(argv) if a == "--epochs"][-1]
if epochs < 1:
    sys.exit("train_ex.py: error: --epochs must be at least 1")
if os.environ.get("FAKE_INTERRUPT") and os.environ["FAKE_INTERRUPT"] in str(run_dir):
    sys.exit(130)
row = dict(epoch=1, train_loss=1.0, train_acc=0.5, val_loss=1.0, val_acc=0.5, test_loss=1.0, test_acc=0.4,
           seconds=1.0, steps_per_s=2.0)
(run_dir / "ckpt_best.msgpack").write_bytes(b"x")
(run_dir / "results.json").write_text(json.dumps(dict(
    config={"epochs": epochs, "jax_seed": int(argv[argv.index("--jax_seed") + 1])}, epochs=[row],
    best=dict(epoch=1, val_acc=0.5, test_acc=0.4), wall_time_s=1.0, steps_per_s=2.0, n_params=10,
    device="fake", status="finished")))
'''


def fake_env(tmp_path, script=None, **kw):
    """The series' environment with train_ex.py replaced by a fake (FAKE unless `script` is given)."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(script or FAKE)
    (tmp_path / "data").mkdir(exist_ok=True)
    calls = tmp_path / "calls.jsonl"
    return series_env(tmp_path / "out", TRAIN=fake, FAKE_CALLS=calls, DATA=tmp_path / "data", **kw), calls


def calls_of(calls):
    if not calls.exists():
        return {}
    out = {}
    for line in calls.read_text().splitlines():
        argv = json.loads(line)
        out[str(Path(argv[argv.index("--run_dir") + 1]))] = argv
    return out


def put_results(d, status, ckpt=False):
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"status": status, "config": {"epochs": 1}, "epochs": []}))
    (d / "train.log").write_text("old attempt\n")
    if ckpt:
        (d / "ckpt_latest.msgpack").write_bytes(b"old")


@pytest.mark.slow
def test_resume_rerun_and_warm_start_dependency(tmp_path):
    env, calls = fake_env(tmp_path, GROUPS="1 6", SEEDS="0 1", FAIL_RUNS="g6-warm-start/s5-base/seed1")
    out_root = tmp_path / "out"
    put_results(out_root / "g1-aux/aux-off/seed0", "running", ckpt=True)   # killed: resume
    put_results(out_root / "g1-aux/aux-off/seed1", "finished")             # skipped
    put_results(out_root / "g1-aux/aux-on/seed0", "failed", ckpt=True)     # rerun from scratch
    put_results(out_root / "g1-aux/aux-on/seed1", "interrupted")           # no checkpoint: rerun
    r, out = run_series(env, timeout=120)
    assert r.returncode == 0, out
    c = calls_of(calls)
    d = lambda rid: str(out_root / rid)  # noqa: E731
    assert "--resume" in c[d("g1-aux/aux-off/seed0")]
    assert d("g1-aux/aux-off/seed1") not in c
    assert "--resume" not in c[d("g1-aux/aux-on/seed0")] and "--resume" not in c[d("g1-aux/aux-on/seed1")]
    assert not (out_root / "g1-aux/aux-on/seed0/ckpt_latest.msgpack").exists()  # the stale checkpoint went
    assert "old attempt" in (out_root / "g1-aux/aux-on/seed0/train.log").read_text()
    assert "(resuming from ckpt_latest)" in out
    # warm start: seed 0 builds on its own S5 run; seed 1's S5 run failed, so its extension is not started
    warm0 = c[d("g6-warm-start/extend-warm/seed0")]
    assert warm0[warm0.index("--load_checkpoint") + 1] == d("g6-warm-start/s5-base/seed0") + "/ckpt_best.msgpack"
    assert d("g6-warm-start/extend-warm/seed1") not in c
    assert "not started: the run it starts from" in out and "g6-warm-start/s5-base/seed1" in out
    assert "5 run(s) trained, 1 skipped (finished before), 2 failed, of 8" in out
    settings = [(r["group"], r["setting"]) for r in read_csv(out_root / "summary.csv")]
    assert settings == [("g1-aux", "aux-off"), ("g1-aux", "aux-on"), ("g6-warm-start", "s5-base"),
                        ("g6-warm-start", "extend-warm")]  # series order, also for a run skipped without metadata
    runs = {r["dir"]: r for r in read_csv(out_root / "runs.csv")}
    assert runs["g6-warm-start/extend-warm/seed1"]["status"] == "failed"
    assert runs["g6-warm-start/s5-base/seed1"]["status"] == "failed"
    # wandb: one group per series, a name per run
    argv = c[d("g1-aux/aux-on/seed1")]
    assert argv[argv.index("--wandb_run_name") + 1] == "out/g1-aux/aux-on/seed1"


@pytest.mark.slow
def test_ctrl_c_stops_the_series_and_run_groups_alias(tmp_path):
    env, calls = fake_env(tmp_path, RUN_GROUPS="3", FAKE_INTERRUPT="strength-0.1/")
    r, out = run_series(env, timeout=120)
    assert r.returncode == 130, out
    assert "[2/3] g3-aux-strength strength-0.1 seed 0" in out and "[3/3]" not in out
    assert len(calls_of(calls)) == 2


@pytest.mark.parametrize("bad, message", [
    ({"GROUPS": "1 8"}, "GROUPS must be numbers 1 to 7"),
    ({"STUDY": "nope"}, "STUDY must name a plan plans/study-NAME.plan"),
    ({"STUDY": "cpu", "PLAN": "series"}, "give PLAN or STUDY, not both"),
    ({"PLAN": "no-such-plan"}, "no plan"),
    ({"STUDY": "cpu", "SMOKE": "0", "DATASET": "mnist"}, "leave DATASET unset"),
    ({"STUDY": "cpu1", "SMOKE": "0", "GROUPS": "6"}, "GROUPS must be numbers 1 to 5"),
    ({"EPOCHS": "two"}, "EPOCHS must be a positive integer"),
    ({"SEEDS": "0 x"}, "SEEDS must be non-negative integers"),
    ({"SMOKE": "yes"}, "SMOKE must be 0 or 1"),
    ({"EXTRA": "--no_such_flag 1"}, "refuses its flags"),
])
def test_misuse_exits_2(tmp_path, bad, message):
    env, calls = fake_env(tmp_path, **bad)
    r, out = run_series(env, timeout=60)
    assert r.returncode == 2 and message in out, out
    assert not calls.exists()


MNIST_SUBSET = HERE / "testdata" / "mnist"  # real MNIST test images (conftest.py), as MNIST_SOURCE
STUDY_TASKS = {"copying": "copying", "selective-copying": "selective_copying",
               "associative-recall": "associative_recall", "adding": "adding", "psmnist": "pmnist-classification"}
STUDY_SETTINGS = ["s5", "aux-linear", "aux-exponential", "aux-sinusoidal", "aux-constant", "extend-diag",
                  "extend-full", "s4d", "s6", "lru", "s5-control"]


def last(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag][-1]


@pytest.mark.slow
def test_first_cpu_study_runs_every_setting_on_every_task_and_makes_disjoint_mnist_splits(tmp_path):
    import dataloaders

    env, calls = fake_env(tmp_path, STUDY="cpu1", SMOKE="0", SEEDS="0", PARALLEL="2", MNIST_SOURCE=MNIST_SUBSET)
    env.pop("DATA")  # the study makes its own psMNIST data
    r, out = run_series(env, timeout=300)
    assert r.returncode == 0, out
    out_root = tmp_path / "out"
    c = calls_of(calls)
    assert len(c) == len(STUDY_TASKS) * len(STUDY_SETTINGS)
    for group, dataset in STUDY_TASKS.items():
        for setting in STUDY_SETTINGS:
            argv = c[str(out_root / group / setting / "seed0")]
            assert last(argv, "--dataset") == dataset and last(argv, "--d_model") == "32"
            size = last(argv, "--ssm_size_base")
            assert (size == "16") == (setting != "s5-control"), (group, setting, size)
            kind = setting.split("-")[0]
            assert last(argv, "--ssm_type") == kind if kind in ("s5", "extend", "s4d", "s6", "lru") else \
                "--enable_auxiliary_state" in argv
    raw = out_root / "data" / "MNIST" / "raw"
    train = dataloaders.read_idx(raw / "train-images-idx3-ubyte.gz")
    test = dataloaders.read_idx(raw / "t10k-images-idx3-ubyte.gz")
    labels = dataloaders.read_idx(raw / "train-labels-idx1-ubyte.gz")
    source = dataloaders.read_idx(MNIST_SUBSET / "t10k-images-idx3-ubyte.gz")
    n_train = len(source) - 2000  # the study's split-mnist --n_test 2000: the source's last 2,000 images are test
    assert train.shape == (n_train, 28, 28) and test.shape == (2000, 28, 28) and labels.shape == (n_train,)
    np.testing.assert_array_equal(np.concatenate([train, test]), source)  # a split of the source, nothing lost
    assert not {t.tobytes() for t in test} & {t.tobytes() for t in train}  # no test image among the training ones
    assert "psmnist" in (out_root / "summary.md").read_text()


def test_help_lists_the_variables():
    r = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    for var in ("DATASET", "EPOCHS", "SEEDS", "EXTRA", "OUT_ROOT", "RUN_GROUPS", "DATA", "SMOKE"):
        assert f"  {var} " in r.stdout, var
    r = subprocess.run([sys.executable, str(HERE / "summarize.py"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "summary.md" in r.stdout


# --------------------------------------------------------------------------------------------------
# summarize.py on hand-written results
# --------------------------------------------------------------------------------------------------


def write_run(root, rid, status, best=None, epochs=(), total=3, meta=None, ssm_type=None, n_params=1234):
    d = root / rid
    d.mkdir(parents=True)
    rows = [dict(epoch=i + 1, val_acc=v, test_acc=t, seconds=1.0, steps_per_s=4.0) for i, (v, t) in enumerate(epochs)]
    config = {"epochs": total, "jax_seed": int(rid[-1])} | ({"ssm_type": ssm_type} if ssm_type else {})
    body = dict(config=config, epochs=rows, wall_time_s=float(len(rows)),
                steps_per_s=4.0, n_params=n_params, device="cpu", status=status)
    if best is not None:
        body["best"] = dict(epoch=1, val_acc=best[0], test_acc=best[1])
    if status is not None:
        (d / "results.json").write_text(json.dumps(body))
    if meta is not None:
        (d / "series_run.json").write_text(json.dumps(meta))


def test_summarize_mean_std_partial_and_failed(tmp_path):
    root = tmp_path / "series"
    three = [(0.1, 0.1)] * 3
    write_run(root, "g1-aux/aux-on/seed0", "finished", (0.6, 0.5), three)
    write_run(root, "g1-aux/aux-on/seed1", "finished", (0.8, 0.7), three)
    write_run(root, "g1-aux/aux-on/seed2", "failed", (0.95, 0.9), three[:2])         # never counted
    write_run(root, "g2-time-scale/linear/seed0", "running", None, [(0.3, 0.2), (0.4, 0.35)])  # best from epochs
    write_run(root, "g2-time-scale/constant/seed0", None,                              # train_ex never got going
              meta=dict(order=9, group_label="g2-time-scale", setting="constant", seed=0, status="failed",
                        exit_code=2, note="exit code 2: bad flag"))
    assert summarize.main([str(root)]) == 0

    rows = {r["setting"]: r for r in read_csv(root / "summary.csv")}
    assert set(rows) == {"aux-on", "linear", "constant"}
    on = rows["aux-on"]
    assert on["n"] == "2" and on["seeds"] == "0 1 2" and on["status"] == "2 finished, 1 failed"
    assert math.isclose(float(on["test_mean"]), 0.6) and math.isclose(float(on["test_std"]), math.sqrt(0.02))
    assert math.isclose(float(on["val_mean"]), 0.7) and math.isclose(float(on["val_std"]), math.sqrt(0.02))
    lin = rows["linear"]
    assert lin["n"] == "1" and lin["status"] == "running (partial)" and lin["test_std"] == ""
    assert math.isclose(float(lin["val_mean"]), 0.4) and math.isclose(float(lin["test_mean"]), 0.35)
    assert lin["epochs_done"] == "2" and lin["epochs_total"] == "3"
    con = rows["constant"]
    assert con["status"] == "failed" and con["n"] == "0" and con["test_mean"] == ""

    settings, runs = md_tables((root / "summary.md").read_text())
    by = {s[1]: s for s in settings}
    assert by["aux-on"][4] == "70.00 ± 14.14" and by["aux-on"][5] == "60.00 ± 14.14"
    assert by["linear"][5] == "35.00" and by["linear"][12] == "2/3" and by["linear"][10] == "—"  # no guard
    assert by["constant"][4] == "—" and by["constant"][-1] == "failed"
    # best epoch among the last two: aux-on's runs peaked at epoch 1 of 3, linear's at its last
    assert by["aux-on"][13] == "0/2" and by["linear"][13] == "1/1"
    assert "Best epoch among a run's last two: 1 of the 3 runs counted above" in (root / "summary.md").read_text()
    assert len(runs) == 5 and any("bad flag" in r[-1] for r in runs)
    for png in ("val_acc_g1-aux.png", "val_acc_g2-time-scale.png", "test_acc.png"):
        assert (root / png).read_bytes()[:8] == PNG


def test_summarize_marks_runs_on_generated_data(tmp_path):
    root = tmp_path / "series"
    write_run(root, "g/real/seed0", "finished", (0.6, 0.5), [(0.6, 0.5)])
    write_run(root, "g/gen/seed0", "finished", (0.7, 0.6), [(0.7, 0.6)])
    res = json.loads((root / "g/gen/seed0/results.json").read_text())
    res["data"] = {"generated": True, "generator_seed": 0, "source": "a GENERATED ListOps set"}
    (root / "g/gen/seed0/results.json").write_text(json.dumps(res))
    assert summarize.main([str(root)]) == 0
    rows = {r["setting"]: r for r in read_csv(root / "summary.csv")}
    assert rows["gen"]["data"] == "generated" and rows["real"]["data"] == "release"
    assert rows["gen"]["status"] == rows["real"]["status"] == "finished"
    assert "**Generated data**, not the published release" in (root / "summary.md").read_text()
    _, runs = md_tables((root / "summary.md").read_text())
    assert any("GENERATED data, generator seed 0" in r[-1] for r in runs)
    assert not any("GENERATED" in r[-1] for r in runs if "real" in r[0])


def test_summarize_links_inspect_folders(tmp_path):
    root = tmp_path / "series"
    write_run(root, "g/a/seed0", "finished", (0.6, 0.5), [(0.6, 0.5)])
    write_run(root, "g/b/seed0", "finished", (0.6, 0.5), [(0.6, 0.5)])
    (root / "g/a/seed0/inspect").mkdir()
    (root / "g/a/seed0/inspect/inspect.json").write_text("{}")
    assert summarize.main([str(root)]) == 0
    _, runs = md_tables((root / "summary.md").read_text())
    notes = {r[0]: r[-1] for r in runs}
    assert notes["g/a/seed0"] == "[inspect](g/a/seed0/inspect/)" and "inspect" not in notes["g/b/seed0"]


def test_summarize_reports_bits_per_dim_of_next_pixel_runs(tmp_path):
    root = tmp_path / "series"
    write_run(root, "g/gen/seed0", "finished", (0.8, 0.7), [(0.8, 0.7)])
    write_run(root, "g/cls/seed0", "finished", (0.6, 0.5), [(0.6, 0.5)])
    res = json.loads((root / "g/gen/seed0/results.json").read_text())
    res["best"].update(val_bpd=1.25, test_bpd=1.5)
    (root / "g/gen/seed0/results.json").write_text(json.dumps(res))
    assert summarize.main([str(root)]) == 0
    runs = {r["dir"]: r for r in read_csv(root / "runs.csv")}
    assert float(runs["g/gen/seed0"]["val_bpd"]) == 1.25 and float(runs["g/gen/seed0"]["test_bpd"]) == 1.5
    assert runs["g/cls/seed0"]["val_bpd"] == ""
    _, md_runs = md_tables((root / "summary.md").read_text())
    notes = {r[0]: r[-1] for r in md_runs}
    assert "best val 1.2500 bits/dim, test 1.5000" in notes["g/gen/seed0"] and "bits/dim" not in notes["g/cls/seed0"]


def test_summarize_reports_the_guards_activity_and_the_lti_floor(tmp_path):
    """The guard column: the share of rows scaled and the median scale at each run's best epoch, averaged over layers,
    then over seeds; the time-varying task's table: mean test MSE beside the mean LTI floor."""
    root = tmp_path / "series"
    for seed, (scaled, scale) in enumerate([([0.9, 1.0], [0.2, 0.1]), ([1.0, 1.0], [0.3, 0.2])]):
        write_run(root, f"g/rows/seed{seed}", "finished", (0.6, 0.5), [(0.1, 0.1), (0.6, 0.5)])
        res = json.loads((root / f"g/rows/seed{seed}/results.json").read_text())
        res["best"]["epoch"] = 2
        res["epochs"][0].update(guard_scaled=[0.0, 0.0], guard_median_scale=[1.0, 1.0])  # not the best epoch
        res["epochs"][1].update(guard_scaled=scaled, guard_median_scale=scale)
        res["best"]["test_loss"], res["lti_floor"] = 0.1 * (seed + 1), {"test": {"mse": 0.5}, "taps": 8}
        (root / f"g/rows/seed{seed}/results.json").write_text(json.dumps(res))
    write_run(root, "g/s5/seed0", "finished", (0.6, 0.5), [(0.6, 0.5)], ssm_type="s5")
    assert summarize.main([str(root), "--no-plots"]) == 0
    rows = {r["setting"]: r for r in read_csv(root / "summary.csv")}
    assert math.isclose(float(rows["rows"]["guard_scaled"]), (0.95 + 1.0) / 2)
    assert math.isclose(float(rows["rows"]["guard_scale"]), (0.15 + 0.25) / 2)
    assert rows["s5"]["guard_scaled"] == "" and rows["s5"]["lti_floor"] == ""
    assert math.isclose(float(rows["rows"]["test_mse"]), 0.15) and math.isclose(float(rows["rows"]["lti_floor"]), 0.5)
    text = (root / "summary.md").read_text()
    settings, runs = md_tables(text)
    assert {s[1]: s[10] for s in settings if len(s) == 18} == {"rows": "98% ×0.20", "s5": "—"}
    assert "| g | rows | 0.1500 | 0.5000 | 0.300 |" in text
    assert any("test MSE 0.1000 vs LTI floor 0.5000" in r[-1] for r in runs)


def test_summarize_picks_a_next_pixel_runs_best_epoch_by_bits(tmp_path):
    """Without `best` (an interrupted or hand-written results.json) a next-pixel run's best epoch is the one with the
    lowest validation bits/dim, as train_ex chooses it, not the one with the highest per-pixel accuracy."""
    root = tmp_path / "series"
    write_run(root, "g/gen/seed0", "running", None, [(0.80, 0.7), (0.79, 0.75)])
    res = json.loads((root / "g/gen/seed0/results.json").read_text())
    for row, (v, t) in zip(res["epochs"], [(2.0, 2.1), (1.5, 1.6)]):
        row.update(val_bpd=v, test_bpd=t)
    (root / "g/gen/seed0/results.json").write_text(json.dumps(res))
    assert summarize.main([str(root)]) == 0
    run = read_csv(root / "runs.csv")[0]
    assert run["best_epoch"] == "2" and float(run["val"]) == 0.79 and float(run["val_bpd"]) == 1.5


def test_t_quantile_is_the_textbook_value():
    # two-sided 95% points of Student's t from the printed tables (Fisher and Yates), and the normal's limit
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042), (120, 1.980), (10 ** 7, 1.960)):
        assert summarize.t975(df) == pytest.approx(t, abs=6e-4), df
    with pytest.raises(ValueError):
        summarize.t975(0)


def stats_series(root):
    """One group of three settings over seeds 0-2 (extend also seed 3, which has no S5 partner) and a group
    without S5. Test accuracies by hand: differences to S5 of extend 0.10, 0.12, 0.11; of the control -0.05, 0.10,
    -0.08."""
    tests = {"s5": [0.50, 0.60, 0.70], "extend-full": [0.60, 0.72, 0.81, 0.99], "s5-control": [0.45, 0.70, 0.62]}
    types = {"s5": "s5", "extend-full": "extend", "s5-control": "s5"}
    params = {"s5": 6890, "extend-full": 13674, "s5-control": 13500}
    for k, (setting, values) in enumerate(tests.items()):  # in series order (series_run.json), S5 first
        for seed, t in enumerate(values):
            write_run(root, f"g1/{setting}/seed{seed}", "finished", (t, t), [(t, t)], ssm_type=types[setting],
                      n_params=params[setting], meta=dict(order=k, group_label="g1", setting=setting, seed=seed))
    for seed, t in enumerate([0.3, 0.4]):
        write_run(root, f"g2/aux/seed{seed}", "finished", (t, t), [(t, t)], ssm_type="aux")
    return tests


def test_summarize_confidence_intervals_and_paired_differences(tmp_path):
    from scipy import stats

    root = tmp_path / "series"
    tests = stats_series(root)
    assert summarize.main([str(root)]) == 0
    rows = {r["setting"]: r for r in read_csv(root / "summary.csv")}
    t2, t3 = stats.t.ppf(0.975, 2), stats.t.ppf(0.975, 3)

    s5 = rows["s5"]  # mean 0.6, std 0.1
    assert math.isclose(float(s5["test_mean"]), 0.6) and math.isclose(float(s5["test_std"]), 0.1)
    assert math.isclose(float(s5["test_ci95"]), t2 * 0.1 / math.sqrt(3), rel_tol=1e-5)
    ext = tests["extend-full"]
    m = sum(ext) / 4
    sd = math.sqrt(sum((v - m) ** 2 for v in ext) / 3)
    assert math.isclose(float(rows["extend-full"]["test_ci95"]), t3 * sd / math.sqrt(4), rel_tol=1e-5)

    assert s5["baseline"] == "s5" and s5["diff_n"] == "0" and rows["aux"]["baseline"] == ""
    d = rows["extend-full"]  # pairs of seeds 0-2: 0.10, 0.12, 0.11 → mean 0.11, std 0.01
    assert d["baseline"] == "s5" and d["diff_n"] == "3"
    assert math.isclose(float(d["diff_mean"]), 0.11) and math.isclose(float(d["diff_std"]), 0.01, rel_tol=1e-6)
    assert math.isclose(float(d["diff_ci95"]), t2 * 0.01 / math.sqrt(3), rel_tol=1e-5)
    assert d["diff_excludes_0"] == "True"
    c = rows["s5-control"]  # -0.05, 0.10, -0.08: mean -0.01, std 0.0964
    assert math.isclose(float(c["diff_mean"]), -0.01) and c["diff_excludes_0"] == "False"
    assert math.isclose(float(c["diff_std"]), math.sqrt((0.04 ** 2 + 0.11 ** 2 + 0.07 ** 2) / 2), rel_tol=1e-6)

    settings, runs = md_tables((root / "summary.md").read_text())
    by = {s[1]: s for s in settings}
    half = 100 * t2 * 0.01 / math.sqrt(3)
    assert by["extend-full"][7] == f"+11.00 [{11 - half:+.2f}, {11 + half:+.2f}] *"
    assert by["s5-control"][7].startswith("-1.00 [") and not by["s5-control"][7].endswith("*")
    assert by["s5"][7] == "baseline" and by["aux"][7] == "—"
    assert by["s5"][6] == f"[{60 - 100 * t2 * 0.1 / 3 ** 0.5:.2f}, {60 + 100 * t2 * 0.1 / 3 ** 0.5:.2f}]"
    assert by["s5"][9] == "6,890" and by["extend-full"][9] == "13,674"
    diffs = {r[0]: r[6] for r in runs}
    assert diffs["g1/extend-full/seed1"] == "+12.00" and diffs["g1/extend-full/seed3"] == "—"
    assert diffs["g1/s5-control/seed2"] == "-8.00" and diffs["g1/s5/seed0"] == "—"  # the baseline itself
    for png in ("test_acc.png", "test_acc_diff.png"):
        assert (root / png).read_bytes()[:8] == PNG


def test_summarize_baseline_option(tmp_path, capsys):
    root = tmp_path / "series"
    stats_series(root)
    assert summarize.main([str(root), "--baseline", "s5-control", "--no-plots"]) == 0
    rows = {r["setting"]: r for r in read_csv(root / "summary.csv")}
    assert rows["s5"]["baseline"] == "s5-control"
    assert math.isclose(float(rows["s5"]["diff_mean"]), 0.01)  # 0.05, -0.10, 0.08
    assert summarize.main([str(root), "--baseline", "nothing"]) == 2
    assert "--baseline 'nothing' is no setting of any group" in capsys.readouterr().err

# --------------------------------------------------------------------------------------------------
# several runs at once: PARALLEL, signals to the series
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_2_gives_the_serial_series_results(smoke, tmp_path):
    """... and with the series' own compilation cache (OUT_ROOT/.jax_cache: the smoke series used the test session's)
    the same numbers."""
    root, _, _ = smoke
    env = series_env(tmp_path / "par", GROUPS="1 6", FAIL_RUNS="g1-aux/aux-on/*", PARALLEL="2")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    r, out = run_series(env)
    assert r.returncode == 0, out
    assert "3 run(s) trained, 0 skipped (finished before), 1 failed, of 4" in out
    assert any((tmp_path / "par" / ".jax_cache").iterdir()), "the series wrote no compilation cache"
    for rid in RUN_IDS:
        if rid == FAILING:
            assert json.loads((tmp_path / "par" / rid / "series_run.json").read_text())["status"] == "failed"
            continue
        a = json.loads((root / rid / "results.json").read_text())
        b = json.loads((tmp_path / "par" / rid / "results.json").read_text())
        assert b["status"] == "finished" and len(a["epochs"]) == len(b["epochs"]) == 1, rid
        for x, y in zip(a["epochs"], b["epochs"]):
            for k in ("train_loss", "val_loss", "test_loss", "val_acc", "test_acc"):
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (rid, k)


SLEEPY = r'''
import json, os, signal, sys, time
from pathlib import Path
argv = sys.argv[1:]
run_dir = Path(argv[argv.index("--run_dir") + 1])
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(argv) + "\n")
def results(status):
    (run_dir / "results.json").write_text(json.dumps(dict(config={"epochs": 1}, epochs=[], status=status)))
if "--resume" in argv:
    assert (run_dir / "ckpt_latest.msgpack").read_bytes() == b"saved"
if "--resume" in argv or not os.environ.get("FAKE_HOLD"):
    results("finished"); sys.exit(0)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
results("running")
(run_dir / "started").write_text("")
while not stop:
    time.sleep(0.05)
(run_dir / "ckpt_latest.msgpack").write_bytes(b"saved")
results("interrupted")
sys.exit(143)
'''


@pytest.mark.slow
def test_sigterm_to_a_parallel_series_interrupts_every_run_and_the_next_invocation_finishes_them(tmp_path):
    import signal
    import time

    env, calls = fake_env(tmp_path, SLEEPY, RUN_GROUPS="3", PARALLEL="2")
    proc = subprocess.Popen(["bash", str(SCRIPT)], env={**env, "FAKE_HOLD": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=HERE)
    dirs = [tmp_path / "out/g3-aux-strength" / s / "seed0" for s in ("strength-0.05", "strength-0.1")]
    end = time.monotonic() + 60
    while not all((d / "started").exists() for d in dirs):
        assert time.monotonic() < end and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, out
    assert "strength-0.2" not in out  # the third run is not started
    for d in dirs:
        assert json.loads((d / "results.json").read_text())["status"] == "interrupted"
        meta = json.loads((d / "series_run.json").read_text())
        assert meta["status"] == "interrupted" and meta["exit_code"] == 143
    r, out = run_series(env, timeout=120)
    assert r.returncode == 0, out
    assert out.count("(resuming from ckpt_latest)") == 2
    assert "3 run(s) trained, 0 skipped (finished before), 0 failed, of 3" in out
    for d in [*dirs, tmp_path / "out/g3-aux-strength/strength-0.2/seed0"]:
        assert json.loads((d / "results.json").read_text())["status"] == "finished"


def test_cluster_md_exit_codes_are_utils_table():
    import utils

    assert utils.exit_code_table() in (HERE / "CLUSTER.md").read_text()
    assert utils.exit_status(143) == utils.exit_status(130) == utils.exit_status(138) == "interrupted"
    assert 143 not in utils.FINAL_CODES and 0 in utils.FINAL_CODES and 2 in utils.FINAL_CODES
    cluster = (HERE / "CLUSTER.md").read_text()
    assert "| 5 | does not fit | does not fit: XLA's estimate" in cluster and "| 6 | locked | locked: " in cluster
    assert utils.exit_status(utils.DOES_NOT_FIT) == "does not fit" and utils.exit_status(utils.LOCKED) == "locked"


DEVICE_FAKE = r'''
import json, os, sys, time
from pathlib import Path
argv = sys.argv[1:]
run_dir = Path(argv[argv.index("--run_dir") + 1])
calls = Path(os.environ["FAKE_CALLS"])
def event(kind):
    with open(calls, "a") as f:
        f.write(json.dumps([kind, str(run_dir), os.environ.get("CUDA_VISIBLE_DEVICES")]) + "\n")
event("start")
end = time.monotonic() + 30
while sum(ln.startswith('["start"') for ln in calls.read_text().splitlines()) < 2 and time.monotonic() < end:
    time.sleep(0.05)  # the first two runs wait for each other: both run at once
(run_dir / "results.json").write_text(json.dumps(dict(config={"epochs": 1}, epochs=[], status="finished")))
event("end")
'''


@pytest.mark.slow
def test_devices_give_each_running_run_its_own_device(tmp_path):
    """DEVICES="0 1": two runs at once, each with CUDA_VISIBLE_DEVICES set to a device no other running run has;
    the third run gets the device its predecessor freed."""
    env, calls = fake_env(tmp_path, DEVICE_FAKE, RUN_GROUPS="3", DEVICES="0 1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    r, out = run_series(env, timeout=120)
    assert r.returncode == 0, out
    events = [json.loads(ln) for ln in calls.read_text().splitlines()]
    assert [e[0] for e in events].count("start") == 3 and [e[0] for e in events].count("end") == 3, events
    running = {}
    for kind, run, device in events:
        if kind == "start":
            assert device in ("0", "1") and device not in running.values(), (run, device, running)
            running[run] = device
        else:
            del running[run]
    assert {e[2] for e in events[:2]} == {"0", "1"} and [e[0] for e in events[:2]] == ["start", "start"]


SHARING = r'''
import json, os, sys, time
from pathlib import Path
argv = sys.argv[1:]
run_dir = Path(argv[argv.index("--run_dir") + 1])
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps([os.environ["FAKE_SERIES"], str(run_dir), os.environ.get("RUN_LOCK_TOKEN")]) + "\n")
assert json.loads((run_dir / "run.lock").read_text())["token"] == os.environ["RUN_LOCK_TOKEN"]
time.sleep(1.0)  # long enough for the other series to meet this run while it runs
row = dict(epoch=1, train_loss=1.0, train_acc=0.5, val_loss=1.0, val_acc=0.5, test_loss=1.0, test_acc=0.4,
           seconds=1.0, steps_per_s=2.0)
(run_dir / "results.json").write_text(json.dumps(dict(
    config={"epochs": 1, "jax_seed": 0}, epochs=[row], best=dict(epoch=1, val_acc=0.5, test_acc=0.4),
    wall_time_s=1.0, steps_per_s=2.0, n_params=10, device="fake", status="finished")))
'''


@pytest.mark.slow
def test_two_series_on_one_out_root_share_the_runs_each_trained_once(tmp_path):
    env, calls = fake_env(tmp_path, SHARING, RUN_GROUPS="2 3", PARALLEL="1")
    procs = {name: subprocess.Popen(["bash", str(SCRIPT)], env={**env, "FAKE_SERIES": name}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, cwd=HERE) for name in ("A", "B")}
    outs = {name: p.communicate(timeout=240)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, outs[name]
    runs = [json.loads(ln) for ln in calls.read_text().splitlines()]
    dirs = [r[1] for r in runs]
    out_root = tmp_path / "out"
    expected = sorted(str(d.parent) for d in out_root.glob("g*/*/seed0/results.json"))
    assert len(expected) == 7 and sorted(dirs) == expected  # every run trained, and only once
    by = {name: sum(r[0] == name for r in runs) for name in ("A", "B")}
    assert by["A"] > 0 and by["B"] > 0, by  # shared between them
    for name, other in (("A", "B"), ("B", "A")):
        # each series counts every run once: its own, those the other had finished before it looked (skipped: the
        # two start a few seconds apart, as the plan is read), and those it found running and waited for
        m = re.search(r"(\d+) run\(s\) trained, (\d+) skipped \(finished before\),(?: (\d+) trained elsewhere)?",
                      outs[name])
        assert m, outs[name]
        trained, skipped, elsewhere = (int(g or 0) for g in m.groups())
        assert trained == by[name] and skipped + elsewhere == by[other], outs[name]
    assert any("running elsewhere (held by pid " in out for out in outs.values())
    for d in expected:
        log = (Path(d) / "train.log").read_text()
        assert log.count("attempt (fresh)") == 1, log
        assert json.loads((Path(d) / "series_run.json").read_text())["status"] == "finished"
    summaries = {name: out[out.index("# Series summary"):] for name, out in outs.items()}
    assert summaries["A"] == summaries["B"]
    settings, rows = md_tables(summaries["A"])
    assert len(rows) == 7 and all(r[2] == "finished" for r in rows)


HOLDER = r'''
import fcntl, json, os, sys, time
from pathlib import Path
held, other = Path(sys.argv[1]), Path(sys.argv[2])
f = open(held / "run.lock", "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.truncate(0); f.write(json.dumps(dict(pid=os.getpid(), host="elsewhere", started="then"))); f.flush()
before = sorted(os.listdir(held))
print("held", flush=True)
end = time.monotonic() + 120
while not (other / "results.json").exists() and time.monotonic() < end:  # the series has passed the held run
    time.sleep(0.05)
time.sleep(1)
print(json.dumps([before, sorted(os.listdir(held))]), flush=True)
'''


@pytest.mark.slow
def test_a_run_held_by_another_process_is_skipped_untouched_then_waited_for(tmp_path):
    """A run directory held by another process (here a stand-in that holds run.lock until the series has trained
    the next run): skipped without a file touched, waited for at the end, then trained by the series (its holder
    left it unfinished)."""
    env, calls = fake_env(tmp_path, RUN_GROUPS="1")
    held, other = tmp_path / "out/g1-aux/aux-off/seed0", tmp_path / "out/g1-aux/aux-on/seed0"
    held.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(held), str(other)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    r, out = run_series(env, timeout=180)
    before, during = json.loads(holder.stdout.readline())
    holder.wait(timeout=30)
    assert r.returncode == 0, out
    assert before == during == ["run.lock"]  # nothing written beside the lock while it was held elsewhere
    assert "aux-off seed 0 → " + str(held) + ": running elsewhere (held by pid " + str(holder.pid) in out
    assert "on host elsewhere" in out and "waiting for 1 run(s) that another process is training" in out
    assert list(calls_of(calls)) == [str(other), str(held)]  # the held run only after its holder had gone
    assert "2 run(s) trained, 0 skipped (finished before), 0 failed, of 2" in out


NOFIT = r'''
import runpy, sys
if "aux-on" in " ".join(sys.argv):  # train_ex.py's exit when XLA's estimate exceeds the free memory
    print("error: does not fit: XLA estimates 99.00 GB per device for one training step at --bsz 64", file=sys.stderr)
    sys.exit(5)
runpy.run_path(sys.argv[0].replace("nofit_train.py", "fake_train.py"), run_name="__main__")
'''


@pytest.mark.slow
def test_a_run_that_does_not_fit_is_recorded_as_such_not_as_a_crash(tmp_path):
    import utils

    env, calls = fake_env(tmp_path, RUN_GROUPS="1")
    nofit = tmp_path / "nofit_train.py"
    nofit.write_text(NOFIT)
    r, out = run_series({**env, "TRAIN": str(nofit)}, timeout=120)
    assert r.returncode == 0, out
    assert "aux-on/seed0: DOES NOT FIT in memory (exit 5)" in out and "XLA estimates 99.00 GB" in out
    assert "1 run(s) trained, 0 skipped (finished before), 0 failed, 1 did not fit in memory, of 2" in out
    meta = json.loads((tmp_path / "out/g1-aux/aux-on/seed0/series_run.json").read_text())
    assert meta["status"] == "does not fit" and meta["exit_code"] == utils.DOES_NOT_FIT
    runs = {r["dir"]: r for r in read_csv(tmp_path / "out/runs.csv")}
    assert runs["g1-aux/aux-on/seed0"]["status"] == "does not fit"
