"""Layers, stacks and heads around the SSMs of ssm.py / ssm_ex.py.

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

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

import s4
import ssm
import ssm_ex

SSM_TYPES = ("s5", "aux", "extend", "s4", "s4d", "dss")  # the last three: the S4-family baselines
ACTIVATIONS = ("full_glu", "half_glu1", "half_glu2", "gelu")


def ssm_class(ssm_type: str, **kw):
    """(module class, its options) for `--ssm_type`: options the class does not have are dropped."""
    cls = {"s5": ssm.S5SSM, "aux": ssm_ex.S5SSMAux, "extend": ssm_ex.S5SSMExtend, "s4": s4.S4SSM,
           "s4d": s4.S4DSSM, "dss": s4.DSSSSM}.get(ssm_type)
    if cls is None:
        raise ValueError(f"unknown ssm_type {ssm_type!r}: use one of {SSM_TYPES}")
    fields = set(cls.__dataclass_fields__)
    return cls, {k: v for k, v in kw.items() if k in fields}


class SequenceLayer(nn.Module):
    """norm → SSM → activation → dropout → residual (norm before the SSM under prenorm, after the residual
    otherwise). `__call__` runs a batch of whole sequences (B, L, H); `step` advances one sequence by one time
    step (H,), with the norm's running statistics, so a stack of layers can stream (recurrent mode)."""

    ssm_def: Any  # (class, options) from ssm_class
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
        # one mask per sequence, shared over time; named as the compact form named it, so a seed draws the same masks
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
    (n_classes, seq_len, in_dim, tokens, pair; task: classification (default) or next_step; onehot_width: the
    one-hot encoder's width for tokens, in_dim when absent)."""
    ssm_kw = dict(blocks=cfg.blocks, C_init=cfg.C_init, discretization=cfg.discretization, dt_min=cfg.dt_min,
                  dt_max=cfg.dt_max, conj_sym=cfg.conj_sym, clip_eigs=cfg.clip_eigs,
                  bidirectional=cfg.bidirectional, time_scale_type=cfg.time_scale_type,
                  auxiliary_strength=cfg.auxiliary_strength, R=cfg.R, mode=cfg.extend_mode,
                  delta_type=cfg.delta_type, l_max=ds_meta["seq_len"], init_scale=cfg.extend_init_scale,
                  s4d_init=cfg.s4d_init, chunk=cfg.extend_chunk or None,
                  step_rescale=getattr(cfg, "step_rescale", 1.0))
    layer_kw = dict(activation=cfg.activation_fn, dropout=cfg.p_dropout, prenorm=cfg.prenorm,
                    batchnorm=cfg.batchnorm, bn_momentum=cfg.bn_momentum, mask_padding=cfg.mask_padding)
    tokens, in_dim = ds_meta["tokens"], ds_meta["in_dim"]
    next_step = ds_meta.get("task", "classification") == "next_step"
    if next_step:  # the previous value as a token (--pixel_tokens) or as a number through a Dense layer
        tokens = bool(getattr(cfg, "pixel_tokens", False))
        in_dim = ds_meta["n_classes"] if tokens else 1
    elif tokens and cfg.token_encoder == "onehot":  # the dataset's one-hot width (the release's, >= vocabulary)
        in_dim = ds_meta.get("onehot_width") or in_dim
    encoder = StackedEncoder(ssm_class(cfg.ssm_type, **ssm_kw), cfg.d_model, cfg.ssm_size_base, cfg.n_layers,
                             tokens, in_dim, layer_kw, cfg.token_encoder)
    if next_step:
        return NextStepModel(encoder, ds_meta["n_classes"])
    head = RetrievalModel if ds_meta["pair"] else ClassificationModel
    return head(encoder, ds_meta["n_classes"], cfg.mode)
