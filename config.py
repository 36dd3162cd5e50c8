"""The training run's options: the command line of train_ex.py, its checks, and the S5 recipes of TRAINING.md.

    cfg = config.parse_args(["--dataset", "mnist-classification", "--ssm_type", "aux"])

A library file (bench.py, inspect_run.py and the tests build configs too). The model's own options take their
defaults from models.MODEL_DEFAULTS; every check that needs only the options is here, before any data is read.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import dataloaders
import models
import ssm
import tasks
import utils

Flag = argparse.BooleanOptionalAction  # --name / --no-name
RECIPES = Path(__file__).resolve().parent / "TRAINING.md"  # the one written copy of the S5 recipes


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


def s5_recipes(path=RECIPES) -> dict:
    """The S5 recipes of TRAINING.md: {dataset: the words of its `python train_ex.py $S5 ...` command after
    train_ex.py, with $S5 expanded}. TRAINING.md is their one written copy (the tests check them against the
    release's settings; bench.py measures them)."""
    lines = Path(path).read_text().splitlines()
    s5 = next((line for line in lines if line.startswith('S5="')), None)
    if s5 is None:
        raise ValueError(f"{path} has no S5=\"...\" line before its recipe commands")
    recipes = {}
    for line in lines:
        if line.startswith("python train_ex.py $S5 "):
            argv = shlex.split(line.replace("$S5", s5[4:-1]))[2:]
            recipes[argv[argv.index("--dataset") + 1]] = argv
    return recipes
