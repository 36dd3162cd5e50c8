"""Run directories: atomic files, checkpoints, results.json's rules, exit codes, the wandb mode.

A run directory (written by train_ex.py, read by sample.py, inspect_run.py, summarize.py and run_train_ex.sh):

    results.json             config, per-epoch history, best epoch, status (see BEST_FIELDS, STATUSES)
    ckpt_latest.msgpack      the whole training state (flax msgpack) at the last save, and
    ckpt_latest.json         its config and progress (epoch, batch within it, step, history, best)
    ckpt_best.msgpack/.json  the same at the epoch of the best validation score
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

from flax import serialization

# ---- exit codes: one table for train_ex.py, the series (run_train_ex.sh), its SLURM tasks and summarize.py ----
EXIT_CODES = {
    0: "finished (or stopped resumably by --max_steps)",
    1: "crashed: an unexpected error (traceback in the log)",
    2: "bad input: options, data, checkpoint, run directory or SLURM environment (the message says what to do)",
    3: "non-finite loss: stopped; ckpt_latest holds the last good state",
    4: "could not write the run directory (disk full, quota, permissions): the files written before are intact",
    130: "interrupted by SIGINT (Ctrl-C): ckpt_latest saved, resumable with --resume",
    138: "interrupted by SIGUSR1 (SLURM's warning before a time limit): ckpt_latest saved, resumable with --resume",
    143: "interrupted by SIGTERM (preemption, time limit): ckpt_latest saved, resumable with --resume",
}
# 128 + the signal's number, as a shell reports a killed job
SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGUSR1": 138, "SIGTERM": 143}
INTERRUPTED_CODES = frozenset(SIGNAL_EXIT_CODES.values())  # to be resumed: the series continues them
FINAL_CODES = frozenset(EXIT_CODES) - INTERRUPTED_CODES  # the run is over (finished, or failed for good)


def exit_status(code) -> str | None:
    """What a run's exit code says of its state: 'finished' (0 — results.json tells whether it stopped early),
    'interrupted' (a signal: resumable), 'failed' (anything else), None (no code recorded)."""
    if code is None:
        return None
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
