"""Training runs as a cluster sees them, each in subprocesses: a few steps of every ssm_type under a time
limit (no hang), SIGTERM and kill -9 with exact resume, 1 vs 2 devices, 2 processes × 2 devices vs 1 × 4."""

import json
import os
import subprocess
import sys

import pytest

import dataloaders
import train_ex
import utils
from test_train import EVERY_TYPE, HERE, SUBPROCESS_ENV, TINY, mnist_args, results

pytestmark = pytest.mark.xdist_group("cluster")  # its module fixtures are built once, on one worker


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="forced host devices")
def test_one_and_two_devices_give_the_same_losses(mnist_root, tmp_path):
    def run(n, d):
        env = {**os.environ, **SUBPROCESS_ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        r = subprocess.run([sys.executable, str(HERE / "train_ex.py"),
                            *mnist_args(mnist_root, tmp_path / d, "--epochs", "2")], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return results(tmp_path / d)

    one, two = run(1, "one"), run(2, "two")
    assert two["device"].startswith("2×") and one["device"].startswith("1×")
    for a, b in zip(one["epochs"], two["epochs"]):
        for k in ("train_loss", "val_loss", "test_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), k



@pytest.mark.slow
def test_real_training_steps_of_every_type_finish(mnist_root, tmp_path):
    """A few real training steps and an evaluation of every ssm_type, in one subprocess with a time limit: a
    hang fails here, naming the type, in minutes rather than in CI's time limit."""
    runs = [(v[1] + ("-" + v[3] if len(v) > 2 else ""),
             mnist_args(mnist_root, tmp_path / f"r{i}", "--epochs", "1", "--max_train_samples", "24", *v,
                       *(["--R", "2"] if "extend" in v else [])))
            for i, v in enumerate(EVERY_TYPE)]
    driver = ("import json, sys, train_ex\n"
              "for name, argv in json.loads(sys.argv[1]):\n"
              "    print('start', name, flush=True)\n"
              "    print('exit', name, train_ex.main(argv), flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", driver, json.dumps(runs)], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **SUBPROCESS_ENV})
    try:
        out = proc.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
        started = [line.split()[1] for line in out.splitlines() if line.startswith("start ")]
        pytest.fail(f"{started[-1] if started else 'the first type'}: a few training steps and an evaluation did "
                    f"not finish (a hang); output:\n{out[-1500:]}")
    assert proc.returncode == 0, out[-2000:]
    exits = {line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith("exit ")}
    assert exits == {name: "0" for name, _ in runs}, out[-2000:]
    for i in range(len(runs)):
        assert results(tmp_path / f"r{i}")["status"] == "finished"


# --------------------------------------------------------------------------------------------------
# Surviving a cluster: SIGTERM, kill -9 after a mid-epoch checkpoint, several processes
# --------------------------------------------------------------------------------------------------


def cluster_args(root, run_dir, *extra):
    """Real MNIST, 7×7 pixels, a tiny model: 1,125 steps an epoch, a few seconds each epoch."""
    return ["--dataset", "mnist-classification", "--dir_name", str(root), "--downsample", "4", "--run_dir",
            str(run_dir), "--max_eval_samples", "64", "--warmup_end", "0", "--epochs", "2", *TINY, *extra]


def start_training(argv, **env):
    return subprocess.Popen([sys.executable, str(HERE / "train_ex.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **SUBPROCESS_ENV, **env})


def wait_for(proc, text, timeout=120):
    """Read the process's output until `text` appears; return everything read."""
    import select
    import time

    seen, end = "", time.monotonic() + timeout
    while text not in seen:
        assert proc.poll() is None, f"the run ended before {text!r}:\n{seen[-2000:]}"
        assert time.monotonic() < end, f"no {text!r} within {timeout} s:\n{seen[-2000:]}"
        if select.select([proc.stdout], [], [], 1.0)[0]:
            seen += os.read(proc.stdout.fileno(), 65536).decode(errors="replace")
    return seen


def assert_same_epochs(a, b):
    assert len(a["epochs"]) == len(b["epochs"]) == 2
    for x, y in zip(a["epochs"], b["epochs"]):
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), k


@pytest.fixture(scope="module")
def uninterrupted(mnist_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("full") / "run"
    assert train_ex.main(cluster_args(mnist_root, d)) == 0
    return results(d)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_resume_matches(mnist_root, tmp_path, uninterrupted):
    import signal

    d = tmp_path / "run"
    proc = start_training(cluster_args(mnist_root, d, "--log_every", "1"))
    wait_for(proc, "epoch 2/2")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, out[-2000:]
    assert "stopped by SIGTERM" in out and "--resume" in out
    saved = json.loads((d / "ckpt_latest.json").read_text())["progress"]
    assert saved["epoch"] == 1 and 0 < saved["batch"] < 1125, saved  # inside epoch 2, not at its start
    assert results(d)["status"] == "interrupted"
    assert train_ex.main(cluster_args(mnist_root, d, "--resume")) == 0
    assert results(d)["status"] == "finished"
    assert_same_epochs(results(d), uninterrupted)


@pytest.mark.slow
def test_kill_9_after_a_mid_epoch_checkpoint_loses_little(mnist_root, tmp_path, uninterrupted):
    import time

    d = tmp_path / "run"
    proc = start_training(cluster_args(mnist_root, d, "--ckpt_every_min", "0.002"))  # about every 0.1 s
    wait_for(proc, "epoch 2/2")
    end = time.monotonic() + 60
    while True:  # a checkpoint written inside epoch 2
        saved = json.loads((d / "ckpt_latest.json").read_text())["progress"]
        if saved["epoch"] == 1 and saved["batch"] > 0:
            break
        assert time.monotonic() < end and proc.poll() is None, "no mid-epoch checkpoint"
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=30)
    saved = json.loads((d / "ckpt_latest.json").read_text())["progress"]
    assert saved["epoch"] == 1 and 0 < saved["batch"] < 1125
    assert train_ex.main(cluster_args(mnist_root, d, "--resume")) == 0
    assert_same_epochs(results(d), uninterrupted)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(argvs, n_devices, timeout=120):
    procs = [start_training(a, JAX_NUM_CPU_DEVICES=str(n_devices)) for a in argvs]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="local CPU processes with gloo collectives")
def test_two_processes_equal_one_process_and_stop_together(mnist_root, tmp_path):
    import re
    import signal

    dataloaders.load("mnist-classification", mnist_root, downsample=4)  # the cache, before any process reads it
    small = ["--max_train_samples", "256", "--bsz", "16", "--log_every", "2", "--epochs", "1"]
    multi = lambda d, i, port, *x: [*cluster_args(mnist_root, d, *small, *x), "--distributed",  # noqa: E731
                                    "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
                                    "--process_id", str(i)]
    port = free_port()
    two_procs = [start_training(multi(tmp_path / "two", i, port), JAX_NUM_CPU_DEVICES="2") for i in range(2)]
    codes, outs1 = run_processes([cluster_args(mnist_root, tmp_path / "one", *small)], 4)
    outs = [p.communicate(timeout=120)[0] for p in two_procs]
    assert [p.returncode for p in two_procs] == [0, 0], outs[0][-1500:] + outs[1][-1500:]
    assert codes == [0], outs1[0][-1500:]
    two, one = results(tmp_path / "two"), results(tmp_path / "one")
    assert two["device"] == "4× cpu on 2 processes" and one["device"] == "4× cpu"
    assert len(two["epochs"]) == len(one["epochs"]) == 1
    for a, b in zip(two["epochs"], one["epochs"]):
        for k in ("train_loss", "val_loss", "test_loss", "train_acc", "val_acc"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == ["ckpt_best.json", "ckpt_best.msgpack", "ckpt_latest.json", "ckpt_latest.msgpack",
                     "results.json", "run.lock"], files  # one set, from process 0 only (it alone holds the lock)
    assert utils.read_lock_holder(tmp_path / "two")["pid"] == two_procs[0].pid
    assert "epoch   1 |" in outs[0] and "epoch   1 |" not in outs[1]  # the console summary: process 0
    # SIGTERM to process 1 alone, once it is training: both stop at the same step, and process 0 saves it
    port = free_port()
    argvs = [multi(tmp_path / "cut", i, port, "--max_train_samples", "8000", "--log_every", "1") for i in range(2)]
    procs = [start_training(a, JAX_NUM_CPU_DEVICES="2") for a in argvs]
    wait_for(procs[1], "process 1 of 2: 2 local device(s), training")
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], outs[0][-1500:] + outs[1][-1500:]
    steps = [int(re.search(r"process \d: stopped by SIGTERM .*\(step (\d+)\)", o).group(1)) for o in outs]
    assert steps[0] == steps[1] > 0
    assert json.loads((tmp_path / "cut" / "ckpt_latest.json").read_text())["progress"]["step"] == steps[0]


# --------------------------------------------------------------------------------------------------
# SLURM's environment and wandb, in this process
# --------------------------------------------------------------------------------------------------


def test_distributed_in_a_partly_set_slurm_environment_exits_2(mnist_root, tmp_path, monkeypatch, capsys):
    """A shell of an allocation outside srun (e.g. ssh into one of its nodes): SLURM_JOB_ID and SLURM_NTASKS are
    set, the step's own variables are not. --distributed stops with exit 2, saying which are missing and to start
    the processes with srun (or give the coordinator), before the run directory or jax.distributed is touched."""
    import jax

    import utils

    for var in utils.SLURM_STEP_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    run_dir = tmp_path / "run"
    before = jax.config.jax_cpu_collectives_implementation
    try:
        code = train_ex.main(mnist_args(mnist_root, run_dir, "--distributed"))
    finally:
        jax.config.update("jax_cpu_collectives_implementation", before)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "SLURM_JOB_ID=4242" in err and "no SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID)" in err, err
    assert "srun -n 2 python train_ex.py --distributed" in err and "--coordinator" in err, err
    assert not run_dir.exists()
    # outside SLURM, or inside an srun step, there is nothing to say
    assert utils.slurm_env_problem({}) is None
    assert utils.slurm_env_problem({"SLURM_JOB_ID": "1", **{v: "0" for v in utils.SLURM_STEP_VARS}}) is None


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run(mnist_root, tmp_path, monkeypatch):
    """The wandb id is drawn once, kept in the run directory, and given to wandb.init again on --resume (with
    resume="allow"), so a requeued run logs into the same wandb run; another run directory gets another id."""
    import re

    import wandb

    import utils

    class Run:
        def log(self, data, step=None):
            pass

        def finish(self):
            pass

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or Run())
    monkeypatch.setenv("WANDB_MODE", "offline")
    d = tmp_path / "run"
    assert train_ex.main(mnist_args(mnist_root, d, "--epochs", "1")) == 0
    first = (d / utils.WANDB_ID_FILE).read_text().strip()
    assert re.fullmatch(r"[a-z0-9]{8,}", first), first
    assert train_ex.main(["--resume", "--run_dir", str(d), "--epochs", "2"]) == 0
    assert results(d)["status"] == "finished" and len(results(d)["epochs"]) == 2
    assert (d / utils.WANDB_ID_FILE).read_text().strip() == first
    assert [(c["id"], c["resume"], c["mode"], c["dir"]) for c in calls] == [(first, "allow", "offline", str(d))] * 2
    other = train_ex.start_wandb(train_ex.parse_args(mnist_args(mnist_root, tmp_path / "other")), {},
                                 tmp_path / "other")
    assert isinstance(other, Run) and calls[-1]["id"] != first
    assert (tmp_path / "other" / utils.WANDB_ID_FILE).read_text().strip() == calls[-1]["id"]
