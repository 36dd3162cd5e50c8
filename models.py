"""Layers, stacks and heads around the SSMs of ssm.py / ssm_ex.py.

Shapes: a batch of sequences x (B, L, H); `mask` (B, L) is 1 on real positions and 0 on padding.
The SSMs work on one sequence and are vmapped over the batch here (parameters shared).

Padding (`mask_padding`): by default inputs at padded positions are zeroed before every SSM, so padding adds
nothing to the states of real positions in either direction. With mask_padding=False the model computes what
the S5 release computes: the scans run over the padding tokens (the backward scan meets them first) and
BatchNorm's statistics include them. Either way pooling averages the real positions only.

Token encoder (`token_encoder`): "onehot" is the release's Dense layer with bias on one-hot tokens (computed as
a row lookup, kernel lecun-normal: std 1/√vocab); "embed" is flax's nn.Embed (std 1/√H), no bias.
"""

from __future__ import annotations

from typing import Any

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
    otherwise)."""

    ssm: Any  # (class, options) from ssm_class
    d_model: int
    P: int
    activation: str = "half_glu1"
    dropout: float = 0.0
    prenorm: bool = True
    batchnorm: bool = True
    bn_momentum: float = 0.9
    mask_padding: bool = True
    training: bool = False

    def norm(self, x, name):
        if self.batchnorm:
            return nn.BatchNorm(use_running_average=not self.training, momentum=self.bn_momentum,
                                axis_name=None, name=name)(x)
        return nn.LayerNorm(name=name)(x)

    @nn.compact
    def __call__(self, x, mask):
        drop = nn.Dropout(self.dropout, broadcast_dims=[1], deterministic=not self.training)
        skip = x
        if self.prenorm:
            x = self.norm(x, "norm")
        if self.mask_padding:
            x = x * mask[..., None]
        cls, kw = self.ssm
        BatchSSM = nn.vmap(cls, in_axes=0, out_axes=0, variable_axes={"params": None}, split_rngs={"params": False})
        x = BatchSSM(H=self.d_model, P=self.P, name="ssm", **kw)(x)
        if self.activation == "full_glu":
            x = drop(nn.gelu(x))
            x = nn.Dense(self.d_model, name="out1")(x) * nn.sigmoid(nn.Dense(self.d_model, name="out2")(x))
        elif self.activation == "half_glu1":
            x = drop(nn.gelu(x))
            x = x * nn.sigmoid(nn.Dense(self.d_model, name="out2")(x))
        elif self.activation == "half_glu2":  # the gate sees GELU(x); the gated value is the raw SSM output
            x1 = drop(nn.gelu(x))
            x = x * nn.sigmoid(nn.Dense(self.d_model, name="out2")(x1))
        elif self.activation == "gelu":
            x = nn.gelu(x)
        else:
            raise ValueError(f"unknown activation {self.activation!r}: use one of {ACTIVATIONS}")
        x = skip + drop(x)
        if not self.prenorm:
            x = self.norm(x, "norm")
        return x


class OneHotDense(nn.Module):
    """nn.Dense(features) applied to one_hot(tokens, vocab), without building the one-hot array."""

    vocab: int
    features: int

    @nn.compact
    def __call__(self, tokens):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.vocab, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return jnp.take(kernel, tokens, axis=0) + bias


TOKEN_ENCODERS = ("onehot", "embed")


class StackedEncoder(nn.Module):
    """Token encoder (token datasets) or a dense encoder (continuous inputs), then n_layers layers."""

    ssm: Any
    d_model: int
    P: int
    n_layers: int
    tokens: bool
    in_dim: int
    layer_kw: dict
    token_encoder: str = "onehot"

    @nn.compact
    def __call__(self, inputs, mask, training=False):
        if self.tokens and self.token_encoder == "onehot":
            x = OneHotDense(self.in_dim, self.d_model, name="encoder")(inputs)
        elif self.tokens:
            if self.token_encoder != "embed":
                raise ValueError(f"unknown token_encoder {self.token_encoder!r}: use one of {TOKEN_ENCODERS}")
            x = nn.Embed(self.in_dim, self.d_model, name="encoder")(inputs)
        else:
            x = nn.Dense(self.d_model, name="encoder")(inputs)
        for i in range(self.n_layers):
            x = SequenceLayer(self.ssm, self.d_model, self.P, training=training, name=f"layer_{i}",
                              **self.layer_kw)(x, mask)
        return x


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


def build_model(cfg, ds_meta):
    """The model for a config (argparse namespace or dict-like with attribute access) and a dataset's fields
    (n_classes, seq_len, in_dim, tokens, pair)."""
    ssm_kw = dict(blocks=cfg.blocks, C_init=cfg.C_init, discretization=cfg.discretization, dt_min=cfg.dt_min,
                  dt_max=cfg.dt_max, conj_sym=cfg.conj_sym, clip_eigs=cfg.clip_eigs,
                  bidirectional=cfg.bidirectional, time_scale_type=cfg.time_scale_type,
                  auxiliary_strength=cfg.auxiliary_strength, R=cfg.R, mode=cfg.extend_mode,
                  delta_type=cfg.delta_type, l_max=ds_meta["seq_len"], init_scale=cfg.extend_init_scale,
                  s4d_init=cfg.s4d_init, chunk=cfg.extend_chunk or None,
                  step_rescale=getattr(cfg, "step_rescale", 1.0))
    layer_kw = dict(activation=cfg.activation_fn, dropout=cfg.p_dropout, prenorm=cfg.prenorm,
                    batchnorm=cfg.batchnorm, bn_momentum=cfg.bn_momentum, mask_padding=cfg.mask_padding)
    encoder = StackedEncoder(ssm_class(cfg.ssm_type, **ssm_kw), cfg.d_model, cfg.ssm_size_base, cfg.n_layers,
                             ds_meta["tokens"], ds_meta["in_dim"], layer_kw, cfg.token_encoder)
    head = RetrievalModel if ds_meta["pair"] else ClassificationModel
    return head(encoder, ds_meta["n_classes"], cfg.mode)
