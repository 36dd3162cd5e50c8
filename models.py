"""Layers, stacks and heads around the SSMs of ssm.py / ssm_ex.py / s4.py; the optimiser, training state and step
functions; sampling from next-step models; rebuilding a model from a run directory.

Shapes: a batch of sequences x (B, L, H); `mask` (B, L) is 1 on real positions and 0 on padding.
The SSMs work on one sequence and are vmapped over the batch here (parameters shared).

Padding (`mask_padding`): by default inputs at padded positions are zeroed before every SSM, so padding adds
nothing to the states of real positions in either direction. With mask_padding=False the model computes what
the S5 release computes: the scans run over the padding tokens (the backward scan meets them first) and
BatchNorm's statistics include them. Either way pooling averages the real positions only.

Token encoder (`token_encoder`): "onehot" is the release's Dense layer with bias on one-hot tokens (computed as
a row lookup, kernel lecun-normal: std 1/√width), its width the dataset's `onehot_width` (the release's
hard-coded widths: ListOps 20, Text 135; else the vocabulary size); "embed" is flax's nn.Embed over the vocabulary
(std 1/√H), no bias.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import serialization
from PIL import Image

import s4  # noqa: F401  (registers s4, s4d, dss)
import s6_lru  # noqa: F401  (registers s6, lru)
import ssm
import ssm_ex
import utils

ACTIVATIONS = ("full_glu", "half_glu1", "half_glu2", "gelu")

try:  # the SSM types of the files named in SSM_MODULES register themselves beside the built-in ones
    ssm.load_plugins()
except ValueError as e:
    sys.exit(f"error: {e}")
SSM_TYPES = tuple(ssm.TYPES)  # the types registered at import (ssm.TYPES: the registry itself, later ones too)


def ssm_class(cfg, meta: dict):
    """(module class, its fields) of cfg.ssm_type's declaration (ssm.SSMType): each of its options sets its
    field; --bidirectional and the evaluation's step_rescale go to every class that has them (a class without them
    refuses a value other than the default)."""
    decl = ssm.ssm_type(cfg.ssm_type)
    kw = {}
    for o in decl.options:
        v = getattr(cfg, o.name, o.default)
        kw[o.field or o.name] = o.convert(v) if o.convert else v
    if decl.module_kw:
        kw.update(decl.module_kw(cfg, meta))
    fields = set(decl.cls.__dataclass_fields__)
    for name, value, default in (("bidirectional", getattr(cfg, "bidirectional", False), False),
                                 ("step_rescale", getattr(cfg, "step_rescale", 1.0), 1.0)):
        if name in fields:
            kw[name] = value
        elif value != default:
            raise utils.RunError(f"--ssm_type {cfg.ssm_type}: {decl.cls.__name__} has no field {name} (it cannot "
                                 f"run with {name}={value})", 2)
    return decl.cls, kw


class SequenceLayer(nn.Module):
    """norm → SSM → activation → dropout → residual (norm before the SSM under prenorm, after the residual
    otherwise). `__call__` runs a batch of whole sequences (B, L, H); `step` advances one sequence by one time
    step (H,), with the norm's running statistics, so a stack of layers can stream (recurrent mode)."""

    ssm_def: Any  # (class, fields) from ssm_class
    d_model: int
    P: int
    activation: str = "half_glu1"
    dropout: float = 0.0
    prenorm: bool = True
    batchnorm: bool = True
    bn_momentum: float = 0.9
    mask_padding: bool = True

    def setup(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}: use one of {ACTIVATIONS}")
        cls, kw = self.ssm_def
        self.ssm = cls(H=self.d_model, P=self.P, **kw)
        self.norm = (nn.BatchNorm(momentum=self.bn_momentum, axis_name=None) if self.batchnorm else nn.LayerNorm())
        if self.activation == "full_glu":
            self.out1 = nn.Dense(self.d_model)
        if self.activation != "gelu":
            self.out2 = nn.Dense(self.d_model)
        # one mask per sequence, shared over time; the name Dropout_0 fixes where its random stream comes from
        self.Dropout_0 = nn.Dropout(self.dropout, broadcast_dims=[1])

    def _norm(self, x, training):
        return self.norm(x, use_running_average=not training) if self.batchnorm else self.norm(x)

    def _activate(self, x, training):
        """The SSM's output → the layer's update (before the residual)."""
        drop = lambda v: self.Dropout_0(v, deterministic=not training)  # noqa: E731
        if self.activation == "full_glu":
            x = drop(nn.gelu(x))
            return self.out1(x) * nn.sigmoid(self.out2(x))
        if self.activation == "half_glu1":
            x = drop(nn.gelu(x))
            return x * nn.sigmoid(self.out2(x))
        if self.activation == "half_glu2":  # the gate sees GELU(x); the gated value is the raw SSM output
            return x * nn.sigmoid(self.out2(drop(nn.gelu(x))))
        return nn.gelu(x)

    def __call__(self, x, mask, training=False):
        skip = x
        if self.prenorm:
            x = self._norm(x, training)
        if self.mask_padding:
            x = x * mask[..., None]
        x = nn.vmap(lambda ssm, u: ssm(u), variable_axes={"params": None}, split_rngs={"params": False})(self.ssm, x)
        x = skip + self.Dropout_0(self._activate(x, training), deterministic=not training)
        return x if self.prenorm else self._norm(x, training)

    def recurrent_system(self, seq_len: int):
        return self.ssm.recurrent_system(seq_len)

    def initial_state(self):
        return self.ssm.initial_state()

    def step(self, state, x_t, t, seq_len: int, system):
        """(SSM state, x_t (H,)) at time t of a sequence of length seq_len → (new state, output (H,)); evaluation
        mode (running statistics, no dropout). `system` = recurrent_system(seq_len)."""
        skip = x_t
        if self.prenorm:
            x_t = self._norm(x_t, False)
        state, y = self.ssm.step(state, x_t, t, seq_len, system=system)
        y = skip + self._activate(y, False)
        return state, (y if self.prenorm else self._norm(y, False))


class OneHotDense(nn.Module):
    """nn.Dense(features) applied to one_hot(tokens, width), without building the one-hot array (tokens < width)."""

    width: int
    features: int

    @nn.compact
    def __call__(self, tokens):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.width, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return jnp.take(kernel, tokens, axis=0) + bias


TOKEN_ENCODERS = ("onehot", "embed")


class StackedEncoder(nn.Module):
    """Token encoder (token datasets) or a dense encoder (continuous inputs), then n_layers layers.

    `step` is the recurrent mode of the whole stack for one sequence: the encoder on one input, then every
    layer's `step`, carrying one SSM state per layer (`initial_state`; `recurrent_system` once per sequence)."""

    ssm: Any
    d_model: int
    P: int
    n_layers: int
    tokens: bool
    in_dim: int
    layer_kw: dict
    token_encoder: str = "onehot"

    def setup(self):
        if self.tokens and self.token_encoder == "onehot":
            self.encoder = OneHotDense(self.in_dim, self.d_model)
        elif self.tokens:
            if self.token_encoder != "embed":
                raise ValueError(f"unknown token_encoder {self.token_encoder!r}: use one of {TOKEN_ENCODERS}")
            self.encoder = nn.Embed(self.in_dim, self.d_model)
        else:
            self.encoder = nn.Dense(self.d_model)
        for i in range(self.n_layers):  # named layer_0, layer_1, ... (setattr: a list would name them layers_i)
            setattr(self, f"layer_{i}", SequenceLayer(self.ssm, self.d_model, self.P, **self.layer_kw))

    @property
    def layers(self):
        return [getattr(self, f"layer_{i}") for i in range(self.n_layers)]

    def __call__(self, inputs, mask, training=False):
        x = self.encoder(inputs)
        for layer in self.layers:
            x = layer(x, mask, training)
        return x

    def recurrent_system(self, seq_len: int):
        return tuple(layer.recurrent_system(seq_len) for layer in self.layers)

    def initial_state(self):
        return tuple(layer.initial_state() for layer in self.layers)

    def step(self, states, input_t, t, seq_len: int, systems):
        """(states, one input: a token () or features (in_dim,)) → (states, output (H,))."""
        x = self.encoder(input_t)
        new = []
        for layer, state, system in zip(self.layers, states, systems):
            state, x = layer.step(state, x, t, seq_len, system)
            new.append(state)
        return tuple(new), x


def pool(x, lengths, mode: str):
    """(B, L, H) → (B, H): mean over the real positions (`pool`) or the last real position (`last`)."""
    L = x.shape[1]
    if mode == "last":
        return jnp.take_along_axis(x, jnp.clip(lengths - 1, 0, L - 1)[:, None, None], axis=1)[:, 0]
    mask = length_mask(lengths, L).astype(x.dtype)
    return jnp.sum(x * mask[..., None], axis=1) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)


def length_mask(lengths, L):
    return (jnp.arange(L)[None, :] < lengths[:, None]).astype(jnp.float32)


def encode_pooled(encoder, inputs, lengths, mode, training):
    """(B, H): the encoder's outputs over the real positions, pooled."""
    return pool(encoder(inputs, length_mask(lengths, inputs.shape[1]), training), lengths, mode)


class ClassificationModel(nn.Module):
    encoder: StackedEncoder
    n_classes: int
    mode: str = "pool"

    @nn.compact
    def __call__(self, batch, training=False):
        h = encode_pooled(self.encoder, batch["inputs"], batch["lengths"], self.mode, training)
        return nn.Dense(self.n_classes, name="decoder")(h)


class RetrievalModel(nn.Module):
    """One shared encoder for both documents, run once on the 2B batch [first documents; second documents] (as
    the S5 release: one set of BatchNorm statistics); features [a, b, a-b, a*b] → Dense(H) → GELU → Dense."""

    encoder: StackedEncoder
    n_classes: int
    mode: str = "pool"

    @nn.compact
    def __call__(self, batch, training=False):
        x1, x2 = batch["inputs"], batch["inputs2"]
        width = max(x1.shape[1], x2.shape[1])
        pad = lambda x: jnp.pad(x, ((0, 0), (0, width - x.shape[1])) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
        both = encode_pooled(self.encoder, jnp.concatenate([pad(x1), pad(x2)]),
                             jnp.concatenate([batch["lengths"], batch["lengths2"]]), self.mode, training)
        a, b = jnp.split(both, 2)
        h = nn.gelu(nn.Dense(self.encoder.d_model, name="mlp")(jnp.concatenate([a, b, a - b, a * b], axis=-1)))
        return nn.Dense(self.n_classes, name="decoder")(h)


class NextStepModel(nn.Module):
    """Autoregressive density model: logits of every position's value given the values before it (B, L, n_classes).

    The inputs are the targets shifted right by one (position t sees the value at t − 1; position 0 sees 0), so
    a causal (unidirectional) encoder never sees the value it predicts. Values are tokens 0..n_classes−1 (e.g.
    pixel intensities) encoded by the encoder's token encoder, or, when the encoder takes continuous inputs,
    value / (n_classes − 1) through its Dense layer. `step` is the recurrent mode: one position at a time.
    """

    encoder: StackedEncoder
    n_classes: int

    def setup(self):
        self.decoder = nn.Dense(self.n_classes)

    def _encoder_input(self, values):
        if self.encoder.tokens:
            return values
        return (values.astype(jnp.float32) / (self.n_classes - 1))[..., None]

    def __call__(self, batch, training=False):
        x = self.encoder(self._encoder_input(batch["inputs"]), length_mask(batch["lengths"], batch["inputs"].shape[1]),
                         training)
        return self.decoder(x)

    def recurrent_system(self, seq_len: int):
        return self.encoder.recurrent_system(seq_len)

    def initial_state(self):
        return self.encoder.initial_state()

    def step(self, states, value_prev, t, seq_len: int, systems):
        """(states, the value at t − 1 (a scalar int)) → (states, logits at t (n_classes,)) for one sequence."""
        states, x = self.encoder.step(states, self._encoder_input(value_prev), t, seq_len, systems)
        return states, self.decoder(x)


class PerPositionModel(nn.Module):
    """A class at every position (B, L, n_classes) from the encoder's output there, no pooling: the diagnostics'
    per-position tasks (copying, selective copying, associative recall), scored where batch["label_weights"] is 1.
    Unlike NextStepModel the inputs are the task's own tokens, not shifted labels."""

    encoder: StackedEncoder
    n_classes: int

    @nn.compact
    def __call__(self, batch, training=False):
        x = self.encoder(batch["inputs"], length_mask(batch["lengths"], batch["inputs"].shape[1]), training)
        return nn.Dense(self.n_classes, name="decoder")(x)


def recurrent_logits(model: NextStepModel, variables, inputs):
    """Teacher-forced logits (B, L, n_classes) of the shifted inputs (B, L), computed step by step in the
    recurrent mode: one compiled lax.scan over time, the whole stack advanced one position per step for
    every sequence. Equal to `model.apply(variables, batch)` up to float rounding (the tests' proof)."""
    B, L = inputs.shape
    step, states = _recurrent(model, variables, L, B)

    def body(states, tv):
        t, v = tv
        return step(states, v, t)

    _, logits = jax.lax.scan(body, states, (jnp.arange(L), inputs.T))
    return jnp.swapaxes(logits, 0, 1)


def sample(model: NextStepModel, variables, key, prefix, n_given, temperature=1.0):
    """Draw sequences one value at a time from the model (recurrent mode, one compiled lax.scan).

    prefix (N, L) ints: values t < n_given are copied from it (conditioning on the start of a true sequence;
    n_given = 0: unconditional), the rest drawn from softmax(logits / temperature) (temperature 0: the most
    likely value). Returns (N, L) int32 values in 0..n_classes−1. Jit it with the model and L static.
    """
    N, L = prefix.shape
    step, states = _recurrent(model, variables, L, N)
    keys = jax.random.split(key, L)

    def body(carry, t):
        states, prev = carry
        states, logits = step(states, prev, t)
        scaled = logits / jnp.maximum(temperature, 1e-6)
        drawn = jnp.where(temperature > 0, jax.random.categorical(keys[t], scaled, axis=-1),
                          jnp.argmax(logits, axis=-1)).astype(jnp.int32)
        value = jnp.where(t < n_given, prefix[:, t].astype(jnp.int32), drawn)
        return (states, value), value

    _, values = jax.lax.scan(body, (states, jnp.zeros((N,), jnp.int32)), jnp.arange(L))
    return values.T


def _recurrent(model, variables, L: int, n: int):
    """(step, states) for n sequences of length L: step(states, values (n,), t) → (states, logits (n, classes)),
    with every layer's recurrent system formed once, here, outside the loop over time; states start at zero."""
    systems = model.apply(variables, L, method="recurrent_system")
    one = lambda states, v, t: model.apply(variables, states, v, t, L, systems, method="step")  # noqa: E731
    return jax.vmap(one, in_axes=(0, 0, None)), _batched(model.apply(variables, method="initial_state"), n)


def _batched(tree, n):
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), tree)


def build_model(cfg, ds_meta):
    """The model for a config (argparse namespace or dict-like with attribute access) and a dataset's fields
    (n_classes, seq_len, in_dim, tokens, pair; task: classification (default), next_step, per_position or
    regression (a pooled head with n_classes = 1 output); onehot_width: the one-hot encoder's width for tokens,
    in_dim when absent)."""
    layer_kw = dict(activation=cfg.activation_fn, dropout=cfg.p_dropout, prenorm=cfg.prenorm,
                    batchnorm=cfg.batchnorm, bn_momentum=cfg.bn_momentum, mask_padding=cfg.mask_padding)
    tokens, in_dim = ds_meta["tokens"], ds_meta["in_dim"]
    next_step = ds_meta.get("task", "classification") == "next_step"
    if next_step:  # the previous value as a token (--pixel_tokens) or as a number through a Dense layer
        tokens = bool(getattr(cfg, "pixel_tokens", False))
        in_dim = ds_meta["n_classes"] if tokens else 1
    elif tokens and cfg.token_encoder == "onehot":  # the dataset's one-hot width (the release's, >= vocabulary)
        in_dim = ds_meta.get("onehot_width") or in_dim
    encoder = StackedEncoder(ssm_class(cfg, ds_meta), cfg.d_model, cfg.ssm_size_base, cfg.n_layers,
                             tokens, in_dim, layer_kw, cfg.token_encoder)
    if next_step:
        return NextStepModel(encoder, ds_meta["n_classes"])
    if ds_meta.get("task") in ("per_position", "per_position_regression"):  # a class, or a number, per position
        return PerPositionModel(encoder, ds_meta["n_classes"])
    head = RetrievalModel if ds_meta["pair"] else ClassificationModel
    return head(encoder, ds_meta["n_classes"], cfg.mode)


def guard_activity(model, L: int):
    """What the stability guard did, as a jit-compiled function of the parameters, or None when the model's SSM has
    no guard (S5, the S4 family, S6, LRU). The function gives (n_layers, 2): per layer, the fraction of the (t, state)
    rows of the transitions at length L that the guard scaled, and the median scale over those rows (1: untouched;
    each SSM's `guard_scales` says what a row's scale is). The guard does not depend on the sample, so this needs
    no data, only the parameters: a few operations per evaluation."""
    cls, kw = model.encoder.ssm
    if not hasattr(cls, "guard_scales"):
        return None
    layer = cls(H=model.encoder.d_model, P=model.encoder.P, **kw)

    def activity(params):
        rows = []
        for i in range(model.encoder.n_layers):
            scale = layer.apply({"params": params["encoder"][f"layer_{i}"]["ssm"]}, L, method="guard_scales")
            rows.append(jnp.stack([jnp.mean(scale < 1.0), jnp.median(scale)]))
        return jnp.stack(rows)

    return jax.jit(activity)


# ==================================================================================================
# The model's options: defaults, what fixes the architecture, rebuilding a model from a run directory
# ==================================================================================================

# Every option build_model reads that is not an SSM type's own, with its default (the training command line takes
# its defaults from here; a run directory whose config lacks an option gets it from here too). batchnorm None: on,
# except for next-step datasets (decided with the dataset, in config.parse_args). The SSM types' own options
# (ssm.OPTIONS) take the defaults their declarations give.
LAYER_DEFAULTS = dict(
    ssm_type="s5", d_model=128, n_layers=4, ssm_size_base=64, bidirectional=False,
    activation_fn="half_glu1", prenorm=True, batchnorm=None, bn_momentum=0.95, p_dropout=0.1, mode="pool",
    token_encoder="onehot", pixel_tokens=False, mask_padding=True,
)


def model_defaults() -> dict:
    """LAYER_DEFAULTS and every registered SSM type's options' defaults."""
    return {**LAYER_DEFAULTS, **{name: o.default for name, o in ssm.OPTIONS.items()}}


MODEL_DEFAULTS = model_defaults()  # as registered at import
# What a run directory written before an option existed ran with, where that differs from the default: its
# config lacks the option, and resuming, sampling or inspecting it must rebuild the model it trained.
LEGACY_DEFAULTS = dict(extend_guard=ssm_ex.LEGACY_GUARD)
# The options a checkpoint's parameters depend on, besides the SSM types' options marked arch: loading it into a
# model that differs in any is refused.
LAYER_ARCH_FIELDS = ("dataset", "ssm_type", "d_model", "n_layers", "ssm_size_base", "bidirectional",
                     "activation_fn", "prenorm", "batchnorm", "mode", "token_encoder", "pixel_tokens", "data_options")


def arch_fields() -> tuple:
    return LAYER_ARCH_FIELDS + tuple(name for name, o in ssm.OPTIONS.items() if o.arch)


ARCH_FIELDS = arch_fields()


def check_architecture(saved: dict, cfg):
    """A RunError (exit 2) listing every ARCH_FIELDS option in which a saved config differs from `cfg`."""
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}" for k in arch_fields()
            if k in saved and saved.get(k) != getattr(cfg, k)]
    if diff:
        raise utils.RunError("the checkpoint was made by a different architecture:\n  " + "\n  ".join(diff), 2)


def read_run(run_dir, kind="best"):
    """(config namespace, model meta, state dict of numpy arrays) of a run's ckpt_<kind>: what rebuilds the
    model without the data (sample.py, inspect_run.py). Options the config lacks take MODEL_DEFAULTS. A RunError
    says what is missing."""
    ckpt = utils.checkpoint_path(run_dir, kind)
    if not ckpt.exists():
        raise utils.RunError(f"no checkpoint {ckpt}: is {run_dir} a run directory of train_ex.py? (--checkpoint "
                             f"best|latest picks which)", 2)
    if not ckpt.with_suffix(".json").exists():
        raise utils.RunError(f"{ckpt} has no {ckpt.with_suffix('.json').name} beside it (the run's config): was it "
                             f"copied without it?", 2)
    saved, state = utils.read_checkpoint(ckpt)
    config = saved["config"]
    meta = config.get("model_meta")
    if meta is None:
        raise utils.RunError(f"{ckpt.with_suffix('.json')} has no model_meta (the dataset's shapes): rerun or "
                             f"resume the run once to record them", 2)
    try:
        ssm.ssm_type(config.get("ssm_type", "s5"))
    except ValueError as e:
        raise utils.RunError(f"{run_dir}: {e}", 2) from None
    return argparse.Namespace(**{**model_defaults(), **LEGACY_DEFAULTS, **config}), meta, state


def example_batch(meta: dict, bsz: int = 1, L: int | None = None) -> dict:
    """A batch of `bsz` zero sequences of length L (default: the dataset's), every one full length, with a
    dataset's shapes (meta: seq_len, in_dim, tokens, pair, task): for initialising a model or, through
    jax.eval_shape, for compiling a step without allocating anything."""
    L = meta["seq_len"] if L is None else L
    task = meta.get("task")
    next_step = task == "next_step"
    x = jnp.zeros((bsz, L), jnp.int32) if meta["tokens"] or next_step else jnp.zeros((bsz, L, meta["in_dim"]))
    lengths = jnp.full((bsz,), L, jnp.int32)
    per_position = next_step or task in ("per_position", "per_position_regression")
    real = task in ("regression", "per_position_regression")
    batch = {"inputs": x, "lengths": lengths,
             "labels": jnp.zeros((bsz, L) if per_position else (bsz,), jnp.float32 if real else jnp.int32),
             "weights": jnp.ones((bsz,), jnp.float32)}
    if task in ("per_position", "per_position_regression"):
        batch["label_weights"] = jnp.ones((bsz, L), jnp.float32)
    if meta["pair"]:
        batch.update(inputs2=x, lengths2=lengths)
    return batch


def init_keys(cfg):
    """(the key that initialises the parameters, the dropout key), both from cfg.jax_seed."""
    return jax.random.split(jax.random.PRNGKey(cfg.jax_seed))


def init_variables(cfg, model, batch):
    """(the model's initial variables, the dropout key), both from cfg.jax_seed; only the batch's shapes matter."""
    init_key, dropout_key = init_keys(cfg)
    init = jax.jit(lambda k, b: model.init({"params": k, "dropout": k}, b, training=False))
    return init(init_key, batch), dropout_key


# ==================================================================================================
# Optimiser: the S5 parameter groups and learning-rate schedule
# ==================================================================================================


def param_label(path, cfg, frozen: bool) -> str:
    """The optimiser group of a parameter (the groups: --opt_config's help in config.py): outside the SSM
    "regular"; inside it, from the role its type's declaration gives its leaf (ssm.ROLES). A leaf the declaration
    does not name is an error, so a renamed parameter cannot fall silently into another group."""
    names = [getattr(k, "key", str(k)) for k in path]
    role = "regular"
    if "ssm" in names:
        decl = ssm.ssm_type(cfg.ssm_type)
        role = decl.params.get(names[-1])
        if role is None:
            raise ValueError(f"--ssm_type {cfg.ssm_type}: parameter {'/'.join(names)} has no role in the type's "
                             f"declaration (its params name {sorted(decl.params)}; ssm.ROLES)")
    if frozen and role != "extension":
        return "frozen"
    if role in ("eig", "extension"):
        return "ssm"
    if role == "step":
        return "regular" if cfg.dt_global else "ssm"
    groups = {"standard": {"B": "ssm"}, "BandCdecay": {"B": "ssm_decay"}, "BfastandCdecay": {},
              "noBCdecay": {"B": "ssm", "C": "ssm", "D": "ssm"}}[cfg.opt_config]
    return groups.get(role, "regular")


def lr_schedule(base, cfg, steps_per_epoch):
    """The S5 release's learning rate at optimiser step k (its loop sets the rate after every step, from the
    number of steps taken so far), with W = warmup_end·steps_per_epoch and T = epochs·steps_per_epoch:

        k = 0: base;   k ≥ 1: f(k − 1),   f(j) = base·(j + 1)/W                                   if j < W
                                          f(j) = lr_min + (base − lr_min)·½(1 + cos(π·min(j, T−W)/(T−W)))  otherwise
    (f(j) = base without --cosine_anneal). The cosine runs on the global step, so it reaches lr_min W steps
    before the end and stays there.
    """
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
    """(optax transformation, the group label of every parameter): Adam/AdamW per group, each on its schedule."""
    labels = jax.tree_util.tree_map_with_path(lambda p, _: param_label(p, cfg, frozen), params)
    txs = {
        "ssm": optax.adam(lr_schedule(cfg.ssm_lr, cfg, steps_per_epoch)),
        "ssm_decay": optax.adamw(lr_schedule(cfg.ssm_lr, cfg, steps_per_epoch), weight_decay=cfg.weight_decay),
        "regular": optax.adamw(lr_schedule(cfg.global_lr, cfg, steps_per_epoch), weight_decay=cfg.weight_decay),
        "frozen": optax.set_to_zero(),
    }
    tx = optax.multi_transform(txs, labels)
    if cfg.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, labels


# ==================================================================================================
# Training state and steps
# ==================================================================================================


def new_state(params, batch_stats, tx):
    """The training state: parameters, BatchNorm statistics, optimiser state, and the on-device running totals
    (loss·n, correct, n, non-finite steps) that train_step adds to."""
    return {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
            "totals": jnp.zeros(4, jnp.float32)}


REGRESSION_TOLERANCE = 0.04  # a regression's prediction is "correct" within this of its label (the adding problem)


def task_loss(logits, batch, task: str = "classification"):
    """(loss, hit) per sequence (B,) for a dataset's task (dataloaders.task_of):

    classification  logits (B, C): cross-entropy; hit 1 when the most likely class is the label.
    next_step       logits (B, L, C): the mean over positions of cross-entropy (nats per value) and of hits.
    per_position    logits (B, L, C): the same means over the scored positions only (batch["label_weights"]
                    (B, L), 1 where scored), so a sequence's accuracy is its fraction of scored positions right.
    regression      logits (B, 1): squared error to the real-valued label; hit when within REGRESSION_TOLERANCE.
    per_position_regression  logits (B, L, 1): the same per position, averaged over the scored positions.
    """
    labels = batch["labels"]
    if task in ("regression", "per_position_regression"):
        err = logits[..., 0] - labels
        sq, hit = err ** 2, (jnp.abs(err) < REGRESSION_TOLERANCE).astype(jnp.float32)
        if task == "regression":
            return sq, hit
        lw = batch["label_weights"]
        scored = jnp.maximum(jnp.sum(lw, axis=1), 1.0)
        return jnp.sum(sq * lw, axis=1) / scored, jnp.sum(hit * lw, axis=1) / scored
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    if task == "per_position":
        lw = batch["label_weights"]
        scored = jnp.maximum(jnp.sum(lw, axis=1), 1.0)
        return jnp.sum(nll * lw, axis=1) / scored, jnp.sum(hit * lw, axis=1) / scored
    if nll.ndim == 2:  # next-step prediction: per sequence, the mean over its positions (nats per value)
        return nll.mean(axis=1), hit.mean(axis=1)
    return nll, hit


def make_steps(model, tx, dropout_key, task: str = "classification"):
    """(train_step, eval_step), not yet jit-compiled.

    train_step(state, batch, step) → state: one optimiser step; a step whose loss is not finite changes no
    parameter and is counted in state["totals"][3] (the host looks at it every --log_every steps).
    state["totals"] sums (loss·n, correct, n, non-finite steps) on the device, so no step syncs the host.
    eval_step(state, batch) → (loss·n, correct, n).
    A sequence's loss and "correct" are task_loss's for the dataset's `task`: e.g. for next-step prediction
    (logits (B, L, classes)) its mean over positions (nats per value) and the fraction of positions whose most
    likely value is the true one; "next_step" is also assumed when logits have a time axis and `task` is left at
    classification.
    """

    def loss_fn(params, batch_stats, batch, rng, training):
        out = model.apply({"params": params, "batch_stats": batch_stats}, batch, training=training,
                          rngs={"dropout": rng}, mutable=["batch_stats"] if training else False)
        logits, new_stats = (out[0], out[1].get("batch_stats", batch_stats)) if training else (out, batch_stats)
        w = batch["weights"]
        nll, hit = task_loss(logits, batch, task)
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
        totals = state["totals"] + jnp.array([jnp.where(ok, loss * n, 0.0), correct, n, 1.0 - ok])
        return {"params": keep(params, state["params"]), "batch_stats": keep(stats, state["batch_stats"]),
                "opt_state": keep(opt_state, state["opt_state"]), "totals": totals}

    def eval_step(state, batch):
        loss, (_, correct, n) = loss_fn(state["params"], state["batch_stats"], batch, dropout_key, False)
        return jnp.array([loss * n, correct, n])

    return train_step, eval_step


# ==================================================================================================
# Memory: XLA's estimate of a training step (train_ex.py checks it before the first step; bench.py reports it)
# ==================================================================================================


def memory_estimate(compiled) -> dict:
    """XLA's estimate of the bytes one call of a compiled step needs per device (compiled.memory_analysis()):
    arguments, outputs not aliased to donated arguments, temporaries and code. → {argument, output, alias,
    temp, code, total} in bytes."""
    m = compiled.memory_analysis()
    get = lambda name: int(getattr(m, name, 0) or 0)  # noqa: E731
    out = dict(argument=get("argument_size_in_bytes"), output=get("output_size_in_bytes"),
               alias=get("alias_size_in_bytes"), temp=get("temp_size_in_bytes"),
               code=get("generated_code_size_in_bytes"))
    out["total"] = out["argument"] + max(out["output"] - out["alias"], 0) + out["temp"] + out["code"]
    return out


def abstract_batch(batch: dict, bsz: int, sharding=None) -> dict:
    """jax.ShapeDtypeStruct leaves with `batch`'s shapes and dtypes (as JAX stores them) at `bsz` rows."""
    return {k: jax.ShapeDtypeStruct((bsz, *np.shape(v)[1:]), jax.dtypes.canonicalize_dtype(np.asarray(v).dtype),
                                    sharding=sharding) for k, v in batch.items()}


def abstract_state(model, batch, tx, sharding=None):
    """The training state's shapes for a model, a batch (arrays or ShapeDtypeStructs) and an optimiser, without
    allocating anything."""
    key = jax.random.PRNGKey(0)
    variables = jax.eval_shape(lambda b: model.init({"params": key, "dropout": key}, b, training=False), batch)
    state = jax.eval_shape(lambda v: new_state(v["params"], v.get("batch_stats", {}), tx), variables)
    if sharding is None:
        return state
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def compiled_step(cfg, meta, batch):
    """(the training step lowered and compiled for `batch`'s shapes, its model, its abstract state, compile
    seconds). `batch` may hold jax.ShapeDtypeStruct leaves: nothing is allocated."""
    model = build_model(cfg, meta)
    variables = jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b), batch)
    tx, _ = make_optimizer(variables["params"], cfg, steps_per_epoch=100)
    state = abstract_state(model, batch, tx)
    train_step, _ = make_steps(model, tx, jax.random.PRNGKey(1), meta.get("task") or "classification")
    t0 = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0,)).lower(state, batch, 0).compile()
    return compiled, model, state, time.perf_counter() - t0


def step_memory(cfg, meta, bsz: int | None = None) -> dict:
    """XLA's estimate (memory_estimate, bytes) of one training step of `cfg`'s model on full-length batches of
    `bsz` (default cfg.bsz) sequences of a dataset's shapes (`meta`), compiled on abstract shapes; with the
    compile time ("compile_s")."""
    batch = jax.eval_shape(lambda: example_batch(meta, cfg.bsz if bsz is None else bsz))
    compiled, _, _, compile_s = compiled_step(cfg, meta, batch)
    return dict(memory_estimate(compiled), compile_s=compile_s)


def largest_fitting_batch(points, available: int, multiple: int = 1) -> int | None:
    """The largest batch size (a multiple of `multiple`) whose estimate fits in `available` bytes, from the line
    through two (batch size, estimated bytes) points; None when none fits (the part that does not grow with the
    batch alone is too large) or the estimate does not grow with the batch."""
    (b1, e1), (b2, e2) = points
    if b1 == b2 or e1 == e2:
        return None
    slope = (e1 - e2) / (b1 - b2)
    if slope <= 0:
        return None
    best = int((available - (e1 - slope * b1)) // slope) // multiple * multiple
    return best if best >= multiple else None


def load_weights(path, cfg, params, batch_stats):
    """(params, batch_stats) from a checkpoint file; with cfg.freeze == "base", an S5 checkpoint warm-starts the
    extension (ssm_ex.warm_start) and every other parameter is the checkpoint's."""
    path = Path(path)
    if not path.exists():
        raise utils.RunError(f"--load_checkpoint: no file {path}", 2)
    saved, raw = utils.read_checkpoint(path)
    if cfg.freeze == "base":
        if saved["config"].get("ssm_type") != "s5":
            raise utils.RunError(f"--freeze base builds on an S5 checkpoint; {path} holds "
                                 f"{saved['config'].get('ssm_type')}", 2)
        base = {k: v for k, v in saved["config"].items() if k in arch_fields()}
        check_architecture({**base, "ssm_type": cfg.ssm_type, "R": cfg.R, "extend_mode": cfg.extend_mode,
                            "delta_type": cfg.delta_type, "time_scale_type": cfg.time_scale_type}, cfg)
        new = jax.tree_util.tree_map(np.asarray, params)

        def merge(new_tree, old_tree, name):
            if name == "ssm":
                return ssm_ex.warm_start(old_tree, new_tree)
            if isinstance(new_tree, dict):
                return {k: merge(v, old_tree[k], k) for k, v in new_tree.items()}
            return old_tree

        return merge(new, raw["params"], ""), raw.get("batch_stats", batch_stats)
    check_architecture(saved["config"], cfg)
    restored = serialization.from_state_dict({"params": params, "batch_stats": batch_stats},
                                             {"params": raw["params"], "batch_stats": raw.get("batch_stats", {})})
    return restored["params"], restored["batch_stats"]


# ==================================================================================================
# Sampling from a next-step model: the compiled draw, its prefix, the true values, the picture
# ==================================================================================================


class Sampler:
    """A compiled `sample` for one model: call (variables, truth (N, L), n_given, temperature, seed) →
    (drawn values (N, L) int32 as numpy, seconds). Compiled once per N and L; n_given, temperature and the seed
    are traced, so changing them does not compile again."""

    def __init__(self, model):
        self.fn = jax.jit(lambda variables, key, prefix, n_given, temperature: sample(
            model, variables, key, prefix, n_given, temperature))

    def __call__(self, variables, truth, n_given, temperature, seed=0):
        t0 = time.perf_counter()
        key = jax.random.PRNGKey(seed)
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
    path = Path(path)
    img = Image.fromarray(grid_image(np.asarray(truth), np.asarray(drawn), n_given), mode="L")
    img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    utils.atomic_write(path, buf.getvalue())
    return path
