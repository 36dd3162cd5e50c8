"""Run directories: atomic files, checkpoints, results.json's rules, exit codes, the wandb mode.

A run directory (written by train_ex.py, read by sample.py, inspect_run.py, summarize.py and run_train_ex.sh):

    results.json             config, per-epoch history, best epoch, status (see BEST_FIELDS, STATUSES)
    ckpt_latest.msgpack      the whole training state (flax msgpack) at the last save, and
    ckpt_latest.json         its config and progress (epoch, batch within it, step, history, best)
    ckpt_best.msgpack/.json  the same at the epoch of the best validation score
    run.lock                 held (flock) by the one process that writes the directory; it names that process
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

# ---- exit codes: one table for train_ex.py, the series (run_train_ex.sh), its SLURM tasks and summarize.py ----
EXIT_CODES = {
    0: "finished (or stopped resumably by --max_steps)",
    1: "crashed: an unexpected error (traceback in the log)",
    2: "bad input: options, data, checkpoint, run directory or SLURM environment (the message says what to do)",
    3: "non-finite loss: stopped; ckpt_latest holds the last good state",
    4: "could not write the run directory (disk full, quota, permissions): the files written before are intact",
    5: "does not fit: XLA's estimate of a training step exceeds the device's free memory (the message gives both "
       "and the largest --bsz that fits); checked before the first step, nothing trained",
    6: "locked: another process writes the run directory (the message names its host, pid and start time); no "
       "file was touched",
    130: "interrupted by SIGINT (Ctrl-C): ckpt_latest saved, resumable with --resume",
    138: "interrupted by SIGUSR1 (SLURM's warning before a time limit): ckpt_latest saved, resumable with --resume",
    143: "interrupted by SIGTERM (preemption, time limit): ckpt_latest saved, resumable with --resume",
}
# 128 + the signal's number, as a shell reports a killed job
SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGUSR1": 138, "SIGTERM": 143}
DOES_NOT_FIT, LOCKED = 5, 6
INTERRUPTED_CODES = frozenset(SIGNAL_EXIT_CODES.values())  # to be resumed: the series continues them
FINAL_CODES = frozenset(EXIT_CODES) - INTERRUPTED_CODES  # the run is over (finished, or failed for good)


def exit_status(code) -> str | None:
    """What a run's exit code says of its state: 'finished' (0 — results.json tells whether it stopped early),
    'interrupted' (a signal: resumable), 'does not fit' (DOES_NOT_FIT: not a crash), 'locked' (LOCKED: another
    process runs it), 'failed' (anything else), None (no code recorded)."""
    if code is None:
        return None
    if code in (DOES_NOT_FIT, LOCKED):
        return "does not fit" if code == DOES_NOT_FIT else "locked"
    return "finished" if code == 0 else "interrupted" if code in INTERRUPTED_CODES else "failed"


def exit_code_table() -> str:
    """EXIT_CODES as a Markdown table (CLUSTER.md's copy is checked against it)."""
    rows = [f"| {code} | {exit_status(code)} | {text} |" for code, text in sorted(EXIT_CODES.items())]
    return "\n".join(["| exit code | status | meaning |", "|---|---|---|", *rows])


# ---- SLURM ----
SLURM_STEP_VARS = ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def slurm_env_problem(environ=None) -> str | None:
    """Why jax.distributed cannot find its peers in SLURM's environment although a SLURM job is visible (a
    shell of an allocation, e.g. after ssh into one of its nodes or in a batch script outside srun), or None."""
    environ = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in environ:
        return None
    missing = [v for v in SLURM_STEP_VARS if v not in environ]
    if not missing:
        return None
    return (f"--distributed: SLURM's environment is only partly set (SLURM_JOB_ID={environ['SLURM_JOB_ID']}, but no "
            f"{', '.join(missing)}): start every process with srun inside the allocation, e.g. `srun -n 2 python "
            f"train_ex.py --distributed ...`, or give --coordinator, --num_processes and --process_id")


class RunError(Exception):
    """Stops a run with a message for the console and an exit code from EXIT_CODES."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


class WriteError(RunError):
    """A file of the run directory could not be written (exit 4); nothing it replaces was touched."""

    code = 4

    def __init__(self, path, error: OSError):
        super().__init__(f"could not write {path}: {error.strerror or error} (disk full? quota? permissions?); the "
                         f"files written before it are intact, and no temporary file is left", self.code)


class CheckpointError(RunError):
    """A checkpoint that cannot be read back: missing, truncated, damaged (exit 2)."""

    def __init__(self, message):
        super().__init__(message, 2)


# ---- results.json: the best epoch ----
# "best": the epoch with the best validation accuracy (classification) or the lowest validation loss (next-step
# prediction), with its test numbers
BEST_FIELDS = ("epoch", "val_acc", "test_acc", "val_loss", "test_loss", "val_bpd", "test_bpd")


def improves(best: dict | None, row: dict, next_step: bool) -> bool:
    """Whether an epoch's `row` replaces `best` (train_ex.py while training, summarize.py for a results.json without
    `best`): a higher val_acc (the first of equal epochs stays), or for next-step prediction lower validation
    bits/dim (a non-finite best, e.g. a NaN first evaluation, is replaced by any epoch)."""
    if best is None:
        return True
    if next_step:
        old = best.get("val_bpd")
        return old is None or not math.isfinite(old) or row["val_bpd"] < old
    return row["val_acc"] > best["val_acc"]


def selection_score(results: dict):
    """A run's validation score from its results.json, higher is better: the best epoch's val_acc, or minus its
    validation bits/dim for next-step prediction (what `improves` maximises); None when it has none. The one
    number that chooses anything in a series (a tuned value); test figures never do."""
    best = results.get("best") or {}
    if best.get("val_acc") is not None:
        return float(best["val_acc"])
    if best.get("val_bpd") is not None:
        return -float(best["val_bpd"])
    return None


def choose_tuned(root: Path, run_ids: list):
    """(value, note): among the candidate runs of a tuned setting (run ids under root, GROUP/SETTING/FLAG=VALUE/seedK,
    as config.plan_runs names them), the value whose run has the best validation score (selection_score); a failed
    candidate (e.g. a non-finite loss) is out of the choice. (None, why) while a candidate has not ended, or when
    none has a score. Ties go to the first candidate; the note lists every score."""
    best, notes = None, []
    for rid in run_ids:
        try:
            results = read_json(root / rid / "results.json")
        except (OSError, ValueError):
            results = None
        status = (results or {}).get("status", "not started")
        value = rid.rsplit("/", 2)[-2].split("=", 1)[1]
        if status == "failed":
            notes.append(f"{value}: failed")
            continue
        if status != "finished":
            return None, f"its tuning run {rid} is not finished (status: {status})"
        score = selection_score(results)
        notes.append(f"{value}: {score:.4f}" if score is not None else f"{value}: -")
        if score is not None and (best is None or score > best[0]):
            best = (score, value)
    if best is None:
        return None, "no tuning run has a validation score (" + ", ".join(notes) + ")"
    return best[1], "validation score by value: " + ", ".join(notes)


# ---- files ----
def atomic_write(path, data: bytes | str):
    """Write a file so that a reader (or a crash) sees the old file or the new one, never a partial one. A failed
    write (disk full, file-size limit, permissions) raises WriteError and leaves the old file and no temporary."""
    path = Path(path)
    os.replace(_write_temporary(path, data), path)


def _write_temporary(path: Path, data: bytes | str) -> Path:
    """`data` in a hidden temporary beside `path`, flushed to disk. → its path. WriteError (and no temporary left)
    when it cannot be written."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(path, e) from None
    return tmp


def check_writable(folder) -> Path:
    """Create `folder` if needed and prove a file can be written in it; a RunError (exit 2) saying why not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(f"--run_dir {folder} cannot be created or written ({e.strerror or e}): choose a folder you can "
                       f"write to", 2) from None
    return folder


# ---- one writer per run directory ----
LOCK_FILE = "run.lock"
LOCK_TOKEN_VAR = "RUN_LOCK_TOKEN"  # set by a launcher (run_train_ex.sh) that holds the lock for its child
NO_LOCK_SUPPORT = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # flock not supported there


def read_lock_holder(run_dir) -> dict:
    """What the holder of RUN_DIR/run.lock wrote into it (host, pid, started, command), {} when nothing."""
    try:
        info = json.loads((Path(run_dir) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict) -> str:
    if not info:
        return "a process that has not yet written its name into the lock"
    by = f" ({info['by']})" if info.get("by") else ""
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}{by}"
            + (f": {info['command']}" if info.get("command") else ""))


class RunLock:
    """An exclusive flock on RUN_DIR/run.lock, held for the run's whole life. The OS releases it when the process
    ends in any way (kill -9 included), so it never goes stale. Only after taking it does the holder write its
    host, pid and start time into the file; a process that finds it held touches nothing and gets a RunError
    (exit LOCKED) naming the holder.

    `wait_s`: how long to wait for a held lock (a requeued job whose predecessor is still shutting down) before
    giving up. `token`: the value of RUN_LOCK_TOKEN given by a launcher that took the lock for this process
    (run_train_ex.sh): a lock held under that token is this run's own. On a file system without flock support
    (ENOLCK, EOPNOTSUPP) the run goes on unlocked, with a warning."""

    def __init__(self, run_dir, wait_s: float = 0.0, token: str | None = None, say=None):
        self.dir, self.path, self.fd, self.note = Path(run_dir), Path(run_dir) / LOCK_FILE, None, None
        say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # an existing lock file is not changed
        except OSError as e:
            raise RunError(f"--run_dir {self.dir} cannot be created or written ({e.strerror or e}): choose a folder "
                           f"you can write to", 2) from None
        deadline, waiting = time.monotonic() + max(wait_s, 0.0), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno in NO_LOCK_SUPPORT:
                    os.close(fd)
                    self.note = (f"warning: the file system of {self.dir} does not support locks ({e.strerror}): "
                                 f"running without the one-writer guard; make sure no other process uses this "
                                 f"run directory")
                    say(self.note)
                    return
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise RunError(f"cannot lock {self.path}: {e.strerror or e}", 2) from None
            holder = read_lock_holder(self.dir)
            if token and holder.get("token") == token:  # our launcher holds it for us
                os.close(fd)
                self.note = f"{self.path} is held for this run by {describe_holder(holder)}"
                return
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RunError(f"{self.dir} is in use: another process writes it: {describe_holder(holder)}. "
                               f"Nothing was changed. Wait for it to end (or stop it), or choose another --run_dir"
                               + (f" (waited {wait_s:g} s, --lock_wait)" if wait_s > 0 else ""), LOCKED)
            if not waiting:
                say(f"waiting up to {wait_s:g} s (--lock_wait) for {self.dir}, held by {describe_holder(holder)}")
                waiting = True
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.01)))
        self.fd = fd
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "by": "train_ex.py", "command": " ".join(sys.argv)[:300]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass  # the lock holds without its description

    def release(self):
        """Give the lock up (a run ended inside a longer-lived process, e.g. a test calling main twice)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def default_lock_wait(environ=None) -> float:
    """--lock_wait's default: 300 s in a requeued SLURM job (SLURM_RESTART_COUNT > 0), whose predecessor may
    still be saving its checkpoint on another node; 0 otherwise."""
    environ = os.environ if environ is None else environ
    try:
        return 300.0 if int(environ.get("SLURM_RESTART_COUNT") or 0) > 0 else 0.0
    except ValueError:
        return 0.0


# ---- memory: what a device offers ----
def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """The room left under this process's cgroup (v2) memory limit, None when there is no limit."""
    try:
        rel = next(ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().splitlines()
                   if ln.startswith("0::"))
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text())
    except (OSError, ValueError, StopIteration):
        return None


def _address_space_available() -> int | None:
    """The room left under RLIMIT_AS (ulimit -v), None when unlimited."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        vm = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/self/status").read_text().splitlines()
                  if ln.startswith("VmSize:"))
    except (OSError, ValueError, StopIteration):
        vm = 0
    return soft - vm


def device_memory_available(device) -> tuple[int | None, str]:
    """(bytes a new computation can still use on `device`, where the number comes from); (None, why) when the
    device does not say. GPU/TPU: the allocator's limit less what is in use (device.memory_stats()); CPU: the
    machine's MemAvailable, or less under a cgroup limit or RLIMIT_AS."""
    if device.platform == "cpu":
        found = [(v, what) for v, what in ((_meminfo_available(), "MemAvailable of /proc/meminfo"),
                                          (_cgroup_available(), "the cgroup's memory.max less memory.current"),
                                          (_address_space_available(), "RLIMIT_AS (ulimit -v) less VmSize"))
                 if v is not None]
        return min(found) if found else (None, "no /proc/meminfo")
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if not stats or "bytes_limit" not in stats:
        return None, f"{device.device_kind} reports no memory statistics"
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.device_kind}'s free memory"


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def new_run_dir(root="runs", name=None) -> Path:
    """A fresh folder under `root`, named by time (and `name`), never an existing one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / (f"{stamp}-{name}" if name else stamp)
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    path.mkdir(parents=True)
    return path


# ---- checkpoints ----
def checkpoint_path(run_dir, kind: str) -> Path:
    """RUN_DIR/ckpt_<kind>.msgpack (kind: latest, latest.prev or best); its metadata is the same name with .json."""
    return Path(run_dir) / f"ckpt_{kind}.msgpack"


def save_checkpoint(run_dir, kind: str, host_state, config: dict, progress: dict):
    """Write a training state (a tree of host arrays) and its metadata (config, progress, the state's sha256).

    Both files are written in full to temporaries first; only then is ckpt_latest (if that is the kind) moved to
    ckpt_latest.prev and the new files moved into place. So a failed write (WriteError) changes nothing, and a
    crash at any moment leaves a readable checkpoint: the new one, or the one before it."""
    from flax import serialization  # here, not at the top: the series' shell reads run folders through utils quickly

    data = serialization.to_bytes(host_state)
    path = checkpoint_path(run_dir, kind)
    meta_path = path.with_suffix(".json")
    meta = json.dumps({"config": config, "progress": progress, "sha256": hashlib.sha256(data).hexdigest()},
                      indent=2, default=str) + "\n"
    tmp_data = _write_temporary(path, data)
    try:
        tmp_meta = _write_temporary(meta_path, meta)
    except WriteError:
        tmp_data.unlink(missing_ok=True)
        raise
    if kind == "latest" and path.exists():
        prev = checkpoint_path(run_dir, "latest.prev")
        os.replace(path, prev)
        if meta_path.exists():
            os.replace(meta_path, prev.with_suffix(".json"))
    os.replace(tmp_data, path)
    os.replace(tmp_meta, meta_path)


def read_checkpoint(path) -> tuple[dict, dict]:
    """(metadata {config, progress}, the raw state as nested dicts of numpy arrays) of a checkpoint file, verified:
    a CheckpointError says what is wrong (missing metadata, a sha256 that does not match, bytes that do not
    decode). A state whose totals are stored under the key "acc" (run directories of earlier versions) is returned
    with them under "totals"."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    try:
        meta = read_json(meta_path)
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise CheckpointError(f"{e.filename} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path} cannot be read ({e})") from None
    if meta.get("sha256") not in (None, hashlib.sha256(data).hexdigest()):
        raise CheckpointError(f"{path} is damaged: its contents do not match the sha256 in {meta_path.name} "
                              f"({len(data):,} bytes)")
    try:
        from flax import serialization

        raw = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several types for truncated or foreign bytes
        raise CheckpointError(f"{path} is damaged: it does not decode ({e})") from None
    if "acc" in raw and "totals" not in raw:
        raw["totals"] = raw.pop("acc")
    return meta, raw


def newest_checkpoint(run_dir, kinds=("latest", "latest.prev", "best")):
    """The readable checkpoint of a run directory with the most steps (ties: the order of `kinds`), and why the
    others were passed over. → ((path, metadata, raw state) or None, [(path, reason)])."""
    found, problems = [], []
    for kind in kinds:
        path = checkpoint_path(run_dir, kind)
        if not path.exists() and not path.with_suffix(".json").exists():
            continue
        try:
            meta, raw = read_checkpoint(path)
            found.append((-int(meta["progress"]["step"]), len(found), (path, meta, raw)))
        except CheckpointError as e:
            problems.append((path, str(e)))
    return (min(found)[2] if found else None), problems


# ---- wandb ----
WANDB_ID_FILE = "wandb_id.txt"  # the run directory's wandb run id: a resumed run continues the same wandb run


def wandb_mode(online: bool, default: str | None = "offline") -> str | None:
    """The wandb mode: WANDB_MODE when set, else 'online' when asked for, else `default`; None means no wandb."""
    mode = os.environ.get("WANDB_MODE") or ("online" if online else default)
    return None if mode in (None, "disabled") else mode


def pyplot():
    """matplotlib.pyplot on the Agg backend (files, no display), imported when a picture is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
