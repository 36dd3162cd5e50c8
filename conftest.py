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

SHARED_MNIST = Path(__file__).resolve().parent.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    """The real MNIST test split, in torchvision's layout (as both the train and the test files)."""
    if not SHARED_MNIST.exists():
        pytest.skip("../shared/data/mnist is not beside the checkout")
    root = tmp_path_factory.mktemp("mnist")
    d = root / "MNIST" / "raw"
    d.mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        for prefix in ("train", "t10k"):
            os.symlink(SHARED_MNIST / f"t10k-{kind}-ubyte.gz", d / f"{prefix}-{kind}-ubyte.gz")
    return root

