"""Draw digits from a trained next-pixel model (`--dataset mnist`), one pixel at a time, in the recurrent mode.

    python sample.py RUN_DIR [--checkpoint best|latest] [--n 16] [--prefix 308] [--temperature 1.0] [--seed 0]

Rebuilds the model from RUN_DIR's checkpoint and config, takes the first N images of the test split, gives the
model the first --prefix pixels of each (default 308 = the first 11 rows of 28; 0: unconditional) and draws the
rest from its predicted distribution at --temperature (0: the most likely pixel). Writes RUN_DIR/samples/<name>.png,
a grid of pairs (true image | sampled image; a grey tick right of the sampled one marks the row where the given
pixels end), and logs it to wandb when --use_wandb is given or WANDB_MODE is set. The whole draw is one compiled
loop over the 784 steps (models.sample), compiled once per N: seconds on a CPU for a small model.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

import utils


class Sampler:
    """A compiled `models.sample` for one model: call (variables, truth (N, L), n_given, temperature, seed) →
    (drawn values (N, L) int32 as numpy, seconds). Compiled once per N and L; n_given, temperature and the seed
    are traced, so changing them does not compile again."""

    def __init__(self, model):
        import jax

        import models

        self.jax = jax
        self.fn = jax.jit(lambda variables, key, prefix, n_given, temperature: models.sample(
            model, variables, key, prefix, n_given, temperature))

    def __call__(self, variables, truth, n_given, temperature, seed=0):
        t0 = time.perf_counter()
        key = self.jax.random.PRNGKey(seed)
        out = self.fn(variables, key, np.asarray(truth, np.int32), np.int32(n_given), np.float32(temperature))
        out = np.asarray(out)  # waits for the device
        return out, time.perf_counter() - t0


def resolve_prefix(prefix, L: int) -> int:
    """How many true values to give: `prefix`, or by default the first 11/28 of an image's rows (308 of MNIST's 784
    pixels; 70 of 196 at --downsample 2). A ValueError when nothing would be left to draw."""
    side = int(round(np.sqrt(L)))
    if prefix is None:
        return (11 * side // 28) * side if side * side == L else (11 * L) // 28
    if not 0 <= prefix < L:
        raise ValueError(f"the prefix of {prefix} given values must be in 0..{L - 1}: the sequences have {L} steps, "
                         f"and at least one must be drawn")
    return int(prefix)


def true_values(split, n: int) -> np.ndarray:
    """The first n sequences of a split as (n, L) int32 values (pixels 0..255)."""
    if n > len(split):
        raise ValueError(f"{n} samples need {n} test sequences, but the split has only {len(split)}")
    x = np.asarray(split.inputs[:n])
    return x.reshape(n, -1).astype(np.int32)


def grid_image(truth, drawn, n_given: int, cols: int = 4) -> np.ndarray:
    """A uint8 image: pairs (true | sampled) of square images, `cols` pairs a row, white gaps; when a prefix was
    given, a grey tick right of the sampled image marks the row where the model took over."""
    N, L = truth.shape
    side = int(round(np.sqrt(L)))
    if side * side != L:
        raise ValueError(f"sequences of length {L} are not square images")
    gap, cols = 2, max(1, min(cols, N))
    rows = -(-N // cols)
    cell_w = 2 * side + gap
    img = np.full((rows * (side + gap) + gap, cols * (cell_w + 2 * gap) + gap), 255, np.uint8)
    for i in range(N):
        r, c = divmod(i, cols)
        y, x = gap + r * (side + gap), gap + c * (cell_w + 2 * gap)
        img[y:y + side, x:x + side] = truth[i].reshape(side, side)
        img[y:y + side, x + side + gap:x + 2 * side + gap] = drawn[i].reshape(side, side)
        if 0 < n_given < L:
            img[y + n_given // side, x + 2 * side + gap:x + 2 * side + 2 * gap] = 128
    return img


def save_grid(path, truth, drawn, n_given: int) -> Path:
    """Write the (true | sampled) grid as a PNG, atomically, scaled ×2. → the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(grid_image(np.asarray(truth), np.asarray(drawn), n_given), mode="L")
    img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    utils.atomic_write(path, buf.getvalue())
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory of train_ex.py --dataset mnist")
    p.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    p.add_argument("--n", type=int, default=16, help="digits to draw (the first N test images give the prefixes)")
    p.add_argument("--prefix", type=int, default=None, help="true pixels given before sampling (0: unconditional; "
                   "default: the first 11/28 of the rows, 308 pixels at 28×28)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0: the most likely pixel)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir_name", default=None, help="data root (default: the run's --dir_name)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/samples/<checkpoint>-p<prefix>-t<T>-"
                   "s<seed>.png)")
    p.add_argument("--use_wandb", action="store_true", help="log the grid to wandb online (WANDB_MODE, when set, "
                   "chooses the mode)")
    args = p.parse_args(argv)
    if args.n < 1 or (args.prefix is not None and args.prefix < 0) or not 0 <= args.temperature < float("inf"):
        p.error("need --n >= 1, --prefix >= 0 and a finite --temperature >= 0")
    try:
        return run(args)
    except SampleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


class SampleError(Exception):
    pass


def run(args):
    import os

    import dataloaders
    import models
    import train_ex

    run_dir = Path(args.run_dir)
    try:
        cfg, meta, state = train_ex.read_run(run_dir, args.checkpoint)
    except train_ex.RunError as e:
        raise SampleError(str(e)) from None
    if meta.get("task") != "next_step":
        raise SampleError(f"{run_dir} trained a {meta.get('task', 'classification')} model on {cfg.dataset}: only "
                          f"next-step models (--dataset mnist) can draw samples")
    if args.dir_name:
        cfg.dir_name = args.dir_name
    try:
        ds = dataloaders.load(cfg.dataset, cfg.dir_name, seed=cfg.split_seed, downsample=cfg.downsample)
    except dataloaders.DataError as e:
        raise SampleError(f"{e}\n  (the true images give the prefixes and the left column; --dir_name DIR points "
                          f"at another data root)") from None
    if ds.seq_len != meta["seq_len"]:
        raise SampleError(f"the data's sequences have {ds.seq_len} steps, the run's model {meta['seq_len']}")
    if args.n > len(ds.test):
        raise SampleError(f"--n {args.n} is more than the {len(ds.test)} test images")
    try:
        prefix = resolve_prefix(args.prefix, ds.seq_len)
    except ValueError as e:
        raise SampleError(f"--prefix: {e}") from None
    model = models.build_model(cfg, meta)
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
    truth = true_values(ds.test, args.n)
    draw = Sampler(model)
    drawn, seconds = draw(variables, truth, prefix, args.temperature, args.seed)
    name = f"{args.checkpoint}-p{prefix}-t{args.temperature:g}-s{args.seed}.png"
    out = save_grid(Path(args.out) if args.out else run_dir / "samples" / name, truth, drawn, prefix)
    print(f"drew {args.n} sequences of {ds.seq_len} values ({prefix} given) in {seconds:.1f}s (compile included); "
          f"wrote {out}")
    mode = os.environ.get("WANDB_MODE") or ("online" if args.use_wandb else None)
    if mode and mode != "disabled":
        import wandb

        wb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, dir=str(run_dir), mode=mode,
                        job_type="sample", config={**vars(args), "run": str(run_dir)})
        wb.log({"samples": wandb.Image(str(out), caption=f"true | sampled, first {prefix} given")})
        wb.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
