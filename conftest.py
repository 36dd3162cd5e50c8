"""pytest session settings shared by every test file.

The tests compile hundreds of small functions, so compile time dominates the suite on a 2-core CPU.
XLA's heavy optimisation passes are switched off for tests: they speed up large programs but not the
semantics under test, and turning them off roughly halves each compile. The environment variable carries the
same setting into the training runs and series that tests start as subprocesses.
"""

import os
from pathlib import Path

import jax
import pytest

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
jax.config.update("jax_disable_most_optimizations", True)

MNIST_SUBSET = Path(__file__).resolve().parent / "testdata" / "mnist"  # the first 3,000 MNIST test images


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the test session, shared by both workers and by the training runs and
    series that tests start as subprocesses (through the environment): a training step of the same model and shapes
    is compiled once, not once per test. It lives beside the workers' temporary folders, which pytest rotates."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax-cache"
    cache.mkdir(exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return cache


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Keep `--dist loadgroup`'s groups (pyproject.toml): a test file whose module fixtures are costly (a SLURM cluster,
    trained runs) marks itself `xdist_group` so that one worker builds them once. xdist names the group in a suffix of
    each node id, but pytest 9.2 reads node ids from `item._id`, so xdist's suffix is lost and the tests spread over
    both workers (pytest-xdist #1386). Put the suffix where pytest 9.2 reads it; a no-op where xdist's own worked."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId  # pytest >= 9.2
    except ImportError:
        return

    for item in items:
        marks = item.iter_markers("xdist_group")
        groups = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in marks}
        if groups and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(sorted(groups))}")


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    """Real MNIST in torchvision's layout: the committed subset of the test split (testdata/mnist, the first 3,000
    images of t10k, IDX gzip as published) as both the train and the test files, so every test runs on a fresh
    clone. The validation split (10% of train) is held out from training as usual."""
    root = tmp_path_factory.mktemp("mnist")
    d = root / "MNIST" / "raw"
    d.mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        for prefix in ("train", "t10k"):
            os.symlink(MNIST_SUBSET / f"t10k-{kind}-ubyte.gz", d / f"{prefix}-{kind}-ubyte.gz")
    return root
