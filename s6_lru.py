"""Two modern baselines inside the harness's own layer: Mamba's selective SSM (S6) and the Linear Recurrent Unit.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023 (S6);
Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu & De, "Resurrecting Recurrent Neural Networks for Long
Sequences", ICML 2023 (LRU).

Everything works on ONE sequence: u is (L, H). Callers vmap over the batch. t = 0..L-1, x_{-1} = 0.

S6 (the selective SSM without Mamba's convolution and gate: the harness's norm, activation and residual wrap it
like every other SSM). Per channel h, N real diagonal states; the step Δ_t, B_t and C_t are functions of the
input u_t, so the transition varies with the INPUT (the lab's extensions vary it with TIME):

    Δ_t = softplus(W_Δ u_t + b_Δ) (H,),   B_t = W_B u_t (N,),   C_t = W_C u_t (N,),   A = −exp(A_log) (H, N)
    x_t = exp(Δ_t A) ⊙ x_{t−1} + (Δ_t u_t) B_t    (x_t is H × N; (Δ_t u_t) B_t is the outer product)
    y_t = x_t C_t + D ⊙ u_t

Ā = exp(ΔA) is the zero-order hold of A; B̄u = ΔBu is the simplified hold that Mamba uses. W_Δ is low rank
(H × R × H, R = ⌈H/16⌉). Initialisation: A_log[h, n] = log(n + 1) (S4D-real), D = 1, b_Δ = softplus⁻¹(dt) with
dt log-uniform in [dt_min, dt_max] (floored at 1e-4), so Δ starts in that range.

LRU. P complex diagonal states (no conjugate pairs: the real part of the readout is taken instead):

    λ = exp(−exp(ν_log) + i·exp(θ_log)) (P,),   x_t = λ ⊙ x_{t−1} + exp(γ_log) ⊙ (B u_t),   y_t = Re(C x_t) + D ⊙ u_t

with B (P, H), C (H, P) complex. The exponential parameterisation keeps |λ| < 1 for any ν_log. Ring
initialisation: |λ| uniform on the annulus r_min ≤ |λ| ≤ r_max (the area, not the radius, is uniform), phase
uniform in [0, max_phase]; γ = √(1 − |λ|²) normalises each state's stationary variance under white input.

Bidirectional (both): as ssm.apply_ssm, the same recurrence also runs from the end of the sequence (x_L = 0,
x_t = a_t ⊙ x_{t+1} + b_t with the same per-position a_t, b_t), and the readout acts on [x_fwd, x_bwd]: S6's C_t
is then (2N,) (W_C is H × 2N), the LRU's C is (H, 2P). Neither then has a recurrent mode.

Another sampling rate (`step_rescale` k, --eval_resolutions: x[::k] evaluated with a model trained on x):
  S6 is continuous-time in A: every step Δ_t is multiplied by k (so are Ā's exponent and B̄ = ΔB), exactly as
  S5's steps are; Δ_t's dependence on the input is left as trained.
  The LRU is discrete-time and has no exact rate change. A rate k applies λ^k per step and scales the input by
  (λ^k − 1)/(λ − 1) = 1 + λ + ... + λ^{k−1}: the k fine steps the coarse step stands for, with the input held
  over them. At k = 1 both are the identity.

Memory (S6). The states are (L, H, N), N times S5's per feature; at the S5 recipes' lengths that is the largest
array of a training step. `selective_scan` therefore scans the channels in blocks of at most CHANNEL_BUDGET / (L·N)
channels, one block at a time (lax.map), and each block is rematerialised in the backward pass (jax.checkpoint),
so the reverse pass keeps only the inputs of each block alive, not their states.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import ssm
from ssm import apply_ssm, as_complex, linear_scan

CHANNEL_BUDGET = 2 ** 20  # elements of one block's states L × channels × N, per sequence

# --------------------------------------------------------------------------------------------------
# S6: the selective scan
# --------------------------------------------------------------------------------------------------


def channel_block(L: int, H: int, N: int, budget: int = CHANNEL_BUDGET) -> int:
    """The largest divisor hb of H with L·hb·N ≤ budget (at least 1): channels scanned together."""
    fit = max(1, budget // max(L * N, 1))
    return max(d for d in range(1, H + 1) if H % d == 0 and d <= fit)


def selective_scan(u, delta, A, B, C, D, bidirectional: bool = False, block: int | None = None):
    """y (L, H) of the selective SSM (see the module docstring) for one sequence.

    u (L, H), delta (L, H) = Δ_t (> 0), A (H, N) (negative), B (L, N), C (L, N) or (L, 2N) under `bidirectional`
    (acting on [x_fwd, x_bwd]), D (H,). `block`: channels per block (default `channel_block`).
    """
    L, H = u.shape
    N = A.shape[1]
    hb = channel_block(L, H, N) if block is None else block
    if H % hb:
        raise ValueError(f"block={hb} must divide the number of channels H={H}")

    @jax.checkpoint
    def states_out(u_b, d_b, A_b):  # (L, hb), (L, hb), (hb, N) → (L, hb)
        a = jnp.exp(d_b[..., None] * A_b)  # exp(Δ_t A), (L, hb, N)
        b = (d_b * u_b)[..., None] * B[:, None, :]  # (Δ_t u_t) B_t
        y = jnp.einsum("lhn,ln->lh", linear_scan(a, b), C[:, :N])
        if bidirectional:
            y = y + jnp.einsum("lhn,ln->lh", linear_scan(a, b, reverse=True), C[:, N:])
        return y

    if hb == H:
        y = states_out(u, delta, A)
    else:
        split = lambda x: jnp.moveaxis(x.reshape(L, H // hb, hb), 1, 0)  # noqa: E731  (L, H) → (H/hb, L, hb)
        ys = jax.lax.map(lambda args: states_out(*args), (split(u), split(delta), A.reshape(H // hb, hb, N)))
        y = jnp.moveaxis(ys, 0, 1).reshape(L, H)
    return y + D * u


def selective_scan_ref(u, delta, A, B, C, D, bidirectional: bool = False):
    """The plain loop `selective_scan` must equal: one step at a time, as the module docstring writes it."""
    N = A.shape[1]

    def run(inputs, reverse):
        def step(x, inp):  # x (H, N)
            u_t, d_t, B_t = inp
            x = jnp.exp(d_t[:, None] * A) * x + (d_t * u_t)[:, None] * B_t[None, :]
            return x, x

        return jax.lax.scan(step, jnp.zeros_like(A), inputs, reverse=reverse)[1]  # (L, H, N)

    y = jnp.einsum("lhn,ln->lh", run((u, delta, B), False), C[:, :N])
    if bidirectional:
        y = y + jnp.einsum("lhn,ln->lh", run((u, delta, B), True), C[:, N:])
    return y + D * u


def inverse_softplus(y):
    """x with softplus(x) = log(1 + e^x) = y > 0."""
    return y + jnp.log(-jnp.expm1(-y))


def delta_bias_init(dt_min: float, dt_max: float, floor: float = 1e-4):
    """b_Δ = softplus⁻¹(dt), dt = exp(U(log dt_min, log dt_max)) floored at `floor`: Δ starts in [dt_min, dt_max]."""

    def init(key, shape):
        dt = jnp.exp(jax.random.uniform(key, shape, minval=np.log(dt_min), maxval=np.log(dt_max)))
        return inverse_softplus(jnp.maximum(dt, floor))

    return init


def symmetric_uniform(scale: float):
    """U(−scale, scale) entries."""
    return lambda key, shape: jax.random.uniform(key, shape, minval=-scale, maxval=scale)


class S6SSM(nn.Module):
    """Mamba's selective SSM on one sequence: (L, H) → (L, H); N real states per channel (`--s6_state_size`).

    Parameters: A_log (H, N), D (H,), W_Delta_down (H, R), W_Delta_up (R, H), b_Delta (H,), W_B (H, N),
    W_C (H, dirs·N). `P` (the harness's state size) is unused: the state is H × N.
    """

    H: int
    P: int = 0
    N: int = 16
    dt_min: float = 0.001
    dt_max: float = 0.1
    bidirectional: bool = False
    step_rescale: float = 1.0

    def setup(self):
        if self.N < 1:
            raise ValueError(f"the S6 state size N={self.N} (--s6_state_size) must be at least 1")
        R = math.ceil(self.H / 16)
        n_dirs = 2 if self.bidirectional else 1
        self.A_log = self.param(
            "A_log", lambda k: jnp.tile(jnp.log(jnp.arange(1, self.N + 1, dtype=jnp.float32)), (self.H, 1)))
        self.D = self.param("D", nn.initializers.ones, (self.H,))
        self.W_Delta_down = self.param("W_Delta_down", nn.initializers.lecun_normal(), (self.H, R))
        self.W_Delta_up = self.param("W_Delta_up", symmetric_uniform(1 / np.sqrt(R)), (R, self.H))
        self.b_Delta = self.param("b_Delta", delta_bias_init(self.dt_min, self.dt_max), (self.H,))
        self.W_B = self.param("W_B", nn.initializers.lecun_normal(), (self.H, self.N))
        self.W_C = self.param("W_C", nn.initializers.lecun_normal(), (self.H, n_dirs * self.N))

    def A(self):
        return -jnp.exp(self.A_log)

    def selection(self, u):
        """(Δ, B, C) of inputs u (..., H): (..., H), (..., N), (..., dirs·N); Δ × step_rescale."""
        delta = jax.nn.softplus(u @ self.W_Delta_down @ self.W_Delta_up + self.b_Delta)
        return self.step_rescale * delta, u @ self.W_B, u @ self.W_C

    def __call__(self, u):
        delta, B, C = self.selection(u)
        return selective_scan(u, delta, self.A(), B, C, self.D, self.bidirectional)

    def initial_state(self):
        """x_{-1} = 0, real (H, N)."""
        return jnp.zeros((self.H, self.N), jnp.float32)

    def recurrent_system(self, seq_len=None):
        """A (H, N), what every step reuses (Δ, B, C are formed from each input); seq_len unused."""
        if self.bidirectional:
            raise ValueError("a bidirectional SSM has no recurrent mode: its backward direction needs the whole "
                             "sequence; use the parallel mode")
        return self.A()

    def step(self, x_prev, u_t, t=None, seq_len=None, system=None):
        """(x_{t-1} (H, N), u_t (H,)) → (x_t, y_t (H,)):  x_t = exp(Δ_t A) ⊙ x_{t−1} + (Δ_t u_t) B_t,
        y_t = x_t C_t + D u_t."""
        A = self.recurrent_system() if system is None else system
        delta, B, C = self.selection(u_t)
        x = jnp.exp(delta[:, None] * A) * x_prev + (delta * u_t)[:, None] * B[None, :]
        return x, x @ C + self.D * u_t


# --------------------------------------------------------------------------------------------------
# LRU
# --------------------------------------------------------------------------------------------------


def lru_discrete(nu_log, theta_log, gamma_log, B, rate: float = 1.0):
    """(λ̄ (P,), B̄ (P, H)) of the LRU at sampling rate `rate` (k): λ̄ = λ^k, B̄ = γ (λ^k − 1)/(λ − 1) B (the k-step
    hold; rate 1: λ̄ = λ, B̄ = γ B exactly). B (P, H) complex."""
    log_lambda = -jnp.exp(nu_log) + 1j * jnp.exp(theta_log)
    B_bar = jnp.exp(gamma_log)[:, None] * B
    if rate == 1:
        return jnp.exp(log_lambda), B_bar
    Lambda = jnp.exp(log_lambda)
    Lambda_k = jnp.exp(rate * log_lambda)
    return Lambda_k, ((Lambda_k - 1.0) / (Lambda - 1.0))[:, None] * B_bar


def apply_lru(nu_log, theta_log, gamma_log, B, C, D, u, bidirectional: bool = False, rate: float = 1.0):
    """y (L, H) of the LRU for one sequence: x_t = λ ⊙ x_{t−1} + exp(γ_log) ⊙ (B u_t), y_t = Re(C x_t) + D ⊙ u_t.

    nu_log, theta_log, gamma_log (P,) real; B (P, H) complex; C (H, P) complex, or (H, 2P) under `bidirectional`
    (acting on [x_fwd, x_bwd]); D (H,); u (L, H). `rate` k ≠ 1: λ^k and the k-step hold (`lru_discrete`).
    """
    Lambda_bar, B_bar = lru_discrete(nu_log, theta_log, gamma_log, B, rate)
    return apply_ssm(Lambda_bar, B_bar, C, u, conj_sym=False, bidirectional=bidirectional) + D * u


def ring_init(r_min: float, r_max: float, max_phase: float):
    """(init of ν_log, init of θ_log): |λ| = exp(−exp(ν_log)) with |λ|² uniform on [r_min², r_max²] (uniform over
    the annulus' area), phase exp(θ_log) uniform on (0, max_phase]."""

    def nu_init(key, shape):
        u1 = jax.random.uniform(key, shape)
        return jnp.log(-0.5 * jnp.log(u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2))

    def theta_init(key, shape):
        u2 = jax.random.uniform(key, shape, minval=1e-6, maxval=1.0)  # exp(θ_log) > 0: θ_log finite
        return jnp.log(u2 * max_phase)

    return nu_init, theta_init


def check_ring(r_min: float, r_max: float, max_phase: float):
    if not 0 <= r_min < r_max < 1:
        raise ValueError(f"the LRU ring needs 0 <= r_min < r_max < 1 (|λ| < 1 is stable), got r_min={r_min}, "
                         f"r_max={r_max} (--lru_r_min, --lru_r_max)")
    if not max_phase > 0:
        raise ValueError(f"the LRU's max_phase (--lru_max_phase) must be > 0, got {max_phase}")


class LRUSSM(nn.Module):
    """The Linear Recurrent Unit on one sequence: (L, H) → (L, H), P complex states (`--ssm_size_base`).

    Parameters: nu_log, theta_log, gamma_log (P,); B (P, H, 2), C (H, dirs·P, 2) as (re, im) pairs, each part
    normal with variance 1/(2H) (B) and 1/P (C); D (H,) standard normal.
    """

    H: int
    P: int
    r_min: float = 0.9
    r_max: float = 0.999
    max_phase: float = 2 * np.pi
    bidirectional: bool = False
    step_rescale: float = 1.0

    def setup(self):
        check_ring(self.r_min, self.r_max, self.max_phase)
        if self.P < 1:
            raise ValueError(f"the LRU's state size P={self.P} (--ssm_size_base) must be at least 1")
        n_dirs = 2 if self.bidirectional else 1
        nu_init, theta_init = ring_init(self.r_min, self.r_max, self.max_phase)
        self.nu_log = self.param("nu_log", nu_init, (self.P,))
        self.theta_log = self.param("theta_log", theta_init, (self.P,))
        # γ = √(1 − |λ|²) of the initial λ, |λ|² = exp(−2 exp(ν_log))
        self.gamma_log = self.param("gamma_log", lambda k: 0.5 * jnp.log(-jnp.expm1(-2 * jnp.exp(self.nu_log))))
        self.B = self.param("B", lambda k, s: jax.random.normal(k, s) / np.sqrt(2 * self.H), (self.P, self.H, 2))
        self.C = self.param("C", lambda k, s: jax.random.normal(k, s) / np.sqrt(self.P),
                            (self.H, n_dirs * self.P, 2))
        self.D = self.param("D", nn.initializers.normal(stddev=1.0), (self.H,))

    def discrete_system(self):
        """(λ̄ (P,), B̄ (P, H), C (H, dirs·P)) in complex64, at the layer's step_rescale."""
        Lambda_bar, B_bar = lru_discrete(self.nu_log, self.theta_log, self.gamma_log, as_complex(self.B),
                                         self.step_rescale)
        return Lambda_bar, B_bar, as_complex(self.C)

    def __call__(self, u):
        return apply_lru(self.nu_log, self.theta_log, self.gamma_log, as_complex(self.B), as_complex(self.C),
                         self.D, u, self.bidirectional, self.step_rescale)

    def initial_state(self):
        """x_{-1} = 0, complex (P,)."""
        return jnp.zeros((self.P,), jnp.complex64)

    def recurrent_system(self, seq_len=None):
        """(λ̄, B̄, C), what every step reuses; seq_len unused."""
        if self.bidirectional:
            raise ValueError("a bidirectional SSM has no recurrent mode: its backward direction needs the whole "
                             "sequence; use the parallel mode")
        return self.discrete_system()

    def step(self, x_prev, u_t, t=None, seq_len=None, system=None):
        """(x_{t-1} (P,), u_t (H,)) → (x_t, y_t (H,))."""
        Lambda_bar, B_bar, C = self.recurrent_system() if system is None else system
        x = Lambda_bar * x_prev + B_bar @ u_t.astype(B_bar.dtype)
        return x, (C @ x).real + self.D * u_t


# --------------------------------------------------------------------------------------------------
# The declarations of s6 and lru (ssm.register)
# --------------------------------------------------------------------------------------------------


def s6_eigs(module, p):
    """exp(Δ A) at the bias step Δ = softplus(b_Δ) (S6's steps depend on the input: the transition of a zero
    input), and those steps."""
    m = module.bind({"params": p})
    step = np.asarray(jax.nn.softplus(m.b_Delta), np.float64) * module.step_rescale
    return np.exp(step[:, None] * np.asarray(m.A(), np.float64)).ravel().astype(complex), step


def lru_eigs(module, p):
    """The LRU's λ (discrete-time: no step Δ)."""
    return np.asarray(module.bind({"params": p}).discrete_system()[0]), None


def _check_s6(args, error):
    if args.s6_state_size < 1:
        error(f"--s6_state_size must be at least 1, got {args.s6_state_size}")
    ssm.check_steps(args, error)


def _check_lru(args, error):
    if not 0 <= args.lru_r_min < args.lru_r_max < 1:
        error(f"need 0 <= --lru_r_min < --lru_r_max < 1 (|λ| < 1 keeps the LRU stable), got {args.lru_r_min} and "
              f"{args.lru_r_max}")
    if not args.lru_max_phase > 0:
        error(f"--lru_max_phase must be > 0, got {args.lru_max_phase}")


ssm.register(ssm.SSMType(
    ("s6",), S6SSM, "Mamba's selective SSM (this file)", module="s6_lru.py",
    options=(ssm.DT_MIN, ssm.DT_MAX,
             ssm.Option("s6_state_size", 16, "--ssm_type s6: N real states per channel (Mamba: 16)", type=int,
                        field="N", arch=True)),
    params=dict(A_log="eig", D="D", W_Delta_down="regular", W_Delta_up="regular", b_Delta="step", W_B="regular",
                W_C="regular"),
    eigs=s6_eigs, eigs_note=" at the bias softplus(b_Δ) (S6: zero input)", bench={"s6": ["--ssm_type", "s6"]},
    check=_check_s6))
ssm.register(ssm.SSMType(
    ("lru",), LRUSSM, "the Linear Recurrent Unit (this file)", module="s6_lru.py",
    options=(ssm.Option("lru_r_min", 0.9, "--ssm_type lru: smallest initial |λ| (ring initialisation)", type=float,
                        field="r_min"),
             ssm.Option("lru_r_max", 0.999, "--ssm_type lru: largest initial |λ|", type=float, field="r_max"),
             ssm.Option("lru_max_phase", 2 * np.pi, "--ssm_type lru: initial phases uniform in (0, this] (the LRU "
                        "paper: 2π, π/10 on the longest tasks)", type=float, field="max_phase")),
    params=dict(nu_log="eig", theta_log="eig", gamma_log="eig", B="B", C="C", D="D"),
    eigs=lru_eigs, bench={"lru": ["--ssm_type", "lru"]}, check=_check_lru))
