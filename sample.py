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
import sys
from pathlib import Path

import dataloaders
import models
import utils
from models import Sampler, resolve_prefix, save_grid, true_values


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
    run_dir = Path(args.run_dir)
    try:
        cfg, meta, state = models.read_run(run_dir, args.checkpoint)
    except utils.RunError as e:
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
    mode = utils.wandb_mode(args.use_wandb, default=None)
    if mode:
        import wandb  # imported only when used: it is slow to import and optional on GPU images

        wb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, dir=str(run_dir), mode=mode,
                        job_type="sample", config={**vars(args), "run": str(run_dir)})
        wb.log({"samples": wandb.Image(str(out), caption=f"true | sampled, first {prefix} given")})
        wb.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
