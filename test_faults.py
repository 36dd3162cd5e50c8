"""Faults a cluster produces: a damaged checkpoint, a full disk, an unwritable run directory, a truncated
results.json. Each must end in a message and an exit code of utils.EXIT_CODES, never a traceback or lost work."""

import json
import os
import subprocess
import sys
import time

import pytest

import models
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


@pytest.mark.slow
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


# --------------------------------------------------------------------------------------------------
# one writer per run directory (run.lock), memory checked before the first step, workers that die
# --------------------------------------------------------------------------------------------------


def start_training(argv):
    return subprocess.Popen([sys.executable, str(HERE / "train_ex.py"), *argv], env={**os.environ, **SUBPROCESS_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_holder(run, proc, timeout=120):
    """Wait until `proc` holds run/run.lock (its pid written there after taking the lock)."""
    end = time.monotonic() + timeout
    while utils.read_lock_holder(run).get("pid") != proc.pid:
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.05)


def snapshot(folder):
    """Every file under `folder`: its bytes and mtime; and the folder's own mtime."""
    files = {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
             for p in sorted(folder.rglob("*")) if p.is_file()}
    return files, folder.stat().st_mtime_ns


@pytest.mark.slow
def test_a_second_process_on_a_run_dir_exits_6_naming_the_first_and_the_first_finishes_as_alone(mnist_root,
                                                                                                  tmp_path):
    import signal
    import socket

    args = lambda d: mnist_args(mnist_root, tmp_path / d, "--epochs", "2")  # noqa: E731
    run = tmp_path / "shared"
    first = start_training(args("shared"))
    wait_for_holder(run, first)
    os.kill(first.pid, signal.SIGSTOP)  # frozen while holding the lock: nothing in the folder changes meanwhile
    try:
        before = snapshot(run)
        t0 = time.perf_counter()
        second = subprocess.run([sys.executable, str(HERE / "train_ex.py"), *args("shared")],
                                env={**os.environ, **SUBPROCESS_ENV}, capture_output=True, text=True, timeout=120)
        took = time.perf_counter() - t0
        after = snapshot(run)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == utils.LOCKED == 6, second.stderr[-2000:]
    assert f"pid {first.pid} on host {socket.gethostname()}, started " in second.stderr, second.stderr
    assert "in use" in second.stderr and "Traceback" not in second.stderr
    assert took < 30, took  # at once: the process's start-up, no data read, nothing compiled
    assert after == before
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]

    assert train_ex.main(args("alone")) == 0  # the same run with the directory to itself
    shared, alone = results(run), results(tmp_path / "alone")
    assert shared["status"] == alone["status"] == "finished" and len(shared["epochs"]) == len(alone["epochs"]) == 2
    for a, b in zip(alone["epochs"], shared["epochs"]):
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


@pytest.mark.slow
def test_kill_9_leaves_no_stale_lock(mnist_root, tmp_path):
    import signal

    run = tmp_path / "r"
    proc = start_training(mnist_args(mnist_root, run, "--epochs", "50"))
    wait_for_holder(run, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert utils.read_lock_holder(run)["pid"] == proc.pid  # its name is still in the file, its lock is not
    t0 = time.perf_counter()
    with utils.RunLock(run):  # at once, without waiting
        assert time.perf_counter() - t0 < 1
    assert train_ex.main(mnist_args(mnist_root, run, "--epochs", "1")) == 0
    assert results(run)["status"] == "finished"


def test_a_held_lock_is_waited_for_up_to_lock_wait(tmp_path):
    """A requeued job whose predecessor still holds the directory: --lock_wait waits for it, then goes on; a
    shorter wait gives up with exit 6 (RunError); the launcher's token makes a held lock the run's own."""
    run = tmp_path / "r"
    run.mkdir()
    hold = ("import fcntl, json, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.truncate(0); f.write(json.dumps(dict(pid=os.getpid(), host='h', token='tok'))); f.flush(); "
            "print('held', flush=True); time.sleep(float(sys.argv[2]))")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run / utils.LOCK_FILE), "3"], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(utils.RunError) as e:
        utils.RunLock(run, wait_s=0.5)
    assert e.value.code == 6 and f"pid {holder.pid} on host h" in str(e.value)
    utils.RunLock(run, token="tok").release()  # held for it by its launcher
    t0 = time.perf_counter()
    with utils.RunLock(run, wait_s=60):
        waited = time.perf_counter() - t0
        assert holder.poll() is not None and utils.read_lock_holder(run)["pid"] == os.getpid()
    assert 0.5 < waited < 30
    assert utils.default_lock_wait({"SLURM_RESTART_COUNT": "1"}) == 300
    assert utils.default_lock_wait({"SLURM_RESTART_COUNT": "0"}) == utils.default_lock_wait({}) == 0


def test_largest_fitting_batch_from_two_estimates():
    line = lambda b: 1000 + 30 * b  # noqa: E731
    assert models.largest_fitting_batch([(400, line(400)), (200, line(200))], 7000, 1) == 200
    assert models.largest_fitting_batch([(400, line(400)), (200, line(200))], 7000, 8) == 200
    assert models.largest_fitting_batch([(400, line(400)), (200, line(200))], 6999, 8) == 192
    assert models.largest_fitting_batch([(400, line(400)), (200, line(200))], 1000, 1) is None  # no batch fits
    assert models.largest_fitting_batch([(400, 5000), (200, 5000)], 7000, 1) is None  # no slope


@pytest.mark.slow
def test_a_model_that_cannot_fit_exits_5_before_the_first_step_with_a_batch_size_that_fits(mnist_root, tmp_path):
    import re

    import config
    import dataloaders

    run = tmp_path / "big"
    model = ["--d_model", "512", "--ssm_size_base", "512", "--n_layers", "1"]
    argv = ["--dataset", "mnist-classification", "--dir_name", str(mnist_root), "--run_dir", str(run),
            "--max_train_samples", "2000", "--max_eval_samples", "16", "--bsz", "2000", *model]  # ~50 GB a step
    r = subprocess.run([sys.executable, str(HERE / "train_ex.py"), *argv], env={**os.environ, **SUBPROCESS_ENV},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == utils.DOES_NOT_FIT == 5, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "does not fit" in r.stderr
    m = re.search(r"XLA estimates ([\d.]+) GB per device for one training step at --bsz 2000 .* has ([\d.]+) GB "
                  r"free\. Nothing was trained; the largest --bsz that fits is about (\d+)", r.stderr)
    assert m, r.stderr
    estimate, free, best = float(m.group(1)), float(m.group(2)), int(m.group(3))
    assert estimate > free and 0 < best < 2000
    assert sorted(p.name for p in run.iterdir()) == [utils.LOCK_FILE]  # no step, no checkpoint, no results
    # the suggestion against XLA's estimate, compiled here on its own: it fits, and twice that batch does not
    cfg = config.parse_args(argv)
    meta = dataloaders.model_meta("mnist-classification")
    assert models.step_memory(cfg, meta, best)["total"] / 1e9 <= free + 0.01
    assert models.step_memory(cfg, meta, 2 * best)["total"] / 1e9 > free


NO_MAIN_GUARD = '''
import hashlib, sys
sys.path.insert(0, {here!r})
import dataloaders

ds = dataloaders.load("pathfinder-classification", {root!r}, workers=2)  # at the top level: no main guard
print("loaded", len(ds.train), hashlib.sha256(ds.train.inputs.tobytes() + ds.train.labels.tobytes()).hexdigest())
'''


def test_a_script_without_main_guard_loading_with_workers_ends_with_the_data_and_says_what_to_add(tmp_path):
    import hashlib

    import dataloaders
    from test_data import make_pathfinder

    for copy in ("a", "b"):  # the same images twice: the script's and the reference's (no shared cache)
        make_pathfinder(tmp_path / copy, n_per_file=10, n_files=3, empty=())
    script = tmp_path / "notebook_style.py"
    script.write_text(NO_MAIN_GUARD.format(here=str(HERE), root=str(tmp_path / "a")))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(script)], env={**os.environ, **SUBPROCESS_ENV}, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert time.perf_counter() - t0 < 60
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'if __name__ == "__main__":' in r.stderr and str(script) in r.stderr
    ref = dataloaders.load("pathfinder-classification", tmp_path / "b", workers=1).train  # in-process
    digest = hashlib.sha256(ref.inputs.tobytes() + ref.labels.tobytes()).hexdigest()
    assert f"loaded {len(ref)} {digest}" in r.stdout, r.stdout
