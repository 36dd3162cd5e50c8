"""What several scripts share: atomic file writes, run directories, results.json."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


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
