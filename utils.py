"""Run directories: atomic files, checkpoints, results.json's rules, exit codes, the wandb mode.

A run directory (written by train_ex.py, read by sample.py, inspect_run.py, summarize.py and run_train_ex.sh):

    results.json             config, per-epoch history, best epoch, status (see BEST_FIELDS, STATUSES)
    ckpt_latest.msgpack      the whole training state (flax msgpack) at the last save, and
    ckpt_latest.json         its config and progress (epoch, batch within it, step, history, best)
    ckpt_best.msgpack/.json  the same at the epoch of the best validation score
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from flax import serialization

# ---- exit codes: one table for train_ex.py, the series (run_train_ex.sh) and summarize.py ----
EXIT_CODES = {
    0: "finished (or stopped resumably by --max_steps)",
    1: "crashed: an unexpected error (traceback in the log)",
    2: "bad input: options, data, checkpoint or run directory (the message says what to do)",
    3: "non-finite loss: stopped; ckpt_latest holds the last good state",
    130: "interrupted by SIGINT (Ctrl-C): ckpt_latest saved, resumable with --resume",
    143: "interrupted by SIGTERM (preemption, time limit): ckpt_latest saved, resumable with --resume",
}
SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as a shell reports a killed job
INTERRUPTED_CODES = frozenset(SIGNAL_EXIT_CODES.values())


def exit_status(code) -> str | None:
    """What a run's exit code says of its state: 'finished' (0 — results.json tells whether it stopped early),
    'interrupted' (a signal: resumable), 'failed' (anything else), None (no code recorded)."""
    if code is None:
        return None
    return "finished" if code == 0 else "interrupted" if code in INTERRUPTED_CODES else "failed"


class RunError(Exception):
    """Stops a run with a message for the console and an exit code from EXIT_CODES."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


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
    """Write a file so that a reader (or a crash) sees the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """RUN_DIR/ckpt_<kind>.msgpack (kind: latest or best); its metadata is the same name with .json."""
    return Path(run_dir) / f"ckpt_{kind}.msgpack"


def save_checkpoint(run_dir, kind: str, host_state, config: dict, progress: dict):
    """Write a training state (a tree of host arrays) and its metadata, each file atomically."""
    path = checkpoint_path(run_dir, kind)
    atomic_write(path, serialization.to_bytes(host_state))
    write_json(path.with_suffix(".json"), {"config": config, "progress": progress})


def read_checkpoint(path) -> tuple[dict, dict]:
    """(metadata {config, progress}, the raw state as nested dicts of numpy arrays) of a checkpoint file. A state
    saved with the totals under their former key "acc" is returned with them under "totals"."""
    path = Path(path)
    meta = read_json(path.with_suffix(".json"))
    raw = serialization.msgpack_restore(path.read_bytes())
    if "acc" in raw and "totals" not in raw:
        raw["totals"] = raw.pop("acc")
    return meta, raw


# ---- wandb ----
def wandb_mode(online: bool, default: str | None = "offline") -> str | None:
    """The wandb mode: WANDB_MODE when set, else 'online' when asked for, else `default`; None means no wandb."""
    mode = os.environ.get("WANDB_MODE") or ("online" if online else default)
    return None if mode in (None, "disabled") else mode
