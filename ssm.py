"""S5: a diagonal multi-input multi-output linear state-space layer computed with a parallel scan.

Smith, Warrington & Linderman, "Simplified State Space Layers for Sequence Modeling", ICLR 2023.

Continuous system (state size P, features H), diagonalised in the eigenbasis V of a HiPPO-derived matrix:

    x'(t) = Λ x(t) + B̃ u(t),     y(t) = C̃ x(t) + D u(t),       Λ ∈ C^P, B̃ ∈ C^{P×H}, C̃ ∈ C^{H×P}

Discretised with one timestep per state it becomes the diagonal linear recurrence

    x_t = Λ̄ ⊙ x_{t-1} + B̄ u_t,   x_{-1} = 0,          y_t = Re(C̃ x_t) + D ⊙ u_t

which is evaluated for all t at once with an associative (parallel) scan. With conjugate symmetry only
one of each conjugate pair of eigenvalues is kept (P/2 complex states) and the output becomes
2·Re(C̃ x_t), which is exactly the output of the full real system.

Everything here works on ONE sequence: u is (L, H). Callers vmap over the batch.
Construction helpers run in numpy float64 (they are run once, at initialisation); the recurrences are JAX.

Glossary: every SSM file of the harness (ssm.py, ssm_ex.py, s4.py, s6_lru.py) uses these symbols in one sense.
    L   sequence length (steps);  t = 0..L-1 the time index;  B the batch size (B̄ is the input matrix)
    H   features (d_model);  P  states of the real system (--ssm_size_base); P_s the complex states a layer carries
        (P/2 under conjugate symmetry);  N  S6's real states per channel
    Λ, Λ̄   continuous and discrete eigenvalues (P_s,);  B̃, B̄  input matrices;  C̃  output matrix (H, P_s);  D  skip
    Δ(t)    a fixed time schedule;  step  the discretisation timestep (S6: Δ_t, input-dependent)
    E, F, δ(t), R   the Lambda extension's factors (P_s × R, R × P_s), its time profile (R,) and rank;
        K  the number of basis functions of a δ basis
    W, n    the chunked scan's steps per chunk and number of chunks (ssm_ex.lowrank_scan);  Φ_c  a chunk's map
    a_t, b_t  a diagonal recurrence's transition and input, x_t = a_t ⊙ x_{t-1} + b_t;  x_t  the state
    s_t, c_t, r, G  the stability guard's row scale, whole-transition scale, bound per step and over a sequence
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# --------------------------------------------------------------------------------------------------
# HiPPO initialisation
# --------------------------------------------------------------------------------------------------


def make_hippo(N: int) -> np.ndarray:
    """HiPPO-LegS matrix (negative convention), (N, N) float64.

    A[n, k] = -sqrt(2n+1) sqrt(2k+1)  for n > k,   A[n, n] = -(n+1),   A[n, k] = 0 for n < k.
    """
    q = np.sqrt(2.0 * np.arange(N) + 1.0)
    A = -np.tril(np.outer(q, q), k=-1) - np.diag(np.arange(N) + 1.0)
    return A


def make_dplr_hippo(N: int):
    """Normal-plus-low-rank form of HiPPO-LegS: A = V diag(Λ) V* − P Pᵀ.

    With P_n = sqrt(n + 1/2), S = A + P Pᵀ = −½ I + K where K is skew-symmetric, so S is normal and
    diagonalised by the eigenvectors of the Hermitian matrix −iK (real eigenvalues μ, ascending):
    Λ = −½ + iμ.

    Returns (Lambda (N,) complex, P (N,) complex = V* P, B (N,) complex = V* B_orig, V (N,N), B_orig (N,)).
    """
    A = make_hippo(N)
    P = np.sqrt(np.arange(N) + 0.5)
    B_orig = np.sqrt(2.0 * np.arange(N) + 1.0)
    S = A + np.outer(P, P)
    diag_S = np.diagonal(S)
    K = S - np.diag(diag_S)  # skew-symmetric part
    mu, V = np.linalg.eigh(-1j * K)  # ascending eigenvalues of a Hermitian matrix
    Lambda = np.mean(diag_S) + 1j * mu
    Vc = V.conj().T
    return Lambda, Vc @ P, Vc @ B_orig, V, B_orig


def init_s5_eigs(P: int, blocks: int = 1, conj_sym: bool = True):
    """Block-diagonal HiPPO initialisation of S5's eigenvalues and eigenvectors.

    `blocks` copies of `make_dplr_hippo(P // blocks)` on the diagonal. Under conj_sym only the first half
    of each block's eigenpairs is kept (their conjugates are implied).

    Returns (Lambda (P_s,), V (P, P_s), Vinv (P_s, P)) with P_s = P // 2 under conj_sym, else P.
    """
    if P < 1 or blocks < 1:
        raise ValueError(f"state size P={P} and blocks={blocks} must both be positive integers")
    if P % blocks != 0:
        raise ValueError(
            f"state size P={P} is not divisible by blocks={blocks}: choose P (--ssm_size_base) as a "
            f"multiple of --blocks"
        )
    block = P // blocks
    if conj_sym and block % 2 != 0:
        raise ValueError(
            f"conj_sym needs an even block size, but P={P} / blocks={blocks} = {block}: choose P and "
            f"blocks so that P // blocks is even, or turn conj_sym off"
        )
    Lambda, _, _, V, _ = make_dplr_hippo(block)
    keep = block // 2 if conj_sym else block
    Lambda, V = Lambda[:keep], V[:, :keep]
    Lambdas = np.concatenate([Lambda] * blocks)
    V_full = np.zeros((P, keep * blocks), dtype=np.complex128)
    for i in range(blocks):
        V_full[i * block:(i + 1) * block, i * keep:(i + 1) * keep] = V
    return Lambdas, V_full, V_full.conj().T


# --------------------------------------------------------------------------------------------------
# Discretisation
# --------------------------------------------------------------------------------------------------


def discretize(Lambda, B_tilde, step, method: str = "zoh"):
    """Discretise the diagonal system x' = Λx + B̃u with one timestep per state.

    Lambda (P,), B_tilde (P, H), step (P,). Returns (Lambda_bar (P,), B_bar (P, H)).
      zoh:      Λ̄ = exp(Λ·step),               B̄ = (Λ̄ − 1)/Λ · B̃
      bilinear: Λ̄ = (1 + step/2·Λ)/(1 − step/2·Λ), B̄ = step/(1 − step/2·Λ) · B̃
    """
    if method == "zoh":
        Lambda_bar = jnp.exp(Lambda * step)
        return Lambda_bar, ((Lambda_bar - 1.0) / Lambda)[:, None] * B_tilde
    if method == "bilinear":
        BL = 1.0 / (1.0 - step / 2.0 * Lambda)
        return BL * (1.0 + step / 2.0 * Lambda), (BL * step)[:, None] * B_tilde
    raise ValueError(f"unknown discretization {method!r}: use 'zoh' or 'bilinear'")


# --------------------------------------------------------------------------------------------------
# The diagonal linear recurrence x_t = a_t ⊙ x_{t-1} + b_t: parallel scan and its sequential reference
# --------------------------------------------------------------------------------------------------


def _combine(left, right):
    """Compose two affine maps x ↦ a x + b (left first, then right)."""
    a_l, b_l = left
    a_r, b_r = right
    return a_r * a_l, a_r * b_l + b_r


def linear_scan(a, b, reverse: bool = False):
    """All states of x_t = a_t ⊙ x_{t-1} + b_t (x_{-1} = 0) along axis 0, by an associative scan.

    a is (L, P) or (P,) (one transition shared by every step); b is (L, P).
    reverse=True runs from the end: x_t = a_t ⊙ x_{t+1} + b_t, x_L = 0.
    """
    a = jnp.broadcast_to(a, b.shape)
    _, xs = jax.lax.associative_scan(_combine, (a, b), reverse=reverse, axis=0)
    return xs


def linear_recurrence(a, b, reverse: bool = False):
    """Reference for `linear_scan`: the same recurrence, one step at a time with lax.scan."""
    a = jnp.broadcast_to(a, b.shape)

    def step(x, ab):
        a_t, b_t = ab
        x = a_t * x + b_t
        return x, x

    _, xs = jax.lax.scan(step, jnp.zeros_like(b[0]), (a, b), reverse=reverse)
    return xs


# --------------------------------------------------------------------------------------------------
# Applying the discrete SSM to a sequence
# --------------------------------------------------------------------------------------------------


def readout(xs, C_tilde, conj_sym: bool):
    """y_t = Re(C̃ x_t), doubled under conjugate symmetry. xs (L, P'), C_tilde (H, P') → (L, H) real."""
    y = (xs @ C_tilde.T).real
    return 2.0 * y if conj_sym else y


def apply_ssm(Lambda_bar, B_bar, C_tilde, u, conj_sym: bool, bidirectional: bool = False):
    """Output of the discrete diagonal SSM for one sequence (without the D term).

    Lambda_bar (P,) or (L, P) for a time-varying diagonal transition; B_bar (P, H); u (L, H).
    C_tilde is (H, P), or (H, 2P) under `bidirectional`, acting on [x_fwd, x_bwd] where x_bwd is the
    same recurrence run from the end of the sequence. A time-varying transition is indexed by each
    direction's own time (t counts from the sequence end in the backward direction).
    Returns y (L, H) real.
    """
    Bu = u.astype(B_bar.dtype) @ B_bar.T  # (L, P)
    xs = linear_scan(Lambda_bar, Bu)
    if bidirectional:
        a_bwd = Lambda_bar if Lambda_bar.ndim == 1 else Lambda_bar[::-1]
        xs = jnp.concatenate([xs, linear_scan(a_bwd, Bu, reverse=True)], axis=-1)
    return readout(xs, C_tilde, conj_sym)


# --------------------------------------------------------------------------------------------------
# Initialisers
# --------------------------------------------------------------------------------------------------


def log_step_init(dt_min: float, dt_max: float):
    """One log-uniform timestep per state: log(step) ~ U(log dt_min, log dt_max)."""

    def init(key, shape):
        return jax.random.uniform(key, shape, minval=np.log(dt_min), maxval=np.log(dt_max))

    return init


def as_complex(x):
    return x[..., 0] + 1j * x[..., 1]


def real_pair(z):
    """Complex array → trailing (re, im) axis: parameters are stored real so optimisers see real leaves."""
    return jnp.stack([z.real, z.imag], axis=-1).astype(jnp.float32)


def complex_normal_init(scale: float = 1.0):
    """Complex normal initialiser with E|z|² = scale² (std scale/√2 per part), stored as a trailing (re, im)
    axis: init(key, shape) → shape + (2,)."""

    def init(key, shape):
        return scale * jax.random.normal(key, tuple(shape) + (2,)) * np.sqrt(0.5)

    return init


C_INITS = ("trunc_standard_normal", "lecun_normal", "complex_normal")


def init_C_tilde(key, C_init: str, H: int, V, Vinv_rows: int, n_dirs: int):
    """C̃ (H, n_dirs·P_s) as (re, im) pairs.

    trunc_standard_normal: each entry of the real-basis C (H, P) truncated normal with std 1/sqrt(P),
    lecun_normal: lecun-normal over the (H, P, 2) array (fan-in P·H); both are then taken into the
    eigenbasis C̃ = C V (per direction). complex_normal: C̃ drawn directly, std √½ per part.
    """
    P, P_s = V.shape
    keys = jax.random.split(key, n_dirs)
    blocks = []
    for k in keys:
        if C_init == "complex_normal":
            blocks.append(complex_normal_init()(k, (H, P_s)))
            continue
        if C_init == "trunc_standard_normal":
            C = jax.random.truncated_normal(k, -2.0, 2.0, (H, P, 2)) / np.sqrt(P) / 0.87962566103423978
        elif C_init == "lecun_normal":
            C = nn.initializers.lecun_normal()(k, (H, P, 2))
        else:
            raise ValueError(f"unknown C_init {C_init!r}: use one of {C_INITS}")
        blocks.append(real_pair(as_complex(C) @ V))
    return jnp.concatenate(blocks, axis=1)


# --------------------------------------------------------------------------------------------------
# The Flax module
# --------------------------------------------------------------------------------------------------


class S5SSM(nn.Module):
    """S5 layer on one sequence: (L, H) → (L, H).

    P is the state size of the real system (`--ssm_size_base`); under conj_sym the layer carries P/2
    complex states. Parameters (real leaves, named for the optimiser's groups): Lambda_re, Lambda_im (P_s,),
    B (P_s, H, 2) = Vinv·B in the eigenbasis, C (H, P_s·dirs, 2), D (H,), log_step (P_s,).
    """

    H: int
    P: int
    blocks: int = 1
    C_init: str = "lecun_normal"
    discretization: str = "zoh"
    dt_min: float = 0.001
    dt_max: float = 0.1
    conj_sym: bool = True
    clip_eigs: bool = False
    bidirectional: bool = False
    step_rescale: float = 1.0

    def setup(self):
        if self.C_init not in C_INITS:
            raise ValueError(f"unknown C_init {self.C_init!r}: use one of {C_INITS}")
        if self.discretization not in ("zoh", "bilinear"):
            raise ValueError(f"unknown discretization {self.discretization!r}: use 'zoh' or 'bilinear'")
        Lambda, V, Vinv = init_s5_eigs(self.P, self.blocks, self.conj_sym)
        self.P_s = Lambda.shape[0]
        V, Vinv = jnp.asarray(V, jnp.complex64), jnp.asarray(Vinv, jnp.complex64)
        self.Lambda_re = self.param("Lambda_re", lambda k: jnp.asarray(Lambda.real, jnp.float32))
        self.Lambda_im = self.param("Lambda_im", lambda k: jnp.asarray(Lambda.imag, jnp.float32))
        self.B = self.param(
            "B", lambda k: real_pair(Vinv @ nn.initializers.lecun_normal()(k, (self.P, self.H)))
        )
        n_dirs = 2 if self.bidirectional else 1
        self.C = self.param("C", lambda k: init_C_tilde(k, self.C_init, self.H, V, self.P_s, n_dirs))
        self.D = self.param("D", nn.initializers.normal(stddev=1.0), (self.H,))
        self.log_step = self.param("log_step", log_step_init(self.dt_min, self.dt_max), (self.P_s,))

    # The continuous and discrete systems -----------------------------------------------------------
    def Lambda(self):
        re = jnp.minimum(self.Lambda_re, -1e-4) if self.clip_eigs else self.Lambda_re
        return re + 1j * self.Lambda_im

    def discrete_system(self):
        """(Λ̄ (P_s,), B̄ (P_s, H), C̃ (H, P_s·dirs)) in complex64."""
        step = self.step_rescale * jnp.exp(self.log_step)
        Lambda_bar, B_bar = discretize(self.Lambda(), as_complex(self.B), step, self.discretization)
        return Lambda_bar, B_bar, as_complex(self.C)

    # Parallel mode -------------------------------------------------------------------------------
    def __call__(self, u):
        Lambda_bar, B_bar, C_tilde = self.discrete_system()
        return apply_ssm(Lambda_bar, B_bar, C_tilde, u, self.conj_sym, self.bidirectional) + self.D * u

    # Recurrent mode ------------------------------------------------------------------------------
    def initial_state(self):
        """x_{-1} = 0, complex (P_s,)."""
        return jnp.zeros((self.P_s,), jnp.complex64)

    def recurrent_system(self, seq_len=None):
        """What every step reuses: (Λ̄, B̄, C̃). Every SSM in the harness has this method; a stack forms it once per
        sequence (outside its loop over time) and passes it to `step(..., system=...)`."""
        if self.bidirectional:
            raise ValueError("a bidirectional SSM has no recurrent mode: its backward direction needs "
                             "the whole sequence; use the parallel mode")
        return self.discrete_system()

    def step(self, x_prev, u_t, t=None, seq_len=None, system=None):
        """One step of streaming inference: (x_{t-1}, u_t (H,)) → (x_t, y_t (H,)).

        `t` and `seq_len` are unused by S5 (its transition does not depend on time) and exist so every
        SSM in the harness has the same step signature. `system` = recurrent_system(seq_len), or None to
        form it here. A bidirectional layer cannot stream (its backward direction needs the future), so it
        has no recurrent mode.
        """
        Lambda_bar, B_bar, C_tilde = self.recurrent_system(seq_len) if system is None else system
        x = Lambda_bar * x_prev + B_bar @ u_t.astype(B_bar.dtype)
        return x, readout(x[None], C_tilde, self.conj_sym)[0] + self.D * u_t


# --------------------------------------------------------------------------------------------------
# The registry of SSM types: one declaration per type, in the module that implements it
# --------------------------------------------------------------------------------------------------
#
# Every `--ssm_type` is one SSMType, registered by its own module (ssm.py: s5; ssm_ex.py: aux, extend; s4.py: s4,
# s4d, dss; s6_lru.py: s6, lru; a file named in SSM_MODULES: the lab's next idea). models.py, config.py,
# inspect_run.py, bench.py and run_train_ex.sh read the registry; none of them lists types.

@dataclass(frozen=True)
class Option:
    """One command-line option of an SSM type: `--name` (a flag --name/--no-name when `flag`), its default and
    help line; it sets the module's field `field` (default: the option's name) to `convert(value)`. `arch`: the
    parameters' shapes depend on it (a checkpoint loads only into a model with the same value)."""

    name: str
    default: Any
    help: str
    type: Callable | None = None
    choices: tuple | None = None
    flag: bool = False
    field: str | None = None
    convert: Callable | None = None
    arch: bool = False

    def argparse_kw(self) -> dict:
        if self.flag:
            return dict(action=argparse.BooleanOptionalAction, help=self.help)
        kw = dict(help=self.help)
        if self.type is not None:
            kw["type"] = self.type
        if self.choices is not None:
            kw["choices"] = self.choices
        return kw


@dataclass(frozen=True)
class Picture:
    """An extra picture of inspect_run.py: `numbers(module, params, L)` → one layer's numbers; `plot(path, {layer:
    numbers})` draws them into `file`; `report(numbers)` → the layer's entries of inspect.json."""

    file: str
    numbers: Callable
    plot: Callable
    report: Callable


# The optimiser roles of a parameter leaf (models.param_label turns them into groups; --opt_config's help):
#   eig        the SSM group (the SSM learning rate, no weight decay): eigenvalues and their kin
#   extension  the SSM group, and the only leaves trained on top of a frozen S5 base (--freeze base)
#   step       the SSM group, or the regular one under --dt_global (the step Δ)
#   B, C, D    placed by --opt_config (the S5 release's groups for B, C and D)
#   regular    the regular group (the global learning rate, weight decay)
ROLES = ("eig", "extension", "step", "B", "C", "D", "regular")


@dataclass(frozen=True)
class SSMType:
    """One `--ssm_type`: its name(s); its module class (whose `__call__` is the parallel mode and `initial_state`,
    `recurrent_system`, `step` the recurrent mode); its own options; `params`: the role (ROLES) of every parameter
    leaf of the module, by leaf name; `eigs(module, params)` → (the discrete eigenvalues Λ̄ as a complex array,
    the steps Δ or None) for inspect_run's eigenvalue and timescale pictures, with `eigs_note` after "learned
    steps Δ"; extra `pictures`; `bench`: {variant name: extra argv} for bench.py's train and memory sections;
    `check(args, error)`: checks of its options (error(message) exits 2); `module_kw(cfg, meta)`: module fields set
    from elsewhere than its options (e.g. the dataset's length); `frozen_base`: trains on top of an S5 checkpoint
    under --freeze base; `summary`: one line for --help."""

    names: tuple
    cls: type
    summary: str
    options: tuple = ()
    params: dict = field(default_factory=dict)
    eigs: Callable | None = None
    eigs_note: str = ""
    pictures: tuple = ()
    bench: dict = field(default_factory=dict)
    check: Callable | None = None
    module_kw: Callable | None = None
    frozen_base: bool = False
    module: str = ""

    @property
    def name(self):
        return self.names[0]

    def option_names(self):
        return {o.name for o in self.options}


TYPES: dict[str, SSMType] = {}  # name → declaration (a type with two names appears twice)
OPTIONS: dict[str, Option] = {}  # every type's options by name (a shared option once)


def register(decl: SSMType) -> SSMType:
    """Add a declaration to the registry; a ValueError when it clashes with one already there or names a role or
    field the module does not have."""
    fields = set(getattr(decl.cls, "__dataclass_fields__", {}))
    for o in decl.options:
        if (o.field or o.name) not in fields:
            raise ValueError(f"ssm_type {decl.name}: option --{o.name} sets {o.field or o.name}, which "
                             f"{decl.cls.__name__} does not have")
        if o.name in OPTIONS and OPTIONS[o.name] is not o:
            raise ValueError(f"ssm_type {decl.name}: option --{o.name} is declared differently by another type "
                             f"(share the Option object)")
    bad = {leaf: role for leaf, role in decl.params.items() if role not in ROLES}
    if bad:
        raise ValueError(f"ssm_type {decl.name}: unknown parameter roles {bad}; use one of {ROLES}")
    for name in decl.names:
        if name in TYPES and TYPES[name].cls is not decl.cls:
            raise ValueError(f"ssm_type {name!r} is declared twice ({TYPES[name].cls.__name__}, {decl.cls.__name__})")
    for o in decl.options:
        OPTIONS[o.name] = o
    for name in decl.names:
        TYPES[name] = decl
    return decl


def ssm_type(name: str) -> SSMType:
    """The declaration of `--ssm_type name`; a ValueError naming the known ones (and SSM_MODULES) otherwise."""
    if name not in TYPES:
        raise ValueError(f"unknown ssm_type {name!r}: use one of {', '.join(TYPES)} (a type of your own: name its "
                         f"file in the environment variable {PLUGIN_VARIABLE}, TRAINING.md)")
    return TYPES[name]


def declarations() -> list[SSMType]:
    """Every registered declaration once, in the order of registration."""
    return list({id(d): d for d in TYPES.values()}.values())


def types_taking(option: str) -> list[str]:
    return [n for n, d in TYPES.items() if option in d.option_names()]


PLUGIN_VARIABLE = "SSM_MODULES"  # paths of .py files, separated by ':', each registering SSM types


def load_plugins(value: str | None = None) -> list[str]:
    """Import every file named in SSM_MODULES (once): each registers its own SSM types. → the files imported.
    A missing file is a ValueError naming it."""
    value = os.environ.get(PLUGIN_VARIABLE, "") if value is None else value
    done = []
    for path in (p for p in value.split(":") if p.strip()):
        path = Path(path).expanduser().resolve()
        name = f"ssm_plugin_{path.stem}"
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
            continue
        if not path.is_file():
            raise ValueError(f"{PLUGIN_VARIABLE}: no file {path}")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        done.append(str(path))
    return done


def s5_eigs(module, p):
    """Λ̄ of an S5-type layer and its steps Δ = exp(log_step)."""
    Lambda_bar, _, _ = module.bind({"params": p}).discrete_system()
    return np.asarray(Lambda_bar), np.exp(np.asarray(p["log_step"], np.float64))


def check_s5(args, error):
    """The options of S5 and its extensions."""
    if args.blocks < 1:
        error(f"--blocks must be at least 1, got {args.blocks}")
    if args.ssm_size_base % args.blocks:
        error(f"--ssm_size_base {args.ssm_size_base} is not divisible by --blocks {args.blocks}")
    if args.conj_sym and (args.ssm_size_base // args.blocks) % 2:
        error(f"--conj_sym needs an even block size; ssm_size_base/blocks = {args.ssm_size_base // args.blocks}")
    check_steps(args, error)


def check_steps(args, error):
    """--dt_min and --dt_max, of every type with a learned step Δ."""
    if args.dt_min <= 0 or args.dt_max < args.dt_min:
        error("need 0 < --dt_min <= --dt_max")


DT_MIN = Option("dt_min", 0.001, "smallest initial step Δ (log-uniform in [dt_min, dt_max])", type=float)
DT_MAX = Option("dt_max", 0.1, "largest initial step Δ", type=float)
S5_OPTIONS = (
    Option("blocks", 1, "HiPPO blocks in the initialisation", type=int, arch=True),
    Option("C_init", "lecun_normal", "initialisation of the output matrix C (the S5 release's)", choices=C_INITS,
           arch=True),
    Option("discretization", "zoh", "zero-order hold or bilinear", choices=("zoh", "bilinear")),
    DT_MIN, DT_MAX,
    Option("conj_sym", True, "keep one of each conjugate pair of eigenvalues (half the states, output 2·Re)",
           flag=True, arch=True),
    Option("clip_eigs", False, "keep the real parts of the eigenvalues below -1e-4", flag=True),
)
S5_PARAMS = dict(Lambda_re="eig", Lambda_im="eig", B="B", C="C", D="D", log_step="step")


register(SSMType(("s5",), S5SSM, "S5 (this file)", options=S5_OPTIONS, params=S5_PARAMS, eigs=s5_eigs,
                 bench={"s5": ["--ssm_type", "s5"]}, check=check_s5, module="ssm.py"))
