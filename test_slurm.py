"""run_train_ex.sh on a real one-node SLURM (Debian's slurm-wlm and munge): munged, slurmctld and slurmd started
for the session with a small slurm.conf in a temporary directory, stopped by their PIDs afterwards. Where SLURM
is not installed (or cannot start) the tests are skipped with the reason.

SLURM delays a requeued job's next start by 120 s; the fixture starts such tasks after 2 s instead
(`scontrol update JobId=... StartTime=now`), as an administrator could, so that requeues take seconds."""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_series import SCRIPT, run_series, series_env
from test_train import HERE

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]  # one SLURM cluster, one worker


def _which(name):
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)),
                                      None)


def free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


class Slurm:
    def __init__(self, root: Path):
        self.root, self.env, self.pids = root, {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}, []
        self._stop = threading.Event()

    def run(self, *argv, check=True):
        r = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr}")
        return r.stdout

    def start(self):
        host, cpus = socket.gethostname().split(".")[0], os.cpu_count()
        for d in ("state", "spool"):
            (self.root / d).mkdir()
        (self.root / "slurm.conf").write_text("\n".join([
            "ClusterName=tests", f"SlurmctldHost={host}", "SlurmUser=root", "AuthType=auth/munge",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",  # beside any other SLURM here
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2", "MinJobAge=30", "JobRequeue=1",
            "KillWait=30", f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log", f"SlurmdLogFile={self.root}/slurmd.log",
            f"NodeName={host} CPUs={cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode:  # munged as user munge
            Path("/run/munge").mkdir(exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", _which("munged")], check=True, timeout=30)
            self.pids.append(int(Path("/run/munge/munged.pid").read_text()))
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([_which(daemon)], env=self.env, check=True, timeout=30)
            _wait(lambda d=daemon: (self.root / f"{d}.pid").exists(), 30, f"{daemon} did not start")
            self.pids.append(int((self.root / f"{daemon}.pid").read_text()))
        _wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%t", check=False), 60,
              f"the node is not idle:\n{self.run('sinfo', check=False)}")
        threading.Thread(target=self._release_requeued, daemon=True).start()

    def _release_requeued(self):
        """Requeued tasks wait 120 s for their BeginTime: start them 2 s after they are seen waiting. (Not in the
        same second as the requeue: slurmd would refuse the new start's credential as revoked, and the task would
        end FAILED.)"""
        seen = {}
        while not self._stop.wait(1.0):
            out = self.run("squeue", "-h", "-r", "-t", "PD", "-o", "%i %r", check=False)
            waiting = {job for job, reason in (((ln.split() + [""])[:2]) for ln in out.splitlines())
                       if reason == "BeginTime"}
            seen = {job: seen.get(job, time.monotonic()) for job in waiting}
            for job, since in seen.items():
                if time.monotonic() - since >= 2:
                    self.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)

    def queue(self):
        return self.run("squeue", "-h", "-r", "-o", "%i %T", check=False).split()

    def stop(self):
        self._stop.set()
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    missing = [b for b in SLURM_BINARIES if _which(b) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a local SLURM needs root (slurmd, munged as user munge)")
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as e:
        cluster.stop()
        log = "".join((cluster.root / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log")
                      if (cluster.root / f).exists())
        pytest.skip(f"a local SLURM did not start: {e}\n{log}")
    yield cluster
    cluster.stop()


def results(root, rid):
    return json.loads((root / rid / "results.json").read_text())


def same_epochs(a, b, keys=("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")):
    assert len(a["epochs"]) == len(b["epochs"])
    for x, y in zip(a["epochs"], b["epochs"]):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), k


WARM = ["g6-warm-start/s5-base/seed0", "g6-warm-start/extend-warm/seed0"]


def test_slurm_series_equals_the_local_series(slurm, tmp_path):
    """Group 6 (an S5 run, then the extension warm-started from it) as one array and a second array after it
    (aftercorr), with a summary job: the same per-run results as the local serial series."""
    local = series_env(tmp_path / "local", RUN_GROUPS="6")
    r, out = run_series(local)
    assert r.returncode == 0, out
    env = {**series_env(tmp_path / "slurm", RUN_GROUPS="6", LAUNCHER="slurm", WAIT="1", SLURM_POLL_SECS="1"),
           **{"SLURM_CONF": slurm.env["SLURM_CONF"]}}
    r, out = run_series(env, timeout=300)
    assert r.returncode == 0, out
    assert "submitted: job array" in out and "warm-start array" in out and "squeue -j" in out
    plan = (tmp_path / "slurm" / "slurm" / "plan.tsv").read_text().splitlines()
    assert [ln.split("\t")[:3] for ln in plan] == [["main", "0", WARM[0]], ["warm", "0", WARM[1]]]
    assert "# Series summary" in out
    for rid in WARM:
        a, b = results(tmp_path / "local", rid), results(tmp_path / "slurm", rid)
        assert a["status"] == b["status"] == "finished", rid
        same_epochs(a, b)
    # a second submission: nothing left to run, nothing submitted
    r, out = run_series(env, timeout=120)
    assert r.returncode == 0 and "nothing to submit" in out and "submitted" not in out, out


def test_requeued_task_resumes_from_its_checkpoint(slurm, tmp_path, mnist_root):
    """`scontrol requeue` in the middle of a run: the task saves ckpt_latest, starts again with --resume, and
    its epochs equal an uninterrupted run's."""
    extra = ("--dataset mnist-classification --downsample 4 --max_train_samples 4000 --max_eval_samples 64 "
             "--warmup_end 0 --p_dropout 0 --log_every 1 --ckpt_every_min 0")
    kw = dict(RUN_GROUPS="1", ONLY="g1-aux/aux-off/*", EPOCHS="3", DATA=str(mnist_root), EXTRA=extra)
    rid = "g1-aux/aux-off/seed0"
    r, out = run_series(series_env(tmp_path / "local", **kw), timeout=300)
    assert r.returncode == 0, out
    env = {**series_env(tmp_path / "slurm", LAUNCHER="slurm", **kw), "SLURM_CONF": slurm.env["SLURM_CONF"]}
    r, out = run_series(env, timeout=120)
    assert r.returncode == 0, out
    job = out.split("submitted: job array ")[1].split()[0]
    log = tmp_path / "slurm" / rid / "train.log"
    _wait(lambda: log.exists() and "epoch   1 |" in log.read_text(), 240, "the run did not finish epoch 1")
    slurm.run("scontrol", "requeue", f"{job}_0")
    done = tmp_path / "slurm" / "slurm" / "summary.done"
    _wait(done.exists, 300, f"the series did not end:\n{log.read_text()[-2000:]}")
    text = log.read_text()
    assert "stopped by SIGTERM" in text and "attempt (resume)" in text, text[-2000:]
    res = results(tmp_path / "slurm", rid)
    assert res["status"] == "finished"
    same_epochs(res, results(tmp_path / "local", rid))


def test_slurm_without_sbatch_or_with_bad_args_exits_2_and_submits_nothing(slurm, tmp_path):
    env = {**series_env(tmp_path / "a", RUN_GROUPS="1", LAUNCHER="slurm"), "SLURM_CONF": slurm.env["SLURM_CONF"]}
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("bash", "python3", "env", "dirname", "tr", "sed", "head", "tail", "mkdir", "basename"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), bare / tool)
    r = subprocess.run([shutil.which("bash"), str(SCRIPT)], env={**env, "PATH": str(bare)}, capture_output=True,
                       text=True, timeout=60, cwd=HERE)
    assert r.returncode == 2 and "no sbatch on PATH" in r.stderr, r.stdout + r.stderr
    before = slurm.queue()
    r, out = run_series({**env, "SLURM_ARGS": "--partition=no_such_partition"}, timeout=120)
    assert r.returncode == 2 and "sbatch refused" in out and "invalid partition" in out.lower(), out
    assert slurm.queue() == before


def test_a_run_over_its_time_limit_finishes_after_requeues(slurm, tmp_path, mnist_root):
    """`--time=1` for a run that needs about 2 minutes: SLURM's USR1 (SIGNAL_SECS before the limit; SLURM sends it
    up to 30 s earlier still) reaches the run through its task, which saves ckpt_latest and requeues itself; each
    start continues where the one before stopped, and the run finishes with every epoch once.

    The run's length is set from this machine's speed, measured first by the same run locally for 3 epochs: a fixed
    epoch count that needs 2 minutes on one machine finishes before the limit's warning on a faster one."""
    extra = ("--dataset mnist-classification --downsample 4 --max_train_samples 10000 --max_eval_samples 64 "
             "--warmup_end 0 --p_dropout 0 --ckpt_every_min 0")
    calib = tmp_path / "calibration"
    r, out = run_series(series_env(calib, RUN_GROUPS="1", ONLY="g1-aux/aux-off/*", EPOCHS=3, DATA=mnist_root,
                                   EXTRA=extra), timeout=300)
    assert r.returncode == 0, out
    epoch_s = min(e["seconds"] for e in results(calib, "g1-aux/aux-off/seed0")["epochs"][1:])  # compiled already
    epochs = max(20, min(600, round(80 / epoch_s)))  # about 80 s of training: well past the warning (at most 55 s in)
    env = {**series_env(tmp_path / "series", RUN_GROUPS="1", ONLY="g1-aux/aux-off/*", EPOCHS=epochs, DATA=mnist_root,
                        EXTRA=extra, LAUNCHER="slurm", SLURM_ARGS="--time=1", SIGNAL_SECS="5", MAX_REQUEUES="10",
                        WAIT="1", SLURM_POLL_SECS="2"),
           "SLURM_CONF": slurm.env["SLURM_CONF"]}
    r, out = run_series(env, timeout=900)
    rid, root = "g1-aux/aux-off/seed0", tmp_path / "series"
    text = (root / rid / "train.log").read_text()
    job = out.split("submitted: job array ")[1].split()[0]
    task_log = (root / "slurm" / f"{job}_0.out").read_text()
    assert r.returncode == 0, out + text[-2000:]
    res = results(root, rid)
    assert res["status"] == "finished", task_log[-2000:] + text[-2000:]
    assert [e["epoch"] for e in res["epochs"]] == list(range(1, epochs + 1))
    attempts = [ln for ln in text.splitlines() if ln.startswith("=== ")]
    assert len(attempts) >= 2 and "attempt (fresh)" in attempts[0], attempts
    assert all("attempt (resume)" in a for a in attempts[1:]), attempts
    stops = re.findall(r"stopped by SIGTERM at epoch (\d+), batch (\d+)", text)
    resumes = re.findall(r"resuming \S+ at epoch (\d+), batch (\d+)", text)
    assert len(stops) == len(resumes) == len(attempts) - 1 and resumes == stops, (stops, resumes)
    for k in range(1, len(attempts)):
        assert f"[slurm {job}_0, start {k + 1}]" in task_log and f"requeueing {job}_0 ({k} of at most 10)" in task_log
    meta = json.loads((root / rid / "series_run.json").read_text())
    assert meta["status"] == "finished" and meta["exit_code"] == 0


def test_two_processes_by_srun_give_the_losses_of_one(slurm, tmp_path, mnist_root):
    """TASKS_PER_RUN=2: the task runs `srun -n 2 python train_ex.py --distributed ...`, whose processes find each
    other from SLURM's environment (one CPU device each). After its first epoch SLURM's warning before the time
    limit (USR1 to the batch shell alone, as `--signal=B:USR1@...` sends it) reaches both processes through srun:
    they save ckpt_latest and stop, the task requeues itself once, and the next start resumes and finishes. Its
    epochs equal one process's on two devices."""
    extra = ("--dataset mnist-classification --downsample 4 --max_train_samples 256 --max_eval_samples 64 "
             "--warmup_end 0 --p_dropout 0 --ckpt_every_min 0 --log_every 4")  # processes agree on a stop every 4 steps
    epochs = 4  # 32 steps an epoch: the later epochs leave the warning a few seconds to arrive
    kw = dict(RUN_GROUPS="1", ONLY="g1-aux/aux-off/*", EPOCHS=epochs, DATA=mnist_root, EXTRA=extra)
    rid = "g1-aux/aux-off/seed0"
    r, out = run_series(series_env(tmp_path / "local", JAX_NUM_CPU_DEVICES="2", **kw))
    assert r.returncode == 0, out
    env = {**series_env(tmp_path / "slurm", LAUNCHER="slurm", TASKS_PER_RUN="2", JAX_NUM_CPU_DEVICES="1", **kw),
           "SLURM_CONF": slurm.env["SLURM_CONF"]}
    r, out = run_series(env, timeout=120)
    assert r.returncode == 0, out
    job = out.split("submitted: job array ")[1].split()[0]
    log, done = tmp_path / "slurm" / rid / "train.log", tmp_path / "slurm" / "slurm" / "summary.done"

    def log_text():  # srun interleaves the processes' stdout and stderr, at times inside a character
        return log.read_bytes().decode(errors="replace") if log.exists() else ""

    try:
        _wait(lambda: "epoch   1 |" in log_text(), 240, "the run did not finish epoch 1")
        slurm.run("scancel", "--signal=USR1", "--batch", f"{job}_0")
        _wait(done.exists, 300, f"the series did not end:\n{log_text()[-2000:]}")
    finally:
        slurm.run("scancel", job, check=False)
    text, task_log = log_text(), (tmp_path / "slurm" / "slurm" / f"{job}_0.out").read_text()
    attempts = [ln for ln in text.splitlines() if ln.startswith("=== ")]
    assert len(attempts) == 2, text[-3000:] + task_log[-2000:]
    assert "attempt (fresh): srun -n 2 " in attempts[0] and "--distributed" in attempts[0], attempts
    assert "attempt (resume): srun -n 2 " in attempts[1] and attempts[1].endswith(" --resume"), attempts
    stops = {i: re.findall(rf"process {i}: stopped by SIGUSR1 at epoch (\d+), batch (\d+)", text) for i in (0, 1)}
    resumes = re.findall(r"resuming \S+ at epoch (\d+), batch (\d+)", text)
    assert len(resumes) == 1 and stops[0] == stops[1] == resumes, (stops, resumes, text[-3000:])
    assert int(resumes[0][0]) > 1, resumes  # the warning came after epoch 1
    assert f"[slurm {job}_0, start 2]" in task_log and f"requeueing {job}_0 (1 of at most" in task_log, task_log
    assert f"[slurm {job}_0, start 3]" not in task_log, task_log
    one, two = results(tmp_path / "local", rid), results(tmp_path / "slurm", rid)
    assert one["device"] == "2× cpu" and two["device"] == "2× cpu on 2 processes", (one["device"], two["device"])
    assert one["status"] == two["status"] == "finished"
    assert [e["epoch"] for e in two["epochs"]] == list(range(1, epochs + 1))
    same_epochs(one, two)


def test_a_rerun_does_not_submit_again_the_runs_still_in_slurm(slurm, tmp_path):
    """A series submitted held (pending), then the command again: the pending run is not submitted twice, the
    others are; once released, the pending task still runs its own submission's run."""
    from test_series import calls_of, fake_env

    env, calls = fake_env(tmp_path, RUN_GROUPS="1", LAUNCHER="slurm")
    env["SLURM_CONF"] = slurm.env["SLURM_CONF"]
    out_root = tmp_path / "out"
    r, out = run_series({**env, "ONLY": "g1-aux/aux-off/*", "SLURM_ARGS": "--hold"}, timeout=120)
    assert r.returncode == 0, out
    held, held_summary = out.split("submitted: job array ")[1].split()[0], out.split("summary job ")[1].split()[0]
    try:
        r, out = run_series({**env, "WAIT": "1", "SLURM_POLL_SECS": "1"}, timeout=180)
        assert r.returncode == 0, out
        assert f"g1-aux/aux-off/seed0: still in SLURM (task {held}_0, PENDING), not submitted again" in out, out
        assert [ln.split("\t")[:3] for ln in (out_root / "slurm" / "plan.tsv").read_text().splitlines()] == \
            [["main", "0", "g1-aux/aux-on/seed0"]]
        assert list(calls_of(calls)) == [str(out_root / "g1-aux/aux-on/seed0")]
        r, out = run_series(env, timeout=120)
        assert r.returncode == 0 and "nothing to submit" in out and "submitted:" not in out, out
        slurm.run("scontrol", "release", held, held_summary)
        done = out_root / "g1-aux/aux-off/seed0/results.json"
        _wait(lambda: done.exists() and held not in " ".join(slurm.queue()), 120, "the released task did not run")
        assert sorted(calls_of(calls)) == [str(out_root / f"g1-aux/aux-{s}/seed0") for s in ("off", "on")]
        assert json.loads(done.read_text())["status"] == "finished"
    finally:
        slurm.run("scancel", held, held_summary, check=False)


FAKE_TRAINER = '''import json, os, signal, sys, time
from pathlib import Path
log, run = Path(sys.argv[1]), Path(sys.argv[sys.argv.index("--run_dir") + 1])
with log.open("a") as f:
    f.write(json.dumps({"argv": sys.argv[2:], "restart": os.environ.get("SLURM_RESTART_COUNT")}) + "\\n")
if "--resume" in sys.argv:
    assert (run / "ckpt_latest.msgpack").exists(), "--resume without a checkpoint"
    (run / "finished").write_text("")
    sys.exit(0)
stop = []
for s in (signal.SIGTERM, signal.SIGUSR1):  # as train_ex.py: saves ckpt_latest, exits 128 + the signal
    signal.signal(s, lambda n, _: stop.append(n))
(run / "started").write_text("")
end = time.monotonic() + 120
while not stop and time.monotonic() < end:
    time.sleep(0.1)
if stop:
    (run / "ckpt_latest.msgpack").write_text(signal.Signals(stop[0]).name)
    sys.exit(128 + stop[0])
sys.exit(1)
'''


def readme_single_run_recipe():
    text = (HERE / "CLUSTER.md").read_text()
    section = text.split("**Several hosts**", 1)
    blocks = re.findall(r"```bash\n(#!/usr/bin/env bash\n#SBATCH --nodes=2 .*?)```", section[-1], re.S)
    assert len(section) == 2 and blocks, "CLUSTER.md: no SLURM batch script under '**Several hosts**'"
    return blocks[0]


def test_readme_single_run_recipe_requeues_and_resumes(slurm, tmp_path):
    """CLUSTER.md's batch script for one run, on one node with a stand-in trainer: SLURM's warning before the time
    limit (USR1 to the batch shell alone, as `--signal=B:USR1@...` sends it) reaches the trainer through srun, the
    trainer saves ckpt_latest and stops, the script requeues the job, and the next start resumes and finishes."""
    recipe = readme_single_run_recipe()
    run, log, trainer = tmp_path / "run", tmp_path / "starts.jsonl", tmp_path / "fake_train.py"
    run.mkdir()
    trainer.write_text(FAKE_TRAINER)
    script = recipe
    for old, new in [("#SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --time=24:00:00",
                      "#SBATCH --nodes=1 --ntasks-per-node=1 --time=5"),
                     ("RUN=runs/pathx-s5", f"RUN={run}"),
                     ("python train_ex.py", f"{sys.executable} {trainer} {log}"),
                     (" ... &", " &")]:
        assert old in script, f"CLUSTER.md's batch script no longer has {old!r}"
        script = script.replace(old, new)
    (tmp_path / "job.sh").write_text(script)
    job = slurm.run("sbatch", "--parsable", f"--output={tmp_path}/job.out", str(tmp_path / "job.sh")).strip()

    def state():
        return slurm.run("scontrol", "show", "job", job, check=False)

    def starts():
        return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []

    def output():
        out = tmp_path / "job.out"
        return f"{state()}\n{out.read_text() if out.exists() else ''}\nstarts: {starts()}"

    try:
        _wait((run / "started").exists, 30, f"the trainer did not start:\n{output()}")
        slurm.run("scancel", "--signal=USR1", "--batch", job)
        _wait((run / "finished").exists, 40, f"the run was not resumed to its end:\n{output()}")
        _wait(lambda: "JobState=COMPLETED" in state(), 20, f"the job did not end COMPLETED:\n{output()}")
    finally:
        slurm.run("scancel", job, check=False)
    assert "Restarts=1 " in state(), output()
    assert [(s["argv"], s["restart"]) for s in starts()] == [
        (["--distributed", "--run_dir", str(run)], None),
        (["--distributed", "--run_dir", str(run), "--resume"], "1")], output()


def test_the_gpu_study_plan_runs_at_a_tiny_size(slurm, tmp_path):
    """STUDY=gpu SMOKE=1 on SLURM, one setting of one task: its three tuning runs in the first array, its seed in
    the tuned array after it, which chooses the learning rate on validation as it starts; then the summary."""
    out = tmp_path / "out"
    env = {**series_env(out, STUDY="gpu", LAUNCHER="slurm", WAIT="1", SLURM_POLL_SECS="1", ONLY="varying-gain/s5/*"),
           "SLURM_CONF": slurm.env["SLURM_CONF"]}
    r, text = run_series(env, timeout=400)
    assert r.returncode == 0, text
    assert "tuned array" in text and "# Series summary" in text
    plan = [ln.split("\t") for ln in (out / "slurm" / "plan.tsv").read_text().splitlines()]
    assert [(a, rid) for a, _, rid, *_ in plan] == [("main", "varying-gain/s5/lr=3e-4/seed9"),
                                                    ("main", "varying-gain/s5/lr=1e-3/seed9"),
                                                    ("main", "varying-gain/s5/lr=3e-3/seed9"),
                                                    ("tuned", "varying-gain/s5/seed0")]
    argv = shlex.split(plan[0][-1])  # the plan's smoke sizes (the task's words are printf %q-quoted)
    last = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}  # the last of a flag wins
    assert last["--data_options"].startswith("length=16,") and last["--d_model"] == "8"
    meta = json.loads((out / "varying-gain/s5/seed0/series_run.json").read_text())
    assert meta["status"] == "finished" and meta["role"] == "tuned"
    assert meta["tuned"]["value"] in ("3e-4", "1e-3", "3e-3") and "validation score by value" in meta["tuned"]["why"]
    assert "| varying-gain | s5 |" in (out / "summary.md").read_text()
