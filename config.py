"""The training run's options: the command line of train_ex.py and its checks; the plans (plans/*.plan: the series,
the studies and the S5 recipes), read and checked for run_train_ex.sh.

    cfg = config.parse_args(["--dataset", "mnist-classification", "--ssm_type", "aux"])

A library file (bench.py, inspect_run.py and the tests build configs too). The model's own options take their
defaults from models.MODEL_DEFAULTS; every check that needs only the options is here, before any data is read.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import dataloaders
import models
import ssm
import tasks
import utils

Flag = argparse.BooleanOptionalAction  # --name / --no-name


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: every option's default after its help line, unless the line says its default itself (a default that
    depends on other options); the description's lines as written."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def make_parser():
    p = argparse.ArgumentParser(prog="train_ex.py", description=DESCRIPTION, formatter_class=HelpFormatter)
    for add in (_data_options, _model_options, _ssm_type_options, _optimisation_options, _run_options,
                _generation_options, _logging_options):
        add(p)
    p.set_defaults(**models.LAYER_DEFAULTS)
    return p


DESCRIPTION = """Train S5 and its time-varying extensions on the LRA tasks and sequential MNIST/CIFAR.

    python train_ex.py --enable_auxiliary_state --time_scale_type sinusoidal
    python train_ex.py --dataset listops-classification --ssm_type extend --R 10 --extend_mode full

The S5 recipes of each task are in TRAINING.md. Every run writes `results.json`, `ckpt_latest.msgpack` and
`ckpt_best.msgpack` (plus their .json metadata) into its run directory."""


def _data_options(p):
    """Which data, how much of it, how it is batched and evaluated."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="listops-classification", choices=list(dataloaders.DATASETS),
                   help="the diagnostics (tasks.py; generated in memory, sizes from --data_options): "
                   + "; ".join(f"{t.name} ({t.doc})" for t in tasks.TASKS.values()))
    g.add_argument("--data_options", default="", help="diagnostic datasets: KEY=VALUE,... over their defaults: "
                   + "; ".join(f"{t.name}: " + ",".join(f"{k}={v}" for k, v in t.defaults.items())
                               for t in tasks.TASKS.values()))
    g.add_argument("--dir_name", default="./data", help="data root (see download_lra.sh)")
    g.add_argument("--bsz", type=int, default=32, help="batch size (global, over all devices)")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="use only this many training samples (default: all)")
    g.add_argument("--max_eval_samples", type=int, default=None,
                   help="use only this many val/test samples (default: all)")
    g.add_argument("--downsample", type=int, default=1, help="MNIST only: k×k average pooling (28/k)² steps")
    g.add_argument("--eval_resolutions", default="1", help="also evaluate val and test on every k-th sample "
                   "(x[::k]) with the model's steps × k, for each k listed (e.g. 1,2: the S5 Speech recipe's "
                   "zero-shot 8 kHz evaluation); results carry val_acc@k and test_acc@k")
    g.add_argument("--speech_norm", default="global", choices=dataloaders.SPEECH_NORMS,
                   help="speech35-classification: standardise the audio with one training mean and std (global) or "
                   "as the S5 release, every time step by its own training mean and std + 0.328 (release; TRAINING.md)")
    g.add_argument("--buckets", action=Flag, default=True,
                   help="length buckets (L/4, L/2, 3L/4, L) for padded datasets: fewer padded steps, 4 shapes "
                   "(the S5 release: --no-buckets, every batch padded to L, uniform random batches)")
    g.add_argument("--mask_padding", action=Flag,
                   help="zero padded positions before every SSM, so padding changes no real position's state "
                   "(the S5 release: --no-mask_padding, its scans and BatchNorm see the padding)")


def _model_options(p):
    """The network: SSM type and size, layer layout, encoders (defaults: models.LAYER_DEFAULTS)."""
    g = p.add_argument_group("model")
    g.add_argument("--ssm_type", choices=list(ssm.TYPES),
                   help="the sequence layer: " + "; ".join(f"{d.name} ({d.summary})" if len(d.names) == 1 else
                                                          f"{'/'.join(d.names)} ({d.summary})"
                                                          for d in ssm.declarations())
                   + f"; a type of your own: its file in {ssm.PLUGIN_VARIABLE} (TRAINING.md)")
    g.add_argument("--enable_auxiliary_state", action="store_true", help="the lab's spelling of --ssm_type aux")
    g.add_argument("--d_model", type=int, help="model width H (features per step)")
    g.add_argument("--n_layers", type=int, help="number of sequence layers")
    g.add_argument("--ssm_size_base", type=int, help="state size P (N per feature for s4/s4d/dss)")
    g.add_argument("--bidirectional", action=Flag, help="a forward and a backward scan per layer, concatenated")
    g.add_argument("--activation_fn", choices=models.ACTIVATIONS, help="after the SSM: a GLU variant or GELU")
    g.add_argument("--prenorm", action=Flag, help="normalise before the SSM (else after the residual)")
    g.add_argument("--batchnorm", action=Flag,
                   help="BatchNorm (else LayerNorm); default: on, except for next-step datasets (mnist), which refuse "
                   "it: its batch statistics in training would mix later positions into every position")
    g.add_argument("--bn_momentum", type=float, help="BatchNorm running-statistics momentum")
    g.add_argument("--p_dropout", type=float, help="dropout rate")
    g.add_argument("--mode", choices=("pool", "last"), help="pooling over time")
    g.add_argument("--token_encoder", choices=models.TOKEN_ENCODERS,
                   help="token datasets: onehot = the S5 release's Dense with bias on one-hot tokens; embed = "
                   "nn.Embed")
    g.add_argument("--pixel_tokens", action=Flag,
                   help="--dataset mnist (next-pixel prediction): feed the previous pixel as one of 256 tokens "
                   "(encoded by --token_encoder; Annotated S4's embedding=true is --pixel_tokens --token_encoder "
                   "embed) instead of its value/255 through a Dense layer")


def _ssm_type_options(p):
    """Every SSM type's own options (ssm.register), one group per type; an option several types share appears with
    the first of them."""
    seen = set()
    for decl in ssm.declarations():
        new = [o for o in decl.options if o.name not in seen]
        if not new:
            continue
        g = p.add_argument_group(f"--ssm_type {'/'.join(decl.names)}" + (f" ({decl.module})" if decl.module else ""))
        for o in new:
            g.add_argument(f"--{o.name}", default=o.default, **o.argparse_kw())
            seen.add(o.name)


def _optimisation_options(p):
    """Optimiser groups, learning-rate schedule, stopping, seeds."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=50, help="passes over the training set")
    g.add_argument("--lr", type=float, default=1e-3,
                   help="global learning rate (the SSM group gets lr/lr_factor) unless --ssm_lr_base is given")
    g.add_argument("--ssm_lr_base", type=float, default=None,
                   help="S5's spelling: SSM learning rate; the global one is then lr_factor × ssm_lr_base (default: "
                   "unset, --lr sets the rates)")
    g.add_argument("--lr_factor", type=float, default=1.0, help="ratio of the global to the SSM learning rate")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay of the regular group")
    g.add_argument("--opt_config", default="standard", choices=("standard", "BandCdecay", "BfastandCdecay",
                                                                "noBCdecay"),
                   help="the S5 release's groups for B, C, D (Λ and E, F are always in the SSM group, at the SSM rate "
                   "without decay): standard = B in the SSM group; BandCdecay = B at the SSM rate with decay; "
                   "BfastandCdecay = B and C regular; noBCdecay = B, C and D in the SSM group")
    g.add_argument("--dt_global", action="store_true", help="log_step in the regular group")
    g.add_argument("--warmup_end", type=int, default=1, help="epochs of linear warm-up")
    g.add_argument("--lr_min", type=float, default=0.0, help="the cosine schedule's final learning rate")
    g.add_argument("--cosine_anneal", action=Flag, default=True, help="cosine decay after the warm-up (else constant)")
    g.add_argument("--grad_clip", type=float, default=None, help="clip the global gradient norm (off by default)")
    g.add_argument("--early_stop_patience", type=int, default=None, help="stop after this many epochs without "
                   "a better validation accuracy (default: never)")
    g.add_argument("--jax_seed", type=int, default=1919, help="initialisation, dropout and shuffling")
    g.add_argument("--split_seed", type=int, default=42, help="the held-out splits (val; Pathfinder/Path-X val and "
                   "test): fixed at the S5 release's 42 so that every run is tested on the same images")


def _run_options(p):
    """Run directory, checkpoints, several processes, wandb."""
    g = p.add_argument_group("runs, checkpoints, logging")
    g.add_argument("--run_dir", default=None, help="default: a new folder under runs/")
    g.add_argument("--resume", action="store_true", help="continue the run in --run_dir from ckpt_latest")
    g.add_argument("--load_checkpoint", default=None, help="initialise from this checkpoint file (default: none)")
    g.add_argument("--freeze", default=None, choices=("base",), help="with --load_checkpoint: train only the "
                   "extension on top of a loaded S5 model")
    g.add_argument("--eval_only", action="store_true", help="evaluate --load_checkpoint and exit")
    g.add_argument("--max_steps", type=int, default=None,
                   help="stop (resumably) after this many steps (default: no limit)")
    g.add_argument("--ckpt_every_min", type=float, default=30.0, help="also write ckpt_latest inside an epoch every "
                   "this many minutes (0: only at epoch ends), so a killed job loses at most about that much")
    g.add_argument("--lock_wait", type=float, default=None, help="seconds to wait for a run directory that another "
                   "process holds (its run.lock) before exiting with code 6 (default: 0, at once; 300 in a requeued "
                   "SLURM job, SLURM_RESTART_COUNT > 0, whose predecessor may still be saving)")
    g.add_argument("--check_memory", action=Flag, default=True, help="before the first step, compare XLA's estimate "
                   "of a training step with the device's free memory and exit with code 5 when it does not fit, "
                   "naming the largest --bsz that does (default: on)")
    g.add_argument("--distributed", action="store_true", help="several processes (hosts) with jax.distributed: "
                   "alone under SLURM / Open MPI (peers found from the environment), elsewhere with the next three")
    g.add_argument("--coordinator", default=None, help="--distributed: HOST:PORT of process 0")
    g.add_argument("--num_processes", type=int, default=None, help="--distributed: how many processes")
    g.add_argument("--process_id", type=int, default=None, help="--distributed: this process's index, 0..N-1")
    g.add_argument("--use_wandb", action="store_true", help="log to wandb online (default: offline; WANDB_MODE "
                   "wins when set)")
    g.add_argument("--wandb_project", default="s5-ex", help="wandb project")
    g.add_argument("--wandb_entity", default=None, help="wandb entity (user or team)")
    g.add_argument("--wandb_run_name", default=None, help="wandb run name (default: wandb's)")


def _generation_options(p):
    """Sampling during training of next-step models."""
    g = p.add_argument_group("generation (--dataset mnist)")
    g.add_argument("--sample_every", type=int, default=0, help="draw --n_samples digits every this many epochs "
                   "(0: never) into <run_dir>/samples/epoch<k>.png (true | sampled) and wandb")
    g.add_argument("--n_samples", type=int, default=8, help="digits per --sample_every grid")
    g.add_argument("--sample_prefix", type=int, default=None, help="pixels of each true test image given before "
                   "sampling (0: unconditional; default: the first 11/28 of the rows, 308 pixels at 28×28)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: the most likely pixel)")


def _logging_options(p):
    """Console and host-sync interval."""
    g = p.add_argument_group("logging")
    g.add_argument("--log_every", type=int, default=25, help="steps between progress-bar updates and the "
                   "non-finite-loss check (with several processes also their agreed stop and checkpoint decisions)")


# options that may differ from the run's own when it is resumed: how long it goes on, where its data and
# processes are, how it logs; every other option given with --resume must equal the run directory's
RESUME_MAY_CHANGE = ("epochs", "max_steps", "early_stop_patience", "ckpt_every_min", "lock_wait", "check_memory",
                     "dir_name", "run_dir", "resume",
                     "eval_only", "distributed", "coordinator", "num_processes", "process_id", "use_wandb",
                     "wandb_project", "wandb_entity", "wandb_run_name", "log_every", "sample_every", "n_samples",
                     "sample_prefix", "temperature")


def parse_args(argv=None):
    """The options of a command line (argv: a list of words, default sys.argv), checked; a bad combination exits
    2 with argparse's usage line and a message saying what to change.

    With --resume --run_dir DIR the run's own options (the config of DIR's newest checkpoint metadata) are the
    defaults: `--resume --run_dir DIR` alone continues the run as it was started. Options given as well must
    equal the run's, except RESUME_MAY_CHANGE (e.g. --epochs to extend it, --dir_name when the data has moved);
    the differences are listed and refused."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.resume and args.run_dir:
        saved = saved_config(args.run_dir)
        if saved is not None:
            args = _resumed(parser, argv, args, saved)
    if args.enable_auxiliary_state:
        if args.ssm_type not in ("s5", "aux"):
            parser.error(f"--enable_auxiliary_state means --ssm_type aux, not {args.ssm_type}")
        args.ssm_type = "aux"
    _check_type_options(args, given_options(parser, argv), parser.error)
    for check in (_check_sizes, _check_task, _check_run):
        check(args, parser.error)
    _derive(args, parser.error)
    return args


def saved_config(run_dir) -> dict | None:
    """The options a run directory's newest checkpoint metadata records (ckpt_latest, the one before it, else
    ckpt_best), or None when none can be read."""
    for kind in ("latest", "latest.prev", "best"):
        try:
            config = utils.read_json(utils.checkpoint_path(run_dir, kind).with_suffix(".json"))["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(config, dict):
            return config
    return None


def given_options(parser, argv) -> dict:
    """The options a command line gives explicitly (dest → value), without any default."""
    quiet = make_parser()
    quiet._defaults.clear()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return vars(quiet.parse_args(argv))


def _resumed(parser, argv, args, saved: dict):
    """The options of a resumed run: the run directory's, overridden by those given (which must agree)."""
    given = given_options(parser, argv)
    dests = set(vars(args))
    inherit = dests - {"resume", "run_dir", "max_steps", "eval_only"}  # those are this invocation's own
    legacy = {k: v for k, v in models.LEGACY_DEFAULTS.items() if k not in saved}  # options newer than the run
    merged = {**vars(args), **legacy, **{k: v for k, v in saved.items() if k in inherit}, **given}
    diff = [f"{k}: checkpoint {saved[k]!r} vs now {v!r}" for k, v in given.items()
            if k in saved and k not in RESUME_MAY_CHANGE and k != "enable_auxiliary_state" and saved[k] != v]
    if given.get("enable_auxiliary_state") and saved.get("ssm_type") not in (None, "aux"):
        diff.append(f"ssm_type: checkpoint {saved['ssm_type']!r} vs now 'aux' (--enable_auxiliary_state)")
    if diff:
        may = ", ".join(f"--{k}" for k in RESUME_MAY_CHANGE)
        parser.error(f"--resume: options differ from the run in {args.run_dir}:\n  " + "\n  ".join(diff) +
                     f"\n`--resume --run_dir {args.run_dir}` alone continues with the run's own options; of the "
                     f"others only these may change on resume: {may}")
    return argparse.Namespace(**merged)


def _check_type_options(args, given: dict, error):
    """An SSM type's own option given to another type, with a value other than its default, is an error naming
    the types that take it; then the chosen type's own checks (its declaration's `check`)."""
    decl = ssm.TYPES[args.ssm_type]
    foreign = [name for name, value in given.items() if name in ssm.OPTIONS and name not in decl.option_names()
               and value != ssm.OPTIONS[name].default]
    if foreign:
        error("\n  ".join([f"--ssm_type {args.ssm_type} does not take " + ", ".join(f"--{n}" for n in foreign) + ":"]
                          + [f"--{n} is an option of --ssm_type {', '.join(ssm.types_taking(n))}" for n in foreign]))
    if decl.check:
        decl.check(args, error)


def _check_sizes(args, error):
    for name in ("bsz", "epochs", "d_model", "n_layers", "ssm_size_base"):
        if getattr(args, name) < 1:
            error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.p_dropout < 1:
        error(f"--p_dropout must be in [0, 1), got {args.p_dropout}")


def _check_task(args, error):
    """What the dataset's task allows; sets the dataset-dependent default of --batchnorm."""
    if args.downsample != 1 and "mnist" not in args.dataset:
        error("--downsample applies to mnist-classification and pmnist-classification only")
    if args.speech_norm != "global" and args.dataset != "speech35-classification":
        error("--speech_norm applies to speech35-classification only")
    task = dataloaders.task_of(args.dataset)
    next_step = task == "next_step"
    if args.data_options or args.dataset in tasks.TASKS:
        try:
            dataloaders.parse_options(args.dataset, args.data_options)
        except dataloaders.DataError as e:
            error(f"--data_options: {e}")
        if args.eval_resolutions != "1":
            error(f"--eval_resolutions applies to the classification datasets, not the diagnostic {args.dataset}: "
                  f"every k-th step would drop the tokens or markers the answer depends on")
    if task in ("per_position", "per_position_regression") and args.mode != "pool":
        error(f"--dataset {args.dataset} answers at every scored position, with no pooling over time: --mode "
              f"{args.mode} does not apply (leave it at pool)")
    if next_step:
        causal = f"--dataset {args.dataset} predicts each value from the ones before it, so the model must be causal"
        if args.bidirectional:
            error(f"{causal}: --bidirectional is not allowed (use --no-bidirectional)")
        if args.batchnorm:
            error(f"{causal}: --batchnorm is not allowed (its batch statistics in training mix later pixels "
                  f"into every position); the default for this dataset is LayerNorm")
        if args.mode != "pool":
            error(f"--mode pools a classifier's outputs; --dataset {args.dataset} predicts at every position")
        if args.eval_resolutions != "1":
            error(f"--eval_resolutions applies to classification datasets, not --dataset {args.dataset}")
    elif args.sample_every or args.pixel_tokens:
        error(f"--sample_every and --pixel_tokens apply to next-step datasets (mnist), not {args.dataset}")
    if args.batchnorm is None:
        args.batchnorm = not next_step
    if (args.sample_every < 0 or args.n_samples < 1 or not 0 <= args.temperature < float("inf")
            or (args.sample_prefix is not None and args.sample_prefix < 0)):
        error("need --sample_every >= 0, --n_samples >= 1, a finite --temperature >= 0, --sample_prefix >= 0")


def _check_run(args, error):
    """Checkpoint, resume and multi-process options."""
    if args.freeze and not args.load_checkpoint:
        error("--freeze base needs --load_checkpoint (the S5 checkpoint to build on)")
    if args.freeze and not ssm.TYPES[args.ssm_type].frozen_base:
        extensions = ", ".join(d.name for d in ssm.declarations() if d.frozen_base)
        error(f"--freeze base trains only an extension on top of an S5 checkpoint: use --ssm_type {extensions} "
              f"(--ssm_type {args.ssm_type} has no S5 base to freeze; train it whole, without --freeze)")
    if args.eval_only and not (args.load_checkpoint or args.resume):
        error("--eval_only needs --load_checkpoint (or --resume with --run_dir)")
    if args.resume and not args.run_dir:
        error("--resume needs --run_dir (the run to continue)")
    manual = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if any(manual) and not (all(manual) and args.distributed):
        error("--coordinator, --num_processes and --process_id go together, with --distributed")
    if all(manual) and not 0 <= args.process_id < args.num_processes:
        error(f"--process_id must be in 0..{args.num_processes - 1}, got {args.process_id}")
    if args.distributed and not args.run_dir and not args.eval_only:
        error("--distributed needs --run_dir (every process must name the same run)")
    if args.lock_wait is not None and not 0 <= args.lock_wait < float("inf"):
        error(f"--lock_wait must be a number of seconds >= 0, got {args.lock_wait}")
    if args.ckpt_every_min < 0:
        error(f"--ckpt_every_min must be >= 0, got {args.ckpt_every_min}")


def _derive(args, error):
    """args.resolutions (sorted rates of --eval_resolutions) and the two learning rates: args.ssm_lr (the SSM
    group) and args.global_lr (everything else)."""
    try:
        args.resolutions = sorted({int(k) for k in str(args.eval_resolutions).split(",")})
    except ValueError:
        error(f"--eval_resolutions takes integers separated by commas, e.g. 1,2; got {args.eval_resolutions!r}")
    if args.resolutions[0] < 1 or 1 not in args.resolutions:
        error(f"--eval_resolutions must list 1 (the normal evaluation) and rates >= 1, got {args.eval_resolutions!r}")
    if args.ssm_lr_base is not None:
        args.ssm_lr, args.global_lr = args.ssm_lr_base, args.lr_factor * args.ssm_lr_base
    else:
        args.ssm_lr, args.global_lr = args.lr / args.lr_factor, args.lr


def s5_recipes(path=None) -> dict:
    """The S5 release's recipes: {dataset: the words of its command after `train_ex.py`}, read from the plan
    plans/s5_recipes.plan (their one written copy: TRAINING.md's commands are generated from it and tested; the
    tests check them against the release's settings; bench.py measures them)."""
    return {dataset: argv for argv, dataset in s5_recipes_by_name(path).values()}


def s5_recipes_by_name(path=None) -> dict:
    """{the recipe's short name (listops, text, ..., speech): (its words after train_ex.py, its dataset)}."""
    plan = read_plan(path or "s5_recipes")
    recipes = {}
    for group in plan.groups:
        for s in group.settings:
            argv = plan.common + group.flags + s.flags
            recipes[s.name] = (argv, argv[argv.index("--dataset") + 1])
    return recipes


def recipe_commands(path=None) -> str:
    """TRAINING.md's block of recipe commands, generated from plans/s5_recipes.plan."""
    plan = read_plan(path or "s5_recipes")
    lines = [f'S5="{shlex.join(plan.common)}"']
    for group in plan.groups:
        lines += [f"python train_ex.py $S5 {shlex.join(group.flags + s.flags)}" for s in group.settings]
    return "\n".join(lines)


# ---- plans: the series and studies of run_train_ex.sh as data ----------------------------------------------------
PLANS = Path(__file__).resolve().parent / "plans"
PLAN_VARIABLES = ("DATASET", "EPOCHS", "SEEDS", "OUT_ROOT")  # the run_train_ex.sh variables a plan may default
SETTING_OPTIONS = ("seeds", "after", "smoke", "tune")


class PlanError(ValueError):
    """A plan file that cannot be read: the message names the file, the line and what to change."""


@dataclass
class Setting:
    name: str
    flags: list
    seeds: int | None = None  # only the first `seeds` of the series' SEEDS
    after: str | None = None  # starts from this setting's ckpt_best.msgpack (same group and seed), after it
    smoke: list | None = None  # flags instead of `flags` under SMOKE=1
    tune: bool = True  # tuned when the plan has a `tune` line


@dataclass
class Group:
    name: str
    flags: list
    about: str = ""
    variables: dict = field(default_factory=dict)
    settings: list = field(default_factory=list)
    smoke: list | None = None  # flags instead of `flags` under SMOKE=1 (e.g. a small --data_options)


@dataclass
class Tune:
    """Each setting first runs once per value of `flag` at seed `seed`; its seeds then use the value whose run
    has the best validation score (utils.selection_score)."""
    flag: str
    values: list
    seed: int


@dataclass
class Plan:
    name: str
    path: Path
    defaults: dict = field(default_factory=dict)
    common: list = field(default_factory=list)
    data: list = field(default_factory=list)  # data the series makes before its runs (split-mnist)
    smoke: list = field(default_factory=list)  # SMOKE=1: tiny sizes, after the group's flags
    tune: Tune | None = None
    groups: list = field(default_factory=list)
    about: str = ""
    shared: list = field(default_factory=list)  # the settings every group without its own runs, as written

    def sets_dataset(self) -> bool:
        return "--dataset" in self.common or any("--dataset" in g.flags for g in self.groups)

    def datasets(self, default=None) -> list:
        """The --dataset of each group (the common one, else `default`)."""
        out = []
        for g in self.groups:
            argv = ([] if default is None else ["--dataset", default]) + self.common + g.flags
            out.append(argv[len(argv) - 1 - argv[::-1].index("--dataset") + 1] if "--dataset" in argv else None)
        return out


def plan_path(name) -> Path:
    """A plan by name (plans/NAME.plan) or by path."""
    name = str(name)
    if "/" in name or name.endswith(".plan"):
        return Path(name)
    return PLANS / f"{name}.plan"


def plan_names() -> list:
    return sorted(p.stem for p in PLANS.glob("*.plan"))


def _options(text: str, where: str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(";"))):
        key, eq, value = item.partition("=")
        if not eq:
            raise PlanError(f"{where}: '{item}' is not key=value (options are separated by ';')")
        out[key.strip()] = value.strip()
    return out


def read_plan(name) -> Plan:
    """Read a plan file: lines of fields separated by '|' (SERIES.md, "Plans"); a line starting with # is a comment.

        default | VARIABLE | value                the run_train_ex.sh variable's value unless the environment sets it
        common  | flags                           train_ex.py flags of every run
        smoke   | flags                           SMOKE=1: tiny sizes (after the group's flags)
        data    | split-mnist                     data the series makes first (STUDY's psMNIST split)
        tune    | flag | v1 v2 v3 | seed=K       tune `flag` per setting on validation (Tune)
        about   | text                            what the plan is (run_train_ex.sh --help)
        group   | name | flags | about=...; smoke=flags; key=value  a group; its settings' flags may use {key}
        setting | name | flags | seeds=N; after=NAME; smoke=flags; tune=no

    Settings before the first group are shared: every group without settings of its own runs them."""
    path = plan_path(name)
    if not path.is_file():
        raise PlanError(f"no plan {path} (plans: {', '.join(plan_names())}; or give a file's path)")
    plan = Plan(name=path.stem, path=path)
    shared = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{n}"
        fields = [f.strip() for f in line.split("|")]
        kind, rest = fields[0], fields[1:]

        def need(k, at_most=None, kind=kind, rest=rest, where=where):
            if len(rest) < k or (at_most is not None and len(rest) > at_most):
                raise PlanError(f"{where}: a '{kind}' line has {k}{'' if at_most == k else f' to {at_most}'} "
                                f"fields after '{kind}', got {len(rest)}")
        try:
            if kind == "about":
                need(1, 1)
                plan.about = rest[0]
            elif kind == "default":
                need(2, 2)
                if rest[0] not in PLAN_VARIABLES:
                    raise PlanError(f"{where}: a plan may default only {', '.join(PLAN_VARIABLES)}, not {rest[0]}")
                plan.defaults[rest[0]] = rest[1]
            elif kind == "common":
                need(1, 1)
                plan.common += shlex.split(rest[0])
            elif kind == "smoke":
                need(1, 1)
                plan.smoke += shlex.split(rest[0])
            elif kind == "data":
                need(1, 1)
                if rest[0] != "split-mnist":
                    raise PlanError(f"{where}: the data a series can make is split-mnist, not '{rest[0]}'")
                plan.data.append(rest[0])
            elif kind == "tune":
                need(3, 3)
                values = rest[1].split()
                opts = _options(rest[2], where)
                if not rest[0].startswith("--") or len(values) < 2 or set(opts) != {"seed"} \
                        or not opts["seed"].isdigit():
                    raise PlanError(f"{where}: a tune line is `tune | --flag | v1 v2 ... | seed=K` (two values or "
                                    f"more)")
                plan.tune = Tune(rest[0], values, int(opts["seed"]))
            elif kind == "group":
                need(1, 3)
                rest += [""] * (3 - len(rest))
                opts = _options(rest[2], where)
                _name_ok(rest[0], where)
                if rest[0] in {g.name for g in plan.groups}:
                    raise PlanError(f"{where}: group '{rest[0]}' is declared twice")
                smoke = shlex.split(opts.pop("smoke")) if "smoke" in opts else None
                plan.groups.append(Group(rest[0], shlex.split(rest[1]), opts.pop("about", ""), opts, smoke=smoke))
            elif kind == "setting":
                need(1, 3)
                rest += [""] * (3 - len(rest))
                opts = _options(rest[2], where)
                unknown = set(opts) - set(SETTING_OPTIONS)
                if unknown:
                    raise PlanError(f"{where}: unknown setting option(s) {sorted(unknown)}; a setting takes "
                                    f"{', '.join(SETTING_OPTIONS)}")
                if "seeds" in opts and not (opts["seeds"].isdigit() and int(opts["seeds"]) >= 1):
                    raise PlanError(f"{where}: seeds must be a positive integer, got '{opts['seeds']}'")
                if opts.get("tune", "yes") not in ("yes", "no"):
                    raise PlanError(f"{where}: tune must be yes or no, got '{opts['tune']}'")
                _name_ok(rest[0], where)
                s = Setting(rest[0], shlex.split(rest[1]), int(opts["seeds"]) if "seeds" in opts else None,
                            opts.get("after"), shlex.split(opts["smoke"]) if "smoke" in opts else None,
                            opts.get("tune", "yes") == "yes")
                target = plan.groups[-1].settings if plan.groups else shared
                if s.name in {t.name for t in target}:
                    raise PlanError(f"{where}: setting '{s.name}' appears twice in its group")
                target.append(s)
            else:
                raise PlanError(f"{where}: unknown line kind '{kind}' (about, default, common, smoke, data, tune, "
                                f"group, setting)")
        except ValueError as e:  # shlex: an unclosed quote
            raise e if isinstance(e, PlanError) else PlanError(f"{where}: {e}") from None
    plan.shared = shared
    if not plan.groups:
        raise PlanError(f"{path}: no group (a plan needs at least one `group | name | flags` line)")
    for g in plan.groups:
        if not g.settings:
            if not shared:
                raise PlanError(f"{path}: group '{g.name}' has no settings and the plan has no shared ones")
            g.settings = [Setting(s.name, list(s.flags), s.seeds, s.after, s.smoke, s.tune) for s in shared]
        names = {s.name for s in g.settings}
        for s in g.settings:
            if s.after and s.after not in names:
                raise PlanError(f"{path}: setting '{s.name}' of group '{g.name}' starts after '{s.after}', which "
                                f"the group does not have")
            if s.after and plan.tune and s.tune:
                raise PlanError(f"{path}: setting '{s.name}' of group '{g.name}' is both tuned and a warm start "
                                f"(after=); give it tune=no")
            for flags in (s.flags, s.smoke or []):
                flags[:] = [_substitute(w, g.variables, f"{path}: group '{g.name}', setting '{s.name}'")
                            for w in flags]
    return plan


def _name_ok(name: str, where: str):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name or ""):
        raise PlanError(f"{where}: '{name}' is not a usable name (letters, digits, . _ + -; it becomes a folder)")


def _substitute(word: str, variables: dict, where: str) -> str:
    def value(m):
        if m.group(1) not in variables:
            raise PlanError(f"{where}: {{{m.group(1)}}} is not a variable of the group (its options: "
                            f"{', '.join(variables) or 'none'})")
        return variables[m.group(1)]
    return re.sub(r"\{(\w+)\}", value, word)


def group_flags(group: Group, smoke: bool) -> list:
    return group.smoke if smoke and group.smoke is not None else group.flags


def plan_runs(plan: Plan, seeds: list, groups: list | None = None, smoke: bool = False, only=()) -> list:
    """The runs of a plan, in order: dicts with id (GROUP/SETTING/seedK), order, g (1-based group index), group,
    setting, seed, flags (the plan's: common, group, setting), role (run, tune or tuned), deps (the ids it waits
    for) and, for a tuned run, tune (the flag and its candidate runs' ids). `groups` (1-based) and the globs
    `only` (over ids) select runs; a selected run's dependencies are not added by them."""
    groups = groups or list(range(1, len(plan.groups) + 1))
    bad = [g for g in groups if not 1 <= g <= len(plan.groups)]
    if bad:
        raise PlanError(f"GROUPS must be numbers 1 to {len(plan.groups)} (the groups of plan {plan.name}), got "
                        f"{' '.join(map(str, bad))}")
    runs = []
    for gi in sorted(set(groups)):
        group = plan.groups[gi - 1]
        for j, s in enumerate(group.settings, 1):
            flags = plan.common + group_flags(group, smoke) + (s.smoke if smoke and s.smoke is not None else s.flags)
            base = dict(order=100 * gi + j, g=gi, group=group.name)
            tune_ids = []
            if plan.tune and s.tune:
                t = plan.tune
                for v in t.values:
                    name = f"{s.name}/{t.flag.lstrip('-')}={v}"
                    tune_ids.append(f"{group.name}/{name}/seed{t.seed}")
                    runs.append(dict(base, id=tune_ids[-1], setting=name, seed=t.seed, flags=flags + [t.flag, v],
                                     role="tune", deps=[], tune_of=s.name))
            for seed in seeds[:s.seeds] if s.seeds else seeds:
                run = dict(base, id=f"{group.name}/{s.name}/seed{seed}", setting=s.name, seed=seed, flags=list(flags),
                           role="tuned" if tune_ids else "run", deps=list(tune_ids))
                if tune_ids:
                    run["tune"] = {"flag": plan.tune.flag, "runs": tune_ids}
                if s.after:
                    run["after"] = f"{group.name}/{s.after}/seed{seed}"
                    run["deps"] = [run["after"]]
                runs.append(run)
    if only:
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r["id"], pat) for pat in only)]
    return runs


def check_plan(plan: Plan, head: list, tail: list, smoke: bool = False, groups=None):
    """Every distinct setting's command line in the plan's groups (all, or the 1-based `groups`), checked by
    parse_args, composed as series_runs composes it (head: before the plan's flags, tail: after them); raises
    PlanError naming the first setting that is refused and why."""
    import contextlib
    import io
    seen = set()
    for gi, group in enumerate(plan.groups, 1):
        if groups and gi not in groups:
            continue
        for s in group.settings:
            argv = head + plan.common + group_flags(group, smoke) + (plan.smoke if smoke else []) \
                + (s.smoke if smoke and s.smoke is not None else s.flags) + tail
            if plan.tune and s.tune:
                argv += [plan.tune.flag, plan.tune.values[0]]
            if s.after:
                argv += ["--load_checkpoint", f"{s.after}/ckpt_best.msgpack"]  # made by the run it starts after
            if tuple(argv) in seen:
                continue
            seen.add(tuple(argv))
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    parse_args(argv)
            except SystemExit:
                text = err.getvalue()
                why = text.split("train_ex.py: error: ", 1)[-1].strip() if "error: " in text else "exit 2"
                raise PlanError(f"group {gi} '{group.name}', setting '{s.name}' of plan {plan.name}: train_ex.py "
                                f"refuses its flags ({shlex.join(argv)}): {' '.join(why.split())}") from None


def _setting_text(s: Setting, smoke=False) -> tuple:
    flags = s.smoke if smoke and s.smoke is not None else s.flags
    options = ([f"{s.seeds} seeds"] if s.seeds else []) + ([f"from {s.after}"] if s.after else []) \
        + (["not tuned"] if not s.tune else [])
    return " ".join(flags), ", ".join(options)


def plan_table(plan: Plan, markdown: bool = False) -> str:
    """The plan's groups and settings as text (run_train_ex.sh --help) or Markdown tables (SERIES.md): the groups
    (number, name, what, flags, variables), then the settings, once when they are shared by every group."""
    lines, md = [], markdown
    shared = bool(plan.shared)
    if md:
        lines += ["| group | about | flags | variables |", "|---|---|---|---|"]
    for gi, g in enumerate(plan.groups, 1):
        variables = ", ".join(f"{k}={v}" for k, v in g.variables.items())
        if md:
            lines.append(f"| {gi} `{g.name}` | {g.about} | `{' '.join(g.flags)}` | {variables} |")
            continue
        lines.append(f"  group {gi}  {g.name}" + (f": {g.about}" if g.about else ""))
        if g.flags:
            lines.append(f"      flags: {shlex.join(g.flags)}" + (f"  ({variables})" if variables else ""))
        if not shared:
            for st in g.settings:
                flags, options = _setting_text(st)
                lines.append(f"      {st.name}: {flags or '(no flags)'}" + (f"  [{options}]" if options else ""))
    settings = ([(None, st) for st in plan.shared] if shared
                else [(g.name, st) for g in plan.groups for st in g.settings])
    if md:
        lines += ["", "| " + ("" if shared else "group | ") + "setting | flags | options |",
                  "|---|---|---|" + ("" if shared else "---|")]
        for group, st in settings:
            flags, options = _setting_text(st)
            lines.append("| " + ("" if shared else f"{group} | ") + f"{st.name} | `{flags}` | {options} |")
    elif shared:
        lines.append("  every group runs these settings:")
        for _, st in settings:
            flags, options = _setting_text(st)
            lines.append(f"      {st.name}: {flags}" + (f"  [{options}]" if options else ""))
    if plan.common:
        lines.append(("\n" if md else "  ") + f"Every run: `{shlex.join(plan.common)}`." if md
                     else f"  every run: {shlex.join(plan.common)}")
    if plan.tune:
        t = plan.tune
        lines.append(("\n" if md else "  ") + f"Every setting first runs {t.flag} " + ", ".join(t.values)
                     + f" at seed {t.seed}; its seeds then use the value with the best validation score.")
    return "\n".join(lines)


PLAN_BLOCK = re.compile(r"<!-- plan:([\w.-]+) -->\n.*?<!-- end plan -->", re.S)
TYPES_BLOCK = re.compile(r"<!-- ssm-types -->\n.*?<!-- end ssm-types -->", re.S)
LIBRARY = ("ssm.py", "ssm_ex.py", "s4.py", "s6_lru.py")  # the files whose SSM types the README lists


def ssm_type_table() -> str:
    """README's --ssm_type table, from the registry (ssm.TYPES) of the library's own files."""
    s5 = {o.name for o in ssm.S5_OPTIONS}
    lines = ["| `--ssm_type` | layer | its options |", "|---|---|---|"]
    for name, decl in ssm.TYPES.items():
        module = decl.module or "ssm.py"
        if module not in LIBRARY or name != decl.name:
            continue
        shares = name != "s5" and s5 <= decl.option_names()  # an S5 with more: "S5's and" its own
        own = [o for o in decl.options if not (shares and o.name in s5)]
        text = ("S5's and " if shares else "") \
            + (", ".join(f"`--{o.name}`" for o in own) or "—")
        lines.append(f"| `{'`, `'.join(decl.names)}` | {decl.summary.replace('(this file)', f'(`{module}`)')} "
                     f"| {text} |")
    return "\n".join(lines)


def fill_plan_blocks(text: str) -> str:
    """Markdown with every `<!-- plan:NAME -->...<!-- end plan -->` block (SERIES.md) regenerated from plans/NAME.plan,
    the `<!-- ssm-types -->` table (README.md) from the SSM registry and TRAINING.md's recipe commands from
    plans/s5_recipes.plan: `python config.py docs` writes them, and the tests
    check that the files equal what this returns, so no plan is written twice by hand."""
    text = PLAN_BLOCK.sub(lambda m: f"<!-- plan:{m.group(1)} -->\n{plan_table(read_plan(m.group(1)), markdown=True)}\n"
                          f"<!-- end plan -->", text)
    text = TYPES_BLOCK.sub(lambda m: f"<!-- ssm-types -->\n{ssm_type_table()}\n<!-- end ssm-types -->", text)
    return re.sub(r'```bash\nS5="[^\n]*"\n(?:python train_ex.py \$S5 [^\n]*\n)+```',
                  lambda m: "```bash\n" + recipe_commands() + "\n```", text)


DOCS = ("SERIES.md", "TRAINING.md", "README.md")  # the files with generated tables and recipe commands


def series_runs(plan: Plan, seeds=None, epochs=None, dataset=None, groups=None, only=(), smoke=False, extra=(),
                check=True):
    """What run_train_ex.sh runs: (the variables resolved: the environment's value, else SMOKE's, else the plan's;
    the runs of plan_runs, each with `argv`: train_ex.py's flags except --dir_name, --jax_seed, --run_dir and
    wandb's). A run's flags: --dataset DATASET (a plan whose groups set none), the plan's common, group and smoke
    flags, the setting's (its smoke flags under SMOKE), --epochs EPOCHS when given, EXTRA; last wins."""
    d = plan.defaults
    seeds = seeds or ("0" if smoke else d.get("SEEDS", "0"))
    epochs = epochs or ("1" if smoke else d.get("EPOCHS", ""))
    if dataset and plan.sets_dataset():
        raise PlanError(f"plan {plan.name} sets each group's dataset; leave DATASET unset (DATASET='{dataset}')")
    dataset = dataset or ("" if plan.sets_dataset() else d.get("DATASET", "listops-classification"))
    head = (["--dataset", dataset] if dataset else [])
    tail = (["--epochs", epochs] if epochs else []) + list(extra)
    runs = plan_runs(plan, [int(s) for s in seeds.split()], groups, smoke, only)
    for r in runs:
        group = plan.groups[r["g"] - 1]
        n = len(plan.common) + len(group_flags(group, smoke))  # smoke's tiny sizes after the group's flags
        r["argv"] = head + r["flags"][:n] + (plan.smoke if smoke else []) + r["flags"][n:] + tail
        if r.get("after"):
            r["argv"] += ["@after=" + r["after"]]
        if r.get("tune"):
            r["argv"] += ["@tuned=" + r["tune"]["flag"] + "=" + ",".join(r["tune"]["runs"])]
    if check:
        check_plan(plan, head, tail, smoke, groups)
    values = dict(SEEDS=seeds, EPOCHS=epochs, DATASET=dataset, PLAN_NAME=plan.name, PLAN_FILE=str(plan.path.resolve()),
                  PLAN_DATA=" ".join(plan.data), GROUP_NAMES=" ".join(g.name for g in plan.groups),
                  PLAN_DATASETS=" ".join(sorted({x for x in plan.datasets(dataset or None) if x})))
    return values, runs


def _plan_main(argv=None):
    """The command line that run_train_ex.sh uses to read a plan (its scheduling stays in the shell)."""
    p = argparse.ArgumentParser(prog="config.py", description="Read a series plan (plans/*.plan) for run_train_ex.sh.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("plans", help="the plans in plans/, a line each")
    q = sub.add_parser("docs", help=f"regenerate the plan tables and recipe commands of {', '.join(DOCS)}")
    q = sub.add_parser("plan-table", help="the plan's groups and settings (--markdown: SERIES.md's table)")
    q.add_argument("plan")
    q.add_argument("--markdown", action="store_true")
    q = sub.add_parser("series", help="the series' variables as shell assignments, '---', then its runs, one "
                                      "tab-separated line each; every setting's command line checked first")
    q.add_argument("plan")
    for name in ("seeds", "epochs", "dataset", "groups", "only", "extra"):
        q.add_argument(f"--{name}", default="", help=f"the series' {name.upper()} ('' = its default)")
    q.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.command == "docs":
            for name in DOCS:
                path = Path(__file__).resolve().parent / name
                text = path.read_text()
                new = fill_plan_blocks(text)
                if new != text:
                    utils.atomic_write(path, new)
                print(f"{name}: {'regenerated' if new != text else 'up to date'}")
        elif a.command == "plans":
            for name in plan_names():
                print(f"  {name:<14} {read_plan(name).about}")
        elif a.command == "plan-table":
            print(plan_table(read_plan(a.plan), a.markdown))
        else:
            groups = [int(g) for g in a.groups.split()] if a.groups.strip() else None
            values, runs = series_runs(read_plan(a.plan), a.seeds, a.epochs, a.dataset, groups, a.only.split(),
                                       a.smoke, shlex.split(a.extra))
            values.update(INTERRUPTED_CODES=" ".join(map(str, sorted(utils.INTERRUPTED_CODES))),
                          NOFIT_CODE=utils.DOES_NOT_FIT, LOCKED_CODE=utils.LOCKED)
            for k, v in values.items():
                print(f"{k}={shlex.quote(str(v))}")
            print("---")
            for r in runs:
                print("\t".join(map(str, (r["id"], r["order"], r["g"], r["group"], r["setting"], r["seed"], r["role"],
                                          ",".join(r["deps"]) or "-", shlex.join(r["argv"])))))
    except (PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _plan_main()
