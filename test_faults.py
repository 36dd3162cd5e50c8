"""Faults a cluster produces: a damaged checkpoint, a full disk, an unwritable run directory, a truncated
results.json. Each must end in a message and an exit code of utils.EXIT_CODES, never a traceback or lost work."""

import json
import os
import subprocess
import sys
import time

import pytest

import summarize
import train_ex
import utils
from test_series import write_run
from test_train import HERE, SUBPROCESS_ENV, mnist_args, results


def damage(path, keep=100):
    """What an interrupted copy leaves: the first `keep` bytes."""
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.slow
def test_resume_from_a_damaged_latest_continues_from_the_previous_checkpoint(mnist_root, tmp_path, capsys):
    args = lambda d, *x: mnist_args(mnist_root, tmp_path / d, "--epochs", "2", *x)  # noqa: E731
    assert train_ex.main(args("full")) == 0
    assert train_ex.main(args("cut", "--max_steps", "11")) == 0  # 8 steps an epoch: stops in epoch 2
    cut = tmp_path / "cut"
    prev = json.loads((cut / "ckpt_latest.prev.json").read_text())["progress"]
    assert prev["step"] == 8 and json.loads((cut / "ckpt_latest.json").read_text())["progress"]["step"] == 11
    damage(cut / "ckpt_latest.msgpack")
    capsys.readouterr()
    assert train_ex.main(args("cut", "--resume")) == 0
    out = capsys.readouterr().out
    assert "using ckpt_latest.prev.msgpack (step 8)" in out and "ckpt_latest.msgpack is damaged" in out
    full, resumed = results(tmp_path / "full"), results(cut)
    assert resumed["status"] == "finished" and len(resumed["epochs"]) == 2
    for a, b in zip(full["epochs"], resumed["epochs"]):
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "test_acc"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_with_no_readable_checkpoint_resume_exits_2_naming_the_files(mnist_root, tmp_path, capsys):
    run = tmp_path / "r"
    assert train_ex.main(mnist_args(mnist_root, run, "--epochs", "2", "--max_steps", "11")) == 0
    for name in ("ckpt_latest.msgpack", "ckpt_latest.prev.msgpack", "ckpt_best.msgpack"):
        damage(run / name)
    (run / "ckpt_best.json").write_text("{")  # a damaged metadata file is named too
    capsys.readouterr()
    assert train_ex.main(mnist_args(mnist_root, run, "--epochs", "2", "--resume")) == 2
    err = capsys.readouterr().err
    assert "no checkpoint of" in err and "without --resume" in err
    for name in ("ckpt_latest.msgpack", "ckpt_latest.prev.msgpack", "ckpt_best.json"):
        assert name in err, name
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_exits_4_without_traceback_or_temporaries(mnist_root, tmp_path):
    """The run's second epoch cannot write its checkpoint (a file-size limit below the checkpoint's size, set in
    the child as a full disk or quota would act): exit 4, a message, no temporary files, the first epoch's
    checkpoints untouched, results.json saying what failed."""
    run = tmp_path / "r"
    wide = ("--d_model", "32", "--ssm_size_base", "32")  # a checkpoint of about 50 kB
    assert train_ex.main(mnist_args(mnist_root, run, "--epochs", "1", *wide)) == 0
    before = {p.name: p.read_bytes() for p in run.glob("ckpt_*")}
    assert len(before) == 4 and min(len(v) for k, v in before.items() if k.endswith(".msgpack")) > 24_000
    limit = 12_000  # above results.json and the .json files, below a checkpoint

    # the limit is set in the child itself, before it imports anything (no fork of this multithreaded process)
    child = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
             f"sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", child, str(HERE / "train_ex.py"),
                        *mnist_args(mnist_root, run, "--epochs", "2", "--resume", *wide)],
                       env={**os.environ, **SUBPROCESS_ENV}, capture_output=True, text=True, timeout=300)
    assert r.returncode == utils.WriteError.code == 4, r.stderr[-2000:]
    assert "could not write" in r.stderr and "ckpt_latest.msgpack" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert {p.name: p.read_bytes() for p in run.glob("ckpt_*")} == before
    res = results(run)
    assert res["status"] == "failed" and "could not write" in res["error"]


def test_an_unwritable_run_dir_exits_2_before_loading_data(tmp_path, capsys):
    t0 = time.perf_counter()
    code = train_ex.main(["--dataset", "mnist-classification", "--dir_name", str(tmp_path / "no-data-here"),
                          "--run_dir", "/proc/no/such/run"])
    err = capsys.readouterr().err
    assert code == 2 and "--run_dir /proc/no/such/run cannot be created or written" in err, err
    assert "MNIST" not in err  # the data (missing here) was never looked at
    assert time.perf_counter() - t0 < 30


def test_summarize_lists_and_counts_a_truncated_results_json(tmp_path, capsys):
    root = tmp_path / "series"
    write_run(root, "g/s5/seed0", "finished", (0.6, 0.5), [(0.6, 0.5)])
    write_run(root, "g/s5/seed1", "finished", (0.7, 0.6), [(0.7, 0.6)])
    bad = root / "g/s5/seed1/results.json"
    damage(bad, keep=40)
    assert summarize.main([str(root)]) == 0
    captured = capsys.readouterr()
    assert f"{bad} cannot be read" in captured.err and "1 unreadable" in captured.out
    md = (root / "summary.md").read_text()
    assert "**1 results.json cannot be read**" in md and "`g/s5/seed1/results.json`" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| g/s5/")}
    assert "unreadable" in rows["g/s5/seed1"] and "finished" in rows["g/s5/seed0"]
