"""Train S5 and its time-varying extensions on the LRA tasks and sequential MNIST/CIFAR.

    python train_ex.py --enable_auxiliary_state --time_scale_type sinusoidal
    python train_ex.py --dataset listops-classification --ssm_type extend --R 10 --extend_mode full

The S5 recipes of each task are in the README. Every run writes `results.json`, `ckpt_latest.msgpack` and
`ckpt_best.msgpack` (plus their .json metadata) into its run directory.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

import dataloaders
import models
import ssm
import ssm_ex
import utils

# ==================================================================================================
# Command line
# ==================================================================================================

ARCH_FIELDS = ("dataset", "ssm_type", "d_model", "n_layers", "ssm_size_base", "blocks", "conj_sym", "bidirectional",
               "activation_fn", "prenorm", "batchnorm", "mode", "C_init", "R", "extend_mode", "delta_type",
               "time_scale_type", "token_encoder", "pixel_tokens")


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    B = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="listops-classification", choices=list(dataloaders.DATASETS))
    g.add_argument("--dir_name", default="./data", help="data root (see download_lra.sh)")
    g.add_argument("--bsz", type=int, default=32, help="batch size (global, over all devices)")
    g.add_argument("--max_train_samples", type=int, default=None, help="use only this many training samples")
    g.add_argument("--max_eval_samples", type=int, default=None, help="use only this many val/test samples")
    g.add_argument("--downsample", type=int, default=1, help="MNIST only: k×k average pooling (28/k)² steps")
    g.add_argument("--eval_resolutions", default="1", help="also evaluate val and test on every k-th sample "
                   "(x[::k]) with the model's steps × k, for each k listed (e.g. 1,2: the S5 Speech recipe's "
                   "zero-shot 8 kHz evaluation); results carry val_acc@k and test_acc@k")
    g.add_argument("--speech_norm", default="global", choices=dataloaders.SPEECH_NORMS,
                   help="speech35-classification: standardise the audio with one training mean and std (global) or "
                   "as the S5 release, every time step by its own training mean and std + 0.328 (release; README)")
    g.add_argument("--buckets", action=B, default=True,
                   help="length buckets (L/4, L/2, 3L/4, L) for padded datasets: fewer padded steps, 4 shapes "
                   "(the S5 release: --no-buckets, every batch padded to L, uniform random batches)")
    g.add_argument("--mask_padding", action=B, default=True,
                   help="zero padded positions before every SSM, so padding changes no real position's state "
                   "(the S5 release: --no-mask_padding, its scans and BatchNorm see the padding)")
    g = p.add_argument_group("model")
    g.add_argument("--ssm_type", default="s5", choices=models.SSM_TYPES)
    g.add_argument("--enable_auxiliary_state", action="store_true", help="the lab's spelling of --ssm_type aux")
    g.add_argument("--d_model", type=int, default=128)
    g.add_argument("--n_layers", type=int, default=4)
    g.add_argument("--ssm_size_base", type=int, default=64, help="state size P (N per feature for s4/s4d/dss)")
    g.add_argument("--s4d_init", default="legs", choices=("legs", "lin"), help="S4D eigenvalues: S4D-LegS or S4D-Lin")
    g.add_argument("--blocks", type=int, default=1, help="HiPPO blocks in the initialisation")
    g.add_argument("--C_init", default="lecun_normal", choices=ssm.C_INITS)
    g.add_argument("--discretization", default="zoh", choices=("zoh", "bilinear"))
    g.add_argument("--dt_min", type=float, default=0.001)
    g.add_argument("--dt_max", type=float, default=0.1)
    g.add_argument("--conj_sym", action=B, default=True)
    g.add_argument("--clip_eigs", action=B, default=False)
    g.add_argument("--bidirectional", action=B, default=False)
    g.add_argument("--activation_fn", default="half_glu1", choices=models.ACTIVATIONS)
    g.add_argument("--prenorm", action=B, default=True)
    g.add_argument("--batchnorm", action=B, default=None,
                   help="BatchNorm (else LayerNorm); default: on, except for next-step datasets (mnist), which refuse "
                   "it: its batch statistics in training would mix later positions into every position")
    g.add_argument("--bn_momentum", type=float, default=0.95)
    g.add_argument("--p_dropout", type=float, default=0.1)
    g.add_argument("--mode", default="pool", choices=("pool", "last"), help="pooling over time")
    g.add_argument("--token_encoder", default="onehot", choices=models.TOKEN_ENCODERS,
                   help="token datasets: onehot = the S5 release's Dense with bias on one-hot tokens; embed = "
                   "nn.Embed")
    g.add_argument("--pixel_tokens", action=B, default=False,
                   help="--dataset mnist (next-pixel prediction): feed the previous pixel as one of 256 tokens "
                   "(encoded by --token_encoder; Annotated S4's embedding=true is --pixel_tokens --token_encoder "
                   "embed) instead of its value/255 through a Dense layer")
    g = p.add_argument_group("extensions")
    g.add_argument("--time_scale_type", default="sinusoidal", choices=ssm_ex.TIME_SCALES)
    g.add_argument("--auxiliary_strength", type=float, default=0.1)
    g.add_argument("--R", type=int, default=10, help="rank of the Lambda extension")
    g.add_argument("--extend_mode", default="full", choices=ssm_ex.EXTEND_MODES)
    g.add_argument("--delta_type", default="learned", choices=ssm_ex.DELTA_TYPES)
    g.add_argument("--extend_init_scale", type=float, default=0.05)
    g.add_argument("--extend_chunk", type=int, default=0, help="full mode: steps per chunk of the chunked scan "
                   "(0: about sqrt(L/2), the smallest sequential depth; >= L: one chunk, the plain recurrence)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=50)
    g.add_argument("--lr", type=float, default=1e-3,
                   help="global learning rate (the SSM group gets lr/lr_factor) unless --ssm_lr_base is given")
    g.add_argument("--ssm_lr_base", type=float, default=None,
                   help="S5's spelling: SSM learning rate; the global one is then lr_factor × ssm_lr_base")
    g.add_argument("--lr_factor", type=float, default=1.0)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--opt_config", default="standard", choices=("standard", "BandCdecay", "BfastandCdecay",
                                                                "noBCdecay"))
    g.add_argument("--dt_global", action="store_true", help="log_step in the regular group")
    g.add_argument("--warmup_end", type=int, default=1, help="epochs of linear warm-up")
    g.add_argument("--lr_min", type=float, default=0.0)
    g.add_argument("--cosine_anneal", action=B, default=True)
    g.add_argument("--grad_clip", type=float, default=None, help="clip the global gradient norm (off by default)")
    g.add_argument("--early_stop_patience", type=int, default=None, help="stop after this many epochs without "
                   "a better validation accuracy")
    g.add_argument("--jax_seed", type=int, default=1919, help="initialisation, dropout and shuffling")
    g.add_argument("--split_seed", type=int, default=42, help="the held-out splits (val; Pathfinder/Path-X val and "
                   "test): fixed at the S5 release's 42 so that every run is tested on the same images")
    g = p.add_argument_group("runs, checkpoints, logging")
    g.add_argument("--run_dir", default=None, help="default: a new folder under runs/")
    g.add_argument("--resume", action="store_true", help="continue the run in --run_dir from ckpt_latest")
    g.add_argument("--load_checkpoint", default=None, help="initialise from this checkpoint file")
    g.add_argument("--freeze", default=None, choices=("base",), help="with --load_checkpoint: train only the "
                   "extension on top of a loaded S5 model")
    g.add_argument("--eval_only", action="store_true", help="evaluate --load_checkpoint and exit")
    g.add_argument("--max_steps", type=int, default=None, help="stop (resumably) after this many steps")
    g.add_argument("--ckpt_every_min", type=float, default=30.0, help="also write ckpt_latest inside an epoch every "
                   "this many minutes (0: only at epoch ends), so a killed job loses at most about that much")
    g.add_argument("--distributed", action="store_true", help="several processes (hosts) with jax.distributed: "
                   "alone under SLURM / Open MPI (peers found from the environment), elsewhere with the next three")
    g.add_argument("--coordinator", default=None, help="--distributed: HOST:PORT of process 0")
    g.add_argument("--num_processes", type=int, default=None, help="--distributed: how many processes")
    g.add_argument("--process_id", type=int, default=None, help="--distributed: this process's index, 0..N-1")
    g.add_argument("--use_wandb", action="store_true", help="log to wandb online (default: offline; WANDB_MODE "
                   "wins when set)")
    g.add_argument("--wandb_project", default="s5-ex")
    g.add_argument("--wandb_entity", default=None)
    g.add_argument("--wandb_run_name", default=None)
    g = p.add_argument_group("generation (--dataset mnist)")
    g.add_argument("--sample_every", type=int, default=0, help="draw --n_samples digits every this many epochs "
                   "(0: never) into <run_dir>/samples/epoch<k>.png (true | sampled) and wandb")
    g.add_argument("--n_samples", type=int, default=8, help="digits per --sample_every grid")
    g.add_argument("--sample_prefix", type=int, default=None, help="pixels of each true test image given before "
                   "sampling (0: unconditional; default: the first 11/28 of the rows, 308 pixels at 28×28)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: the most likely pixel)")
    g = p.add_argument_group("logging")
    g.add_argument("--log_every", type=int, default=25, help="steps between progress-bar updates and the "
                   "non-finite-loss check (with several processes also their agreed stop and checkpoint decisions)")
    return p


def parse_args(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.enable_auxiliary_state:
        if args.ssm_type not in ("s5", "aux"):
            parser.error(f"--enable_auxiliary_state means --ssm_type aux, not {args.ssm_type}")
        args.ssm_type = "aux"
    for name in ("bsz", "epochs", "d_model", "n_layers", "ssm_size_base", "blocks", "R"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.ssm_size_base % args.blocks:
        parser.error(f"--ssm_size_base {args.ssm_size_base} is not divisible by --blocks {args.blocks}")
    if args.ssm_type in ("s4", "s4d", "dss") and args.ssm_size_base % 2:
        parser.error(f"--ssm_type {args.ssm_type} keeps conjugate pairs: --ssm_size_base must be even, got "
                     f"{args.ssm_size_base}")
    if args.conj_sym and (args.ssm_size_base // args.blocks) % 2:
        parser.error(f"--conj_sym needs an even block size; ssm_size_base/blocks = "
                     f"{args.ssm_size_base // args.blocks}")
    if not 0 <= args.p_dropout < 1:
        parser.error(f"--p_dropout must be in [0, 1), got {args.p_dropout}")
    if args.dt_min <= 0 or args.dt_max < args.dt_min:
        parser.error("need 0 < --dt_min <= --dt_max")
    if args.downsample != 1 and "mnist" not in args.dataset:
        parser.error("--downsample applies to mnist-classification and pmnist-classification only")
    if args.speech_norm != "global" and args.dataset != "speech35-classification":
        parser.error("--speech_norm applies to speech35-classification only")
    next_step = dataloaders.task_of(args.dataset) == "next_step"
    if next_step:
        causal = f"--dataset {args.dataset} predicts each value from the ones before it, so the model must be causal"
        if args.bidirectional:
            parser.error(f"{causal}: --bidirectional is not allowed (use --no-bidirectional)")
        if args.batchnorm:
            parser.error(f"{causal}: --batchnorm is not allowed (its batch statistics in training mix later pixels "
                         f"into every position); the default for this dataset is LayerNorm")
        if args.mode != "pool":
            parser.error(f"--mode pools a classifier's outputs; --dataset {args.dataset} predicts at every position")
        if args.eval_resolutions != "1":
            parser.error(f"--eval_resolutions applies to classification datasets, not --dataset {args.dataset}")
    elif args.sample_every or args.pixel_tokens:
        parser.error(f"--sample_every and --pixel_tokens apply to next-step datasets (mnist), not {args.dataset}")
    if args.batchnorm is None:
        args.batchnorm = not next_step
    if (args.sample_every < 0 or args.n_samples < 1 or not 0 <= args.temperature < float("inf")
            or (args.sample_prefix is not None and args.sample_prefix < 0)):
        parser.error("need --sample_every >= 0, --n_samples >= 1, a finite --temperature >= 0, --sample_prefix >= 0")
    if args.freeze and not args.load_checkpoint:
        parser.error("--freeze base needs --load_checkpoint (the S5 checkpoint to build on)")
    if args.freeze and args.ssm_type == "s5":
        parser.error("--freeze base trains only an extension: use --ssm_type aux or extend")
    if args.eval_only and not (args.load_checkpoint or args.resume):
        parser.error("--eval_only needs --load_checkpoint (or --resume with --run_dir)")
    if args.resume and not args.run_dir:
        parser.error("--resume needs --run_dir (the run to continue)")
    manual = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if any(manual) and not (all(manual) and args.distributed):
        parser.error("--coordinator, --num_processes and --process_id go together, with --distributed")
    if all(manual) and not 0 <= args.process_id < args.num_processes:
        parser.error(f"--process_id must be in 0..{args.num_processes - 1}, got {args.process_id}")
    if args.distributed and not args.run_dir and not args.eval_only:
        parser.error("--distributed needs --run_dir (every process must name the same run)")
    if args.ckpt_every_min < 0:
        parser.error(f"--ckpt_every_min must be >= 0, got {args.ckpt_every_min}")
    try:
        args.resolutions = sorted({int(k) for k in str(args.eval_resolutions).split(",")})
    except ValueError:
        parser.error(f"--eval_resolutions takes integers separated by commas, e.g. 1,2; got {args.eval_resolutions!r}")
    if args.resolutions[0] < 1 or 1 not in args.resolutions:
        parser.error(f"--eval_resolutions must list 1 (the normal evaluation) and rates >= 1, got "
                     f"{args.eval_resolutions!r}")
    if args.ssm_lr_base is not None:
        args.ssm_lr, args.global_lr = args.ssm_lr_base, args.lr_factor * args.ssm_lr_base
    else:
        args.ssm_lr, args.global_lr = args.lr / args.lr_factor, args.lr
    return args


# ==================================================================================================
# Optimiser: the S5 parameter groups
# ==================================================================================================


def param_label(path, cfg, frozen: bool) -> str:
    names = [getattr(k, "key", str(k)) for k in path]
    leaf, in_ssm = names[-1], "ssm" in names
    if frozen and not (in_ssm and leaf in ssm_ex.EXTENSION_PARAMS):
        return "frozen"
    if not in_ssm:
        return "regular"
    if leaf in ssm_ex.EXTENSION_PARAMS or leaf in ("Lambda_re", "Lambda_im", "P"):  # P: S4's low-rank term
        return "ssm"
    if leaf == "log_step":
        return "regular" if cfg.dt_global else "ssm"
    groups = {"standard": {"B": "ssm"}, "BandCdecay": {"B": "ssm_decay"}, "BfastandCdecay": {},
              "noBCdecay": {"B": "ssm", "C": "ssm", "D": "ssm"}}[cfg.opt_config]
    return groups.get(leaf, "regular")


def schedule(base, cfg, steps_per_epoch):
    """The S5 release's learning rate at optimiser step k (its loop sets the rate after every step, from the
    number of steps taken so far), with W = warmup_end·steps_per_epoch and T = epochs·steps_per_epoch:

        k = 0: base;   k ≥ 1: f(k − 1),   f(j) = base·(j + 1)/W                                   if j < W
                                          f(j) = lr_min + (base − lr_min)·½(1 + cos(π·min(j, T−W)/(T−W)))  otherwise
    (f(j) = base without --cosine_anneal). The cosine runs on the global step, so it reaches lr_min W steps
    before the end and stays there.
    """
    import jax.numpy as jnp

    W = cfg.warmup_end * steps_per_epoch
    span = max(cfg.epochs * steps_per_epoch - W, 1)

    def lr(count):
        j = count - 1
        warm = base * (j + 1) / max(W, 1)
        if cfg.cosine_anneal:
            after = cfg.lr_min + (base - cfg.lr_min) * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(j, span) / span))
        else:
            after = base
        return jnp.where(count == 0, base, jnp.where(j < W, warm, after))

    return lr


def make_optimizer(params, cfg, steps_per_epoch, frozen=False):
    import jax
    import optax

    labels = jax.tree_util.tree_map_with_path(lambda p, _: param_label(p, cfg, frozen), params)
    txs = {
        "ssm": optax.adam(schedule(cfg.ssm_lr, cfg, steps_per_epoch)),
        "ssm_decay": optax.adamw(schedule(cfg.ssm_lr, cfg, steps_per_epoch), weight_decay=cfg.weight_decay),
        "regular": optax.adamw(schedule(cfg.global_lr, cfg, steps_per_epoch), weight_decay=cfg.weight_decay),
        "frozen": optax.set_to_zero(),
    }
    tx = optax.multi_transform(txs, labels)
    if cfg.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, labels


# ==================================================================================================
# Training
# ==================================================================================================


class RunError(Exception):
    """Stops a run with a message and an exit code."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def check_architecture(saved: dict, cfg):
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}" for k in ARCH_FIELDS
            if k in saved and saved.get(k) != getattr(cfg, k)]
    if diff:
        raise RunError("the checkpoint was made by a different architecture:\n  " + "\n  ".join(diff), 2)


# --------------------------------------------------------------------------------------------------
# Runtime: processes, devices, shardings
# --------------------------------------------------------------------------------------------------

STOP_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as a shell reports a killed job
# results.json's "best": the epoch with the best validation accuracy (classification) or the lowest validation
# loss (next-step prediction), and its test numbers
BEST_FIELDS = ("epoch", "val_acc", "test_acc", "val_loss", "test_loss", "val_bpd", "test_bpd")


class Runtime:
    """This process's place in the run: the device mesh over every process's devices, the data and replicated
    shardings, and the few host-side agreements every process must reach together."""

    def __init__(self, cfg):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        if cfg.distributed:
            try:  # CPU hosts exchange collectives over gloo; a no-op on GPU, absent from some JAX releases
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
            except (AttributeError, ValueError):
                pass
            kw = {}
            if cfg.coordinator:
                kw = dict(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                          process_id=cfg.process_id)
            jax.distributed.initialize(**kw)  # under SLURM / Open MPI it finds its peers itself
        self.jax = jax
        self.devices = jax.devices()
        self.index, self.count = jax.process_index(), jax.process_count()
        if cfg.bsz % len(self.devices):
            raise RunError(f"--bsz {cfg.bsz} must be divisible by the {len(self.devices)} devices "
                           f"({self.count} process(es))", 2)
        mesh = Mesh(np.array(self.devices), ("batch",))
        self.data_sharding = NamedSharding(mesh, PartitionSpec("batch"))
        self.replicated = NamedSharding(mesh, PartitionSpec())

    @property
    def main(self) -> bool:
        """Process 0 alone writes checkpoints, results.json, wandb and the console summary."""
        return self.index == 0

    @property
    def shard(self):
        return (self.index, self.count)

    def global_batch(self, local):
        """This process's rows of a global batch → one global array per leaf (no collective)."""
        return {k: self.jax.make_array_from_process_local_data(self.data_sharding, v) for k, v in local.items()}

    def agree(self, flags):
        """The element-wise maximum of `flags` (small ints) over every process: decisions all processes share."""
        flags = np.asarray(flags, np.int32)
        if self.count == 1:
            return flags
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(flags)).max(axis=0)

    def barrier(self, name):
        if self.count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    def host(self, x):
        """A replicated array's value on this host."""
        return np.asarray(x.addressable_data(0))

    def describe(self):
        d = self.devices[0]
        return f"{len(self.devices)}× {d.device_kind}" + (f" on {self.count} processes" if self.count > 1 else "")


# --------------------------------------------------------------------------------------------------
# Checkpoints and reports (process 0 writes; every process reads)
# --------------------------------------------------------------------------------------------------


class Checkpoints:
    """ckpt_{latest,best}.msgpack (flax msgpack of the whole training state, written atomically) and a .json
    beside each (config, progress: epoch, batch within it, step, history, best)."""

    def __init__(self, run_dir: Path, rt: Runtime, config: dict):
        self.dir, self.rt, self.config = run_dir, rt, config

    def save(self, kind, state, progress):
        if not self.rt.main:
            return
        from flax import serialization

        host_state = self.rt.jax.tree_util.tree_map(self.rt.host, state)
        utils.atomic_write(self.dir / f"ckpt_{kind}.msgpack", serialization.to_bytes(host_state))
        utils.write_json(self.dir / f"ckpt_{kind}.json", {"config": self.config, "progress": progress})

    def restore(self, cfg, state):
        """(state, progress) from ckpt_latest, or a RunError saying what is missing or different."""
        from flax import serialization

        latest = self.dir / "ckpt_latest.msgpack"
        if not latest.exists():
            raise RunError(f"--resume: no checkpoint at {latest} (a run that never saved one starts without "
                           f"--resume)", 2)
        saved = utils.read_json(latest.with_suffix(".json"))
        check_architecture(saved["config"], cfg)
        return serialization.from_bytes(state, latest.read_bytes()), saved["progress"]


class Report:
    """results.json, wandb and the console, all from process 0."""

    def __init__(self, cfg, rt: Runtime, run_dir: Path, config: dict, ds, n_params: int):
        self.cfg, self.rt, self.dir, self.config, self.ds, self.n_params = cfg, rt, run_dir, config, ds, n_params
        self.wandb = start_wandb(cfg, config, run_dir) if rt.main else None

    def say(self, text):
        if self.rt.main:
            print(text, flush=True)

    def results(self, progress, status):
        if not self.rt.main:
            return
        best = progress["best"] or {}
        utils.write_json(self.dir / "results.json", {
            "config": self.config, "epochs": progress["history"],
            "best": {k: best[k] for k in BEST_FIELDS if k in best} if best else {k: None for k in BEST_FIELDS[:3]},
            "wall_time_s": progress["wall_time_s"],
            "steps_per_s": progress["step"] / max(progress["wall_time_s"], 1e-9),
            "n_params": self.n_params, "device": self.rt.describe(), "data": self.ds.provenance(), "status": status})

    def epoch(self, row, progress):
        if self.wandb:
            self.wandb.log(row, step=row["epoch"])
        best = progress["best"]
        if "val_bpd" in row:  # next-step prediction: nats per value and bits per dimension
            self.say(f"epoch {row['epoch']:3d} | train {row['train_loss']:.4f} nats {row['train_bpd']:.4f} bits/dim | "
                     f"val {row['val_loss']:.4f} nats {row['val_bpd']:.4f} bits/dim | test {row['test_bpd']:.4f} "
                     f"bits/dim | best val {best['val_bpd']:.4f} bits/dim (test {best['test_bpd']:.4f}) | "
                     f"{row['seconds']:.1f}s, {row['steps_per_s']:.1f} steps/s")
            return
        rates = "".join(f" | @{k}: val {row[f'val_acc@{k}']:.4f} test {row[f'test_acc@{k}']:.4f}"
                        for k in self.cfg.resolutions[1:])
        self.say(f"epoch {row['epoch']:3d} | train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | val loss "
                 f"{row['val_loss']:.4f} acc {row['val_acc']:.4f} | test acc {row['test_acc']:.4f}{rates} | best val "
                 f"{best['val_acc']:.4f} (test {best['test_acc']:.4f}) | {row['seconds']:.1f}s, "
                 f"{row['steps_per_s']:.1f} steps/s")

    def image(self, path, epoch, caption):
        if self.wandb:
            import wandb

            self.wandb.log({"samples": wandb.Image(str(path), caption=caption)}, step=epoch)

    def close(self):
        if self.wandb:
            self.wandb.finish()


# --------------------------------------------------------------------------------------------------
# The run: data, state, the step loop, evaluation
# --------------------------------------------------------------------------------------------------


class StopSignals:
    """SIGINT and SIGTERM (what SLURM and Kubernetes send before a kill) only set a flag; the step loop saves
    and stops at the next agreed point."""

    def __enter__(self):
        self.caught = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.caught = self.caught or signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def init_variables(cfg, model, batch):
    """(the model's initial variables, the dropout key), both from --jax_seed; only the batch's shapes matter."""
    import jax

    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(cfg.jax_seed))
    init = jax.jit(lambda k, b: model.init({"params": k, "dropout": k}, b, training=False))
    return init(init_key, batch), dropout_key


def build_state(cfg, rt, model, train, steps_per_epoch, run_dir, ckpts):
    """(state on the devices, tx, progress, n_params, dropout key): fresh, warm-started or resumed."""
    import jax

    variables, dropout_key = init_variables(cfg, model, next(train.batches(cfg.bsz, shard=rt.shard)))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    if cfg.load_checkpoint and not cfg.resume:
        params, batch_stats = load_weights(cfg.load_checkpoint, cfg, params, batch_stats)
    tx, _ = make_optimizer(params, cfg, steps_per_epoch, frozen=cfg.freeze == "base")
    state = new_state(params, batch_stats, tx)
    progress = {"epoch": 0, "batch": 0, "step": 0, "history": [], "best": None, "wall_time_s": 0.0}
    if cfg.resume:
        state, progress = ckpts.restore(cfg, state)
        if rt.main:
            print(f"resuming {run_dir} at epoch {progress['epoch'] + 1}, batch {progress['batch']}")
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    return jax.device_put(state, rt.replicated), tx, progress, n_params, dropout_key


def run(cfg):
    import jax

    rt = Runtime(cfg)
    # ---- data: process 0 builds any cache first, so processes sharing a disk never write it together ----
    if rt.main:
        ds, train, val, test = load_data(cfg)
    rt.barrier("data")
    if not rt.main:
        ds, train, val, test = load_data(cfg)
    buckets = tuple(ds.seq_len * k // 4 for k in (1, 2, 3)) if (cfg.buckets and ds.padded) else None
    steps_per_epoch = train.num_batches(cfg.bsz, drop_last=True, buckets=buckets)
    if steps_per_epoch == 0:
        raise RunError(f"{len(train)} training samples make no full batch of {cfg.bsz}: lower --bsz", 2)
    meta = dict(n_classes=ds.n_classes, seq_len=ds.seq_len, in_dim=ds.in_dim, tokens=ds.tokens, pair=ds.pair,
                task=ds.task, onehot_width=ds.onehot_width)

    # ---- model and state ----
    model = models.build_model(cfg, meta)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else utils.new_run_dir("runs", cfg.dataset)
    if rt.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    config = dict(vars(cfg), model_meta=meta)  # model_meta: what rebuilds the model without the data
    ckpts = Checkpoints(run_dir, rt, config)
    state, tx, progress, n_params, dropout_key = build_state(cfg, rt, model, train, steps_per_epoch, run_dir, ckpts)
    train_step, eval_step = make_steps(model, tx, dropout_key)
    train_step = jax.jit(train_step, donate_argnums=(0,), out_shardings=rt.replicated)
    eval_steps = {1: jax.jit(eval_step, out_shardings=rt.replicated)}
    for k in cfg.resolutions[1:]:  # the same parameters, every step × k (see ssm_ex.py for the extensions)
        model_k = models.build_model(argparse.Namespace(**{**vars(cfg), "step_rescale": float(k)}), meta)
        eval_steps[k] = jax.jit(make_steps(model_k, tx, dropout_key)[1], out_shardings=rt.replicated)

    def decimate(b, k):
        """Every k-th sample of a batch (x[::k]); lengths in the coarser steps."""
        if k == 1:
            return b
        out = dict(b, inputs=b["inputs"][:, ::k], lengths=-(-b["lengths"] // k))
        if "inputs2" in b:
            out.update(inputs2=b["inputs2"][:, ::k], lengths2=-(-b["lengths2"] // k))
        return out

    def evaluate(state, split, k=1):
        """(loss, accuracy) over a split at rate k; every process runs the same batches of the same shapes."""
        if len(split) == 0:
            return float("nan"), float("nan")
        tot = None
        for b in dataloaders.prefetch(split.batches(cfg.bsz, buckets=buckets, shard=rt.shard)):
            out = eval_steps[k](state, rt.global_batch(decimate(b, k)))
            tot = out if tot is None else tot + out
        loss_sum, correct, n = rt.host(tot)
        return float(loss_sum / n), float(correct / n)

    if cfg.eval_only:
        (val_loss, val_acc), (test_loss, test_acc) = evaluate(state, val), evaluate(state, test)
        if rt.main:
            bpd = (lambda x: f" ({x / np.log(2.0):.4f} bits/dim)") if ds.task == "next_step" else (lambda x: "")
            print(f"eval: val loss {val_loss:.4f}{bpd(val_loss)} acc {val_acc:.4f} | test loss {test_loss:.4f}"
                  f"{bpd(test_loss)} acc {test_acc:.4f}")
        return 0

    after_epoch = sampler(cfg, rt, model, test, ds.seq_len, run_dir)
    report = Report(cfg, rt, run_dir, config, ds, n_params)
    report.say(f"{cfg.dataset} ({ds.source}): train {len(train):,} val {len(val):,} test {len(test):,} | "
               f"{cfg.ssm_type} model, {n_params:,} parameters | {rt.describe()} | run {run_dir}")
    status = "finished"
    with StopSignals() as signals:
        if rt.count > 1:  # after the handlers are in place: from here a SIGTERM saves and stops
            print(f"process {rt.index} of {rt.count}: {jax.local_device_count()} local device(s), training",
                  flush=True)
        try:
            state, status, code = train_epochs(cfg, rt, state, progress, (train, val, test), buckets,
                                               steps_per_epoch, train_step, evaluate, ckpts, report, signals,
                                               after_epoch)
            return code
        except Exception:
            status = "failed"
            raise
        finally:
            report.results(progress, status)
            report.close()


def train_epochs(cfg, rt, state, progress, splits, buckets, steps_per_epoch, train_step, evaluate, ckpts, report,
                 signals, after_epoch=None):
    """The step loop over the remaining epochs. → (state, status, exit code). `after_epoch(state, epoch, report)` runs
    after each epoch's checkpoint and report (the samples of --sample_every).

    Every --log_every steps (and at the end of an epoch) the host reads the on-device accumulator (loss, NaN
    count) and, with all processes, agrees on whether to stop (a signal, --max_steps) or to write a mid-epoch
    checkpoint (--ckpt_every_min); between those points no step waits for the host. A single process checks
    signals and the checkpoint clock after every step (host-side flags, no device sync).
    """
    from tqdm import tqdm

    train, val, test = splits
    epochs_since_best = 0
    last_save = time.monotonic()
    sync_every = 1 if rt.count == 1 else cfg.log_every
    while progress["epoch"] < cfg.epochs:
        epoch = progress["epoch"]
        t0 = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, initial=progress["batch"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="step", leave=False, dynamic_ncols=True, disable=not rt.main)
        batches = train.batches(cfg.bsz, shuffle=True, seed=cfg.jax_seed, epoch=epoch, drop_last=True,
                                buckets=buckets, start=progress["batch"], shard=rt.shard)
        for b in dataloaders.prefetch(batches):
            state = train_step(state, rt.global_batch(b), progress["step"])
            progress["batch"] += 1
            progress["step"] += 1
            bar.update(1)
            last = progress["batch"] == steps_per_epoch
            if progress["batch"] % cfg.log_every == 0 or last:
                loss_sum, correct, n, bad = rt.host(state["acc"])  # the only device sync, every log_every
                if bad:
                    progress["wall_time_s"] += time.perf_counter() - t0
                    raise RunError(f"non-finite loss in epoch {epoch + 1} within steps "
                                   f"{progress['step'] - cfg.log_every + 1}..{progress['step']}: stopped; the "
                                   f"last good checkpoint is {ckpts.dir / 'ckpt_latest.msgpack'}", 3)
                bar.set_postfix(loss=f"{loss_sum / max(n, 1):.4f}", acc=f"{correct / max(n, 1):.3f}")
            if progress["step"] % sync_every and progress["step"] != cfg.max_steps:
                continue
            due = cfg.ckpt_every_min > 0 and time.monotonic() - last_save >= 60 * cfg.ckpt_every_min
            sig = {None: 0, "SIGINT": 1, "SIGTERM": 2}[signals.caught]
            stop_sig, max_steps, save_now = rt.agree([sig, progress["step"] == cfg.max_steps, due])
            if stop_sig or max_steps:
                progress["wall_time_s"] += time.perf_counter() - t0
                ckpts.save("latest", state, progress)
                bar.close()
                name = {1: "SIGINT", 2: "SIGTERM"}.get(int(stop_sig))
                print(f"\nprocess {rt.index}: {'stopped by ' + name if name else 'reached --max_steps'} at epoch "
                      f"{epoch + 1}, batch {progress['batch']} (step {progress['step']}); continue with "
                      f"--resume --run_dir {ckpts.dir}", flush=True)
                return state, "interrupted", STOP_CODES[name] if name else 0
            if save_now:  # the saved wall time includes this epoch so far; the live count adds it at the end
                so_far = progress["wall_time_s"] + time.perf_counter() - t0
                ckpts.save("latest", state, dict(progress, wall_time_s=so_far))
                last_save = time.monotonic()
        bar.close()
        loss_sum, correct, n, _ = rt.host(state["acc"])
        (val_loss, val_acc), (test_loss, test_acc) = evaluate(state, val), evaluate(state, test)
        seconds = time.perf_counter() - t0
        progress["wall_time_s"] += seconds
        row = dict(epoch=epoch + 1, train_loss=float(loss_sum / max(n, 1)), train_acc=float(correct / max(n, 1)),
                   val_loss=val_loss, val_acc=val_acc, test_loss=test_loss, test_acc=test_acc, seconds=seconds,
                   steps_per_s=steps_per_epoch / seconds)
        for k in cfg.resolutions[1:]:  # zero-shot at another sampling rate: x[::k], steps × k
            row[f"val_acc@{k}"], row[f"test_acc@{k}"] = evaluate(state, val, k)[1], evaluate(state, test, k)[1]
        next_step = dataloaders.task_of(cfg.dataset) == "next_step"
        if next_step:  # nats per value → bits per dimension
            row.update({f"{s}_bpd": row[f"{s}_loss"] / np.log(2.0) for s in ("train", "val", "test")})
        progress["history"].append(row)
        if next_step:  # a non-finite best (e.g. a NaN first evaluation) is replaced by any finite loss
            best_loss = (progress["best"] or {}).get("val_loss", float("nan"))
            improved = not np.isfinite(best_loss) or val_loss < best_loss
        else:
            improved = progress["best"] is None or val_acc > progress["best"]["val_acc"]
        if improved:
            progress["best"] = {"epoch": epoch + 1, **{k: row[k] for k in BEST_FIELDS[1:] if k in row}}
        epochs_since_best = 0 if improved else epochs_since_best + 1
        progress["epoch"], progress["batch"] = epoch + 1, 0
        state["acc"] = rt.jax.device_put(np.zeros(4, np.float32), rt.replicated)
        ckpts.save("latest", state, progress)
        last_save = time.monotonic()
        if improved:
            ckpts.save("best", state, progress)
        report.results(progress, "running")
        report.epoch(row, progress)
        if after_epoch is not None:
            after_epoch(state, epoch + 1, report)
        if cfg.early_stop_patience and epochs_since_best >= cfg.early_stop_patience:
            report.say(f"early stop: no better validation {'loss' if next_step else 'accuracy'} for "
                       f"{epochs_since_best} epochs")
            break
    return state, "finished", 0


def sampler(cfg, rt, model, test, seq_len, run_dir):
    """--sample_every: a function (state, epoch, report) that draws --n_samples digits (process 0, on its host copy
    of the state) into <run_dir>/samples/epoch<k>.png and wandb; None when off. Bad sampling options are a RunError
    here, before any training."""
    if not cfg.sample_every:
        return None
    import sample

    try:
        prefix = sample.resolve_prefix(cfg.sample_prefix, seq_len)
        truth = sample.true_values(test, cfg.n_samples)
    except ValueError as e:
        raise RunError(f"--sample_every: {e} (--sample_prefix, --n_samples, --max_eval_samples)", 2) from None
    if not rt.main:
        return None
    draw = sample.Sampler(model)

    def after_epoch(state, epoch, report):
        if epoch % cfg.sample_every:
            return
        variables = {k: rt.jax.tree_util.tree_map(rt.host, state[k]) for k in ("params", "batch_stats")}
        drawn, seconds = draw(variables, truth, prefix, cfg.temperature, seed=cfg.jax_seed + epoch)
        path = sample.save_grid(run_dir / "samples" / f"epoch{epoch:03d}.png", truth, drawn, prefix)
        report.say(f"  samples: {path} ({len(truth)} digits, prefix {prefix}, temperature {cfg.temperature}, "
                   f"{seconds:.1f}s)")
        report.image(path, epoch, f"epoch {epoch}: true | sampled, first {prefix} pixels given")

    return after_epoch


def load_data(cfg):
    """(dataset, train, val, test) for a config: splits drawn with --split_seed, subsets by --max_*_samples."""
    try:
        opts = {"downsample": cfg.downsample} if "mnist" in cfg.dataset else {}
        ds = dataloaders.load(cfg.dataset, cfg.dir_name, seed=cfg.split_seed, speech_norm=cfg.speech_norm, **opts)
    except dataloaders.DataError as e:
        raise RunError(str(e), 2) from None
    train, val, test = ds.train, ds.val, ds.test
    if cfg.max_train_samples:
        train = train.subset(np.arange(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples:
        val = val.subset(np.arange(min(cfg.max_eval_samples, len(val))))
        test = test.subset(np.arange(min(cfg.max_eval_samples, len(test))))
    return ds, train, val, test


def new_state(params, batch_stats, tx):
    """The training state: parameters, BatchNorm statistics, optimiser state, and the on-device accumulator
    (loss·n, correct, n, non-finite steps) that train_step adds to."""
    import jax.numpy as jnp

    return {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
            "acc": jnp.zeros(4, jnp.float32)}


def make_steps(model, tx, dropout_key):
    """(train_step, eval_step), not yet jit-compiled.

    train_step(state, batch, step) → state: one optimiser step; a step whose loss is not finite changes no
    parameter and is counted in state["acc"][3] (the host looks at it every --log_every steps).
    state["acc"] accumulates (loss·n, correct, n, non-finite steps) on the device, so no step syncs the host.
    eval_step(state, batch) → (loss·n, correct, n).
    For next-step prediction (logits (B, L, classes)) a sequence's loss is its mean over positions (nats per
    value) and its "correct" the fraction of positions whose most likely value is the true one.
    """
    import jax
    import jax.numpy as jnp
    import optax

    def loss_fn(params, batch_stats, batch, rng, training):
        out = model.apply({"params": params, "batch_stats": batch_stats}, batch, training=training,
                          rngs={"dropout": rng}, mutable=["batch_stats"] if training else False)
        logits, new_stats = (out[0], out[1].get("batch_stats", batch_stats)) if training else (out, batch_stats)
        w = batch["weights"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        hit = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        if nll.ndim == 2:  # next-step prediction: per sequence, the mean over its positions (nats per value)
            nll, hit = nll.mean(axis=1), hit.mean(axis=1)
        loss = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
        correct = jnp.sum(hit * w)
        return loss, (new_stats, correct, jnp.sum(w))

    def train_step(state, batch, step):
        rng = jax.random.fold_in(dropout_key, step)
        (loss, (stats, correct, n)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], batch, rng, True)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ok = jnp.isfinite(loss)  # a non-finite step changes nothing; the host stops the run
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        acc = state["acc"] + jnp.array([jnp.where(ok, loss * n, 0.0), correct, n, 1.0 - ok])
        return {"params": keep(params, state["params"]), "batch_stats": keep(stats, state["batch_stats"]),
                "opt_state": keep(opt_state, state["opt_state"]), "acc": acc}

    def eval_step(state, batch):
        loss, (_, correct, n) = loss_fn(state["params"], state["batch_stats"], batch, dropout_key, False)
        return jnp.array([loss * n, correct, n])

    return train_step, eval_step


def load_weights(path, cfg, params, batch_stats):
    """Parameters from a checkpoint file; with --freeze base, an S5 checkpoint warm-starts the extension."""
    import jax
    from flax import serialization

    path = Path(path)
    if not path.exists():
        raise RunError(f"--load_checkpoint: no file {path}", 2)
    saved = utils.read_json(path.with_suffix(".json"))
    raw = serialization.msgpack_restore(path.read_bytes())
    if cfg.freeze == "base":
        if saved["config"].get("ssm_type") != "s5":
            raise RunError(f"--freeze base builds on an S5 checkpoint; {path} holds {saved['config'].get('ssm_type')}",
                           2)
        base = {k: v for k, v in saved["config"].items() if k in ARCH_FIELDS}
        check_architecture({**base, "ssm_type": cfg.ssm_type, "R": cfg.R, "extend_mode": cfg.extend_mode,
                            "delta_type": cfg.delta_type, "time_scale_type": cfg.time_scale_type}, cfg)
        new = jax.tree_util.tree_map(np.asarray, params)
        old = raw["params"]

        def merge(new_tree, old_tree, name):
            if name == "ssm":
                return ssm_ex.warm_start(old_tree, new_tree)
            if isinstance(new_tree, dict):
                return {k: merge(v, old_tree[k], k) for k, v in new_tree.items()}
            return old_tree

        return merge(new, old, ""), raw.get("batch_stats", batch_stats)
    check_architecture(saved["config"], cfg)
    restored = serialization.from_state_dict({"params": params, "batch_stats": batch_stats},
                                             {"params": raw["params"], "batch_stats": raw.get("batch_stats", {})})
    return restored["params"], restored["batch_stats"]


def read_run(run_dir, kind="best"):
    """(config namespace, model meta, state dict of numpy arrays) of a run's ckpt_<kind>: what rebuilds the
    model without the data (sample.py, inspect_run.py). A RunError says what is missing."""
    from flax import serialization

    ckpt = Path(run_dir) / f"ckpt_{kind}.msgpack"
    if not ckpt.exists():
        raise RunError(f"no checkpoint {ckpt}: is {run_dir} a run directory of train_ex.py? (--checkpoint "
                       f"best|latest picks which)", 2)
    if not ckpt.with_suffix(".json").exists():
        raise RunError(f"{ckpt} has no {ckpt.with_suffix('.json').name} beside it (the run's config): was it copied "
                       f"without it?", 2)
    config = utils.read_json(ckpt.with_suffix(".json"))["config"]
    meta = config.get("model_meta")
    if meta is None:
        raise RunError(f"{ckpt.with_suffix('.json')} has no model_meta (the dataset's shapes): it was written by an "
                       f"older train_ex.py; rerun or resume the run once to record them", 2)
    defaults = vars(make_parser().parse_args([]))  # options added since the run was made take their defaults
    return argparse.Namespace(**{**defaults, **config}), meta, serialization.msgpack_restore(ckpt.read_bytes())


def start_wandb(cfg, config, run_dir):
    mode = os.environ.get("WANDB_MODE") or ("online" if cfg.use_wandb else "offline")
    if mode == "disabled":
        return None
    try:
        import wandb

        return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_run_name, config=config,
                          dir=str(run_dir), mode=mode)
    except Exception as e:  # logging must never cost a run
        print(f"warning: wandb logging is off ({e})", file=sys.stderr)
        return None


def main(argv=None):
    cfg = parse_args(argv)
    try:
        return run(cfg)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
