"""Time-varying S5: the auxiliary state and the Lambda extension.

Notation as in ssm.py (one sequence, t = 0..L-1, T = L, x_{-1} = 0, p_{-1} = 0, Λ̄ and B̄ from S5's
discretisation, y_t = Re(C̃ x_t) (2·Re under conj_sym) + D u_t).

Time schedules Δ(t) (`time_scale`):
    linear 1 + 0.1 t/T,  exponential exp(-0.01 t),  sinusoidal 1 + 0.1 sin(0.1 t),  constant 1.

Auxiliary state (E ∈ C^P):
    x_t = Λ̄ ⊙ x_{t-1} + B̄ u_t + E ⊙ p_{t-1},   p_t = Δ(t) x_t
  ⇔ x_t = (Λ̄ + E Δ(t-1)) ⊙ x_{t-1} + B̄ u_t          (Δ(-1) := 0, since p_{-1} = 0)
  a diagonal time-varying recurrence: computed exactly by the parallel scan `ssm.linear_scan`.

Lambda extension (E ∈ C^{P×R}, F ∈ C^{R×P}, δ(t) ∈ R^R):   Λ_ex(t) = diag(Λ̄) + E diag(δ(t)) F
  full: x_t = Λ̄ ⊙ x_{t-1} + E (δ(t) ⊙ (F x_{t-1})) + B̄ u_t     (dense transition, rank-R correction)
  diag: x_t = (Λ̄ + diag(E diag(δ(t)) F)) ⊙ x_{t-1} + B̄ u_t       (diagonal only: parallel scan)

Full mode: a time-varying linear system shared by the batch. Λ̄, E, F, δ(t) and the guard's scale s_t do not
depend on the sample; only b_t = B̄u_t does. So every P×P operator is built once per step of training, for the
whole batch, and the per-sample work is P-vectors only. `lowrank_scan` splits the sequence into n = ⌈L/C⌉
chunks of C steps (C ≈ √(L/2) by default) and makes three passes:
  0. shared:  each chunk's transition Φ_c = Λ_ex(end)···Λ_ex(start) (P×P), the identity carried through the
     chunk's C steps, all chunks at once: O(L P² R) work, once for the batch, C dependent steps;
  1. per sample, all chunks at once, each from a zero state: its end state e_c (C dependent steps);
  2. per sample, across chunks: h_{c+1} = Φ_c h_c + e_c, the true start state of every chunk (n steps);
  3. per sample, all chunks at once again from their true start states, keeping every state (C steps).
Every state equals the step-by-step recurrence (no truncation). Per sample: two runs of the recurrence,
O(L P R) each, plus O(L P²/C) across chunks; the batch is a matmul dimension in every step.
Sequential depth (dependent steps on the longest path): 2C + n ≈ 2√(2L) per direction and pass (L = 1024:
2·23 + 45 = 91 instead of 1024; L = 16,384: 2·91 + 181 = 363).

Reverse mode (`jax.custom_vjp`): nothing of the passes is stored but the states x_t and the n chunk maps. With
x̄_t the cotangent of state x_t and ḡ_t the cotangent arriving from the output, the adjoint recurrence runs
backwards with the transposed transitions, which are again diagonal plus rank R,
    κ_t = Λ_ex(t)ᵀ (κ_{t+1} + ḡ_t),  κ_L = 0,   x̄_t = κ_{t+1} + ḡ_t,   Λ_ex(t)ᵀ = diag(Λ̄) + Fᵀ diag(δ_t) Eᵀ diag(s_t),
by the same chunked scan, reusing the forward's Φ_cᵀ as its chunk maps; then, with v_t = F x_{t-1},
w_t = δ_t ⊙ v_t and m̄_t = s_t ⊙ x̄_t:
    Λ̄̄ = Σ_t x̄_t ⊙ x_{t-1},  Ē = Σ_t m̄_t w_tᵀ,  F̄ = Σ_t (δ_t ⊙ Eᵀm̄_t) x_{t-1}ᵀ,  δ̄_t = Re(Eᵀm̄_t ⊙ v_t),
    s̄_t = Re(x̄_t ⊙ E w_t),  b̄_t = x̄_t
(transposes, not conjugates: JAX's reverse mode of complex-linear maps). Memory: O(L (P + R)) per sample
(the states), O(n P²) shared, the same order as S5's scan, instead of O(L P²) per sample.

Another sampling rate (`step_rescale` k, e.g. a model trained at 16 kHz evaluated at 8 kHz on x[::k]): S5's
steps are multiplied by k, which is exact for its continuous-time system. The extensions' terms are discrete
(a schedule over steps, a learned table per step) and have no exact continuous-time meaning; they are read as
functions of physical time, the natural choice: step t at rate k is physical time k·t, so a schedule is read at
k·t (of a sequence of physical length k·L) and the learned δ table every k-th entry. With E = 0 both reduce
exactly to S5 at rate k.

Bidirectional: the backward direction is the same recurrence run on the reversed sequence with its own
time index (t counts from the sequence end), its states reversed back and concatenated as in S5.

Stability guard (modules only; the pure `apply_*` functions implement the equations exactly). Every
transition is kept non-expanding, so the state can grow at most linearly in L with bounded input and never
explodes, whatever E, F, δ are learned to be:
  * diagonal transitions (auxiliary state, diag mode, and Λ̄ in full mode): the modulus is clamped,
    a ← a · min(1, 1/|a|). A clamped entry keeps its phase and its gradient along the phase.
  * full mode: the rows of the correction are scaled, E_t ← diag(s_t) E, with
    s_{t,p} = min(1, (1 − |λ̄_p|) / Σ_r |E_pr| |δ_r(t)| Σ_q |F_rq|), so the row sums of |Λ_ex(t)| are
    ≤ 1, i.e. ‖Λ_ex(t)‖_∞ ≤ 1 and ‖x_t‖_∞ ≤ ‖x_{t-1}‖_∞ + ‖B̄ u_t‖_∞. The scaled correction is still rank R.
Where a model sits inside the bound (e.g. E = 0 and |Λ̄| < 1) the guard is the identity, so a warm-started
extension computes exactly the S5 function it started from.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn

import ssm

TIME_SCALES = ("linear", "exponential", "sinusoidal", "constant")
DELTA_TYPES = ("learned",) + TIME_SCALES
EXTEND_MODES = ("full", "diag")
EXTENSION_PARAMS = ("E", "F", "delta_table", "delta_amp")  # leaves that warm start trains on top of S5


# --------------------------------------------------------------------------------------------------
# Time schedules
# --------------------------------------------------------------------------------------------------


def schedule(t, T, kind: str):
    """Δ(t) for time index t (array or scalar) in a sequence of length T."""
    t = jnp.asarray(t, jnp.float32)
    if kind == "linear":
        return 1.0 + 0.1 * t / T
    if kind == "exponential":
        return jnp.exp(-0.01 * t)
    if kind == "sinusoidal":
        return 1.0 + 0.1 * jnp.sin(0.1 * t)
    if kind == "constant":
        return jnp.ones_like(t)
    raise ValueError(f"unknown time_scale_type {kind!r}: use one of {TIME_SCALES}")


def time_scale(L: int, kind: str, rate: float = 1.0):
    """The schedule Δ(t) for t = 0..L-1, (L,) float32. At `rate` k (the layer's step_rescale: a sequence sampled
    k times coarser) step t is physical time k·t of a sequence of physical length k·L."""
    return schedule(rate * jnp.arange(L), rate * L, kind)


# --------------------------------------------------------------------------------------------------
# Transitions
# --------------------------------------------------------------------------------------------------


def aux_transitions(Lambda_bar, E, delta):
    """a_t = Λ̄ + E Δ(t-1) with Δ(-1) = 0: (P,), (P,), (L,) → (L, P)."""
    delta_prev = jnp.concatenate([jnp.zeros((1,), delta.dtype), delta[:-1]])
    return Lambda_bar[None, :] + delta_prev[:, None] * E[None, :]


def extend_diag_transitions(Lambda_bar, E, F, delta):
    """a_t = Λ̄ + diag(E diag(δ(t)) F): (P,), (P,R), (R,P), (L,R) → (L, P)."""
    return Lambda_bar[None, :] + jnp.einsum("pr,lr,rp->lp", E, delta.astype(E.dtype), F)


def _shrink(size, limit):
    """min(1, limit/size), written so that its gradient is finite everywhere: the naive
    min(1, limit/max(size, eps)) has a derivative of ~limit/eps² (inf in float32) in its unused branch at
    size = 0, e.g. at E = 0 (a warm start), and inf·0 = NaN poisons every gradient."""
    over = size > limit
    return jnp.where(over, limit / jnp.where(over, size, 1.0), 1.0)


def clamp_modulus(a, r_max: float = 1.0):
    """a · min(1, r_max/|a|): same phase, modulus at most r_max."""
    return a * _shrink(jnp.abs(a), r_max)


def lowrank_row_scale(Lambda_bar, E, F, delta, r_max: float = 1.0):
    """s (L, P) such that ‖diag(Λ̄) + diag(s_t) E diag(δ(t)) F‖_∞ ≤ r_max for every t (needs |Λ̄| ≤ r_max).

    Uses the bound Σ_q |(E diag(δ) F)_pq| ≤ Σ_r |E_pr| |δ_r| Σ_q |F_rq|, O(L P R) instead of O(L P² R).
    """
    row_bound = jnp.abs(delta) @ (jnp.abs(E) * jnp.sum(jnp.abs(F), axis=1)[None, :]).T  # (L, P)
    room = jnp.maximum(r_max - jnp.abs(Lambda_bar), 0.0)[None, :]
    return _shrink(row_bound, room)


# --------------------------------------------------------------------------------------------------
# The low-rank time-varying recurrence (full mode)
# --------------------------------------------------------------------------------------------------


def default_chunk(L: int) -> int:
    """C ≈ √(L/2), which minimises the scan's sequential depth 2C + L/C."""
    return max(1, int(math.ceil(math.sqrt(L / 2))))


def _transition(Lambda_bar, E, F, transpose: bool):
    """x ↦ Λ_ex(t) x (or Λ_ex(t)ᵀ x) for states stored as rows x (..., P), with Λ_ex(t) = diag(Λ̄) + diag(s) E diag(δ) F.

    Λ_ex x  = Λ̄ ⊙ x + s ⊙ (E (δ ⊙ (F x)))        Λ_exᵀ x = Λ̄ ⊙ x + Fᵀ (δ ⊙ (Eᵀ (s ⊙ x)))
    (transposes, not conjugate transposes: the adjoint of a complex-linear map in JAX's reverse mode).
    s is (P,) or None (= 1); δ is (R,), cast to the state's dtype.
    """
    Ft, Et = F.T, E.T  # transposed once, outside the loops

    def apply(x, d, s):
        d = d.astype(x.dtype)
        if transpose:
            return Lambda_bar * x + (d * ((x if s is None else s * x) @ E)) @ F
        out = (d * (x @ Ft)) @ Et
        return Lambda_bar * x + (out if s is None else s * out)

    return apply


def _chunked(step, Phi_T, inputs, zero, reverse: bool, transpose: bool):
    """All states of an affine recurrence x ← step(x, input_t), chunked. inputs: leaves (C, n, ...), step t of
    chunk c at [t, c]; zero: the zero state (P,). Phi_T (n, P, P) holds each chunk's composed linear map as
    Φ_cᵀ (so that h ↦ Φ_c h is h @ Φ_cᵀ); transpose applies Φ_cᵀ instead (the adjoint). Returns (C, n, P).

    1. all chunks at once, each from a zero state → its end state e_c (per sample: C dependent steps);
    2. across chunks, h_{c+1} = Φ_c h_c + e_c → every chunk's true start state (n dependent steps);
    3. all chunks at once again, each from its true start state, keeping every state (C dependent steps).
    """
    def run(x0, keep):
        body = lambda x, inp: (step(x, inp),) * 2 if keep else (step(x, inp), None)  # noqa: E731
        return jax.lax.scan(body, x0, inputs, reverse=reverse)

    n = jax.tree_util.tree_leaves(inputs)[0].shape[1]
    zeros = jnp.broadcast_to(zero, (n, *zero.shape))
    if n == 1:
        return run(zeros, True)[1]
    ends, _ = run(zeros, False)
    apply_map = (lambda h, M: M @ h) if transpose else (lambda h, M: h @ M)

    def across(h, M_e):
        M, e = M_e
        return apply_map(h, M) + e, h

    _, starts = jax.lax.scan(across, zero, (Phi_T, ends), reverse=reverse)
    return run(starts, True)[1]


def _chunk_transitions(Lambda_bar, E, F, d, s):
    """Φ_cᵀ (n, P, P) for every chunk c, Φ_c = Λ_ex(end)···Λ_ex(start): the identity's rows carried through the
    chunk's steps. d (C, n, R), s (C, n, P) or None. Depends on parameters only: built once for the whole batch."""
    P, n = Lambda_bar.shape[0], d.shape[1]
    apply = _transition(Lambda_bar, E, F, transpose=False)

    def body(X, inp):  # X (n, P, P): row k of chunk c is Φ e_k so far
        d_t, s_t = inp
        return apply(X, d_t[:, None, :], None if s_t is None else s_t[:, None, :]), None

    X0 = jnp.broadcast_to(jnp.eye(P, dtype=Lambda_bar.dtype), (n, P, P))
    return jax.lax.scan(body, X0, (d, s))[0]


def _chunks(L: int, chunk):
    T = min(chunk or default_chunk(L), L)
    n = -(-L // T)
    return T, n, n * T - L


def _split(a, n, T, pad):
    """(L, ...) → (T, n, ...): step t of chunk c at [t, c], zero-padded at the end (steps after the end cannot
    change earlier states)."""
    if a is None:
        return None
    return jnp.swapaxes(jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(n, T, *a.shape[1:]), 0, 1)


def _join(xs, L):
    """(T, n, P) → (L, P)."""
    return jnp.swapaxes(xs, 0, 1).reshape(-1, xs.shape[-1])[:L]


def _lowrank_forward(Lambda_bar, E, F, delta, b, s, chunk):
    L, P = b.shape
    T, n, pad = _chunks(L, chunk)
    cast = lambda a: None if a is None else a.astype(b.dtype)  # noqa: E731  (once, not in every step)
    d, sc, bc = _split(cast(delta), n, T, pad), _split(cast(s), n, T, pad), _split(b, n, T, pad)
    apply = _transition(Lambda_bar, E, F, transpose=False)
    Phi_T = None if n == 1 else _chunk_transitions(Lambda_bar, E, F, d, sc)
    xs = _chunked(lambda x, inp: apply(x, inp[0], inp[1]) + inp[2], Phi_T, (d, sc, bc), jnp.zeros((P,), b.dtype),
                  reverse=False, transpose=False)
    return _join(xs, L), Phi_T


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _lowrank_states(Lambda_bar, E, F, delta, b, s, chunk):
    return _lowrank_forward(Lambda_bar, E, F, delta, b, s, chunk)[0]


def _lowrank_states_fwd(Lambda_bar, E, F, delta, b, s, chunk):
    xs, Phi_T = _lowrank_forward(Lambda_bar, E, F, delta, b, s, chunk)
    return xs, (Lambda_bar, E, F, delta, s, xs, Phi_T)


def _lowrank_states_bwd(chunk, res, g):
    """Reverse mode by the adjoint recurrence, run with the same chunked scan and the forward's chunk maps:
    κ_t = Λ_ex(t)ᵀ (κ_{t+1} + ḡ_t), κ_L = 0, so x̄_t = κ_{t+1} + ḡ_t is the cotangent of state x_t; the
    parameters' cotangents are sums over t of outer products of x̄_t with x_{t-1} (no stored P×P per step)."""
    Lambda_bar, E, F, delta, s, xs, Phi_T = res
    L, P = xs.shape
    T, n, pad = _chunks(L, chunk)
    cast = lambda a: None if a is None else a.astype(xs.dtype)  # noqa: E731
    d, sc, gc = _split(cast(delta), n, T, pad), _split(cast(s), n, T, pad), _split(g, n, T, pad)
    apply_T = _transition(Lambda_bar, E, F, transpose=True)
    kappa = _join(_chunked(lambda k, inp: apply_T(k + inp[2], inp[0], inp[1]), Phi_T, (d, sc, gc),
                           jnp.zeros((P,), xs.dtype), reverse=True, transpose=True), L)
    x_bar = g + jnp.concatenate([kappa[1:], jnp.zeros((1, P), xs.dtype)])
    x_prev = jnp.concatenate([jnp.zeros((1, P), xs.dtype), xs[:-1]])
    v = x_prev @ F.T  # (L, R)  F x_{t-1}
    w = delta.astype(xs.dtype) * v  # δ_t ⊙ F x_{t-1}
    m_bar = x_bar if s is None else cast(s) * x_bar  # cotangent of E w_t
    w_bar = m_bar @ E
    v_bar = delta.astype(xs.dtype) * w_bar
    s_bar = None if s is None else jnp.real(x_bar * (w @ E.T)).astype(s.dtype)
    return (jnp.sum(x_bar * x_prev, axis=0), m_bar.T @ w, v_bar.T @ x_prev, jnp.real(w_bar * v).astype(delta.dtype),
            x_bar, s_bar)


_lowrank_states.defvjp(_lowrank_states_fwd, _lowrank_states_bwd)


def lowrank_scan(Lambda_bar, E, F, delta, b, row_scale=None, chunk=None):
    """All states of x_t = Λ̄ ⊙ x_{t-1} + (s_t ⊙ E)(δ(t) ⊙ (F x_{t-1})) + b_t, x_{-1} = 0, by the chunked scan
    with shared chunk maps and the adjoint reverse mode described at the top of this file.

    Lambda_bar (P,), E (P,R), F (R,P), delta (L,R) real, b (L,P), row_scale s (L,P) real or None (= 1).
    chunk: steps per chunk (default ≈ √(L/2); ≥ L: one chunk, the plain recurrence).
    """
    dtype = b.dtype
    s = None if row_scale is None else jnp.asarray(row_scale, jnp.float32)
    return _lowrank_states(jnp.asarray(Lambda_bar, dtype), jnp.asarray(E, dtype), jnp.asarray(F, dtype),
                           jnp.asarray(delta, jnp.float32), b, s, chunk)


# --------------------------------------------------------------------------------------------------
# Applying the extended SSMs to a sequence (exact equations, no guard)
# --------------------------------------------------------------------------------------------------


def apply_ssm_aux(Lambda_bar, B_bar, C_tilde, E, delta, u, conj_sym: bool, bidirectional: bool = False):
    """Auxiliary-state SSM output (L, H), no D term. E (P,), delta (L,) the schedule Δ(t)."""
    return ssm.apply_ssm(aux_transitions(Lambda_bar, E, delta), B_bar, C_tilde, u, conj_sym, bidirectional)


def _apply_lowrank(Lambda_bar, B_bar, C_tilde, E, F, delta, u, conj_sym, bidirectional, row_scale, chunk):
    Bu = u.astype(B_bar.dtype) @ B_bar.T
    xs = lowrank_scan(Lambda_bar, E, F, delta, Bu, row_scale, chunk)
    if bidirectional:  # same recurrence on the reversed sequence, with its own time index
        xs_b = lowrank_scan(Lambda_bar, E, F, delta, Bu[::-1], row_scale, chunk)[::-1]
        xs = jnp.concatenate([xs, xs_b], axis=-1)
    return ssm.readout(xs, C_tilde, conj_sym)


def apply_ssm_extend(Lambda_bar, B_bar, C_tilde, E, F, delta, u, conj_sym: bool, bidirectional: bool = False,
                     mode: str = "full", chunk=None):
    """Lambda-extension SSM output (L, H), no D term. E (P,R), F (R,P), delta (L,R)."""
    if mode == "full":
        return _apply_lowrank(Lambda_bar, B_bar, C_tilde, E, F, delta, u, conj_sym, bidirectional, None, chunk)
    if mode == "diag":
        a = extend_diag_transitions(Lambda_bar, E, F, delta)
        return ssm.apply_ssm(a, B_bar, C_tilde, u, conj_sym, bidirectional)
    raise ValueError(f"unknown extend mode {mode!r}: use one of {EXTEND_MODES}")


# --------------------------------------------------------------------------------------------------
# Flax modules
# --------------------------------------------------------------------------------------------------


class S5SSMAux(ssm.S5SSM):
    """S5 with the auxiliary state, (L, H) → (L, H). Extra parameter: E (P_s, 2), complex, scale
    `auxiliary_strength`. Transitions are modulus-clamped (see the module docstring)."""

    time_scale_type: str = "sinusoidal"
    auxiliary_strength: float = 0.1

    def setup(self):
        super().setup()
        if self.time_scale_type not in TIME_SCALES:
            raise ValueError(f"unknown time_scale_type {self.time_scale_type!r}: use one of {TIME_SCALES}")
        self.E = self.param("E", ssm.complex_normal_init(self.auxiliary_strength), (self.P_s,))

    def __call__(self, u):
        Lambda_bar, B_bar, C_tilde = self.discrete_system()
        a = aux_transitions(Lambda_bar, ssm.as_complex(self.E),
                            time_scale(u.shape[0], self.time_scale_type, self.step_rescale))
        return ssm.apply_ssm(clamp_modulus(a), B_bar, C_tilde, u, self.conj_sym, self.bidirectional) + self.D * u

    def step(self, x_prev, u_t, t, seq_len, system=None):
        """(x_{t-1}, u_t) at time t of a sequence of length seq_len → (x_t, y_t); `system` as in S5SSM.step."""
        Lambda_bar, B_bar, C_tilde = self.recurrent_system(seq_len) if system is None else system
        k = self.step_rescale
        delta_prev = jnp.where(t > 0, schedule(k * (t - 1), k * seq_len, self.time_scale_type), 0.0)
        a = clamp_modulus(Lambda_bar + delta_prev * ssm.as_complex(self.E))
        x = a * x_prev + B_bar @ u_t.astype(B_bar.dtype)
        return x, ssm.readout(x[None], C_tilde, self.conj_sym)[0] + self.D * u_t


class S5SSMExtend(ssm.S5SSM):
    """S5 with the rank-R Lambda extension, (L, H) → (L, H). Extra parameters: E (P_s, R, 2),
    F (R, P_s, 2), and δ's source: `delta_table` (l_max, R) for delta_type='learned', or `delta_amp` (R,)
    times a time schedule. Transitions are guarded (see the module docstring)."""

    R: int = 10
    mode: str = "full"
    delta_type: str = "learned"
    l_max: int = 1024
    init_scale: float = 0.05
    chunk: int | None = None

    def setup(self):
        super().setup()
        if self.R < 1:
            raise ValueError(f"the extension rank R={self.R} must be at least 1")
        if self.mode not in EXTEND_MODES:
            raise ValueError(f"unknown extend mode {self.mode!r}: use one of {EXTEND_MODES}")
        if self.delta_type not in DELTA_TYPES:
            raise ValueError(f"unknown delta_type {self.delta_type!r}: use one of {DELTA_TYPES}")
        self.E = self.param("E", ssm.complex_normal_init(self.init_scale), (self.P_s, self.R))
        self.F = self.param("F", ssm.complex_normal_init(self.init_scale), (self.R, self.P_s))
        if self.delta_type == "learned":
            self.delta_table = self.param(
                "delta_table", nn.initializers.normal(stddev=self.init_scale), (self.l_max, self.R))
        else:
            self.delta_amp = self.param("delta_amp", nn.initializers.ones, (self.R,))

    def delta(self, L: int):
        """δ(t) for t = 0..L-1, (L, R); at step_rescale k, δ at physical time k·t (every k-th table entry)."""
        k = self.step_rescale
        if self.delta_type != "learned":
            return time_scale(L, self.delta_type, k)[:, None] * self.delta_amp[None, :]
        if k != int(k) or k < 1:
            raise ValueError(f"a learned delta table is read every k-th entry at step_rescale k, so k must be a "
                             f"positive integer; got {k}")
        k = int(k)
        if k * (L - 1) + 1 > self.l_max:
            raise ValueError(
                f"sequence length {L} (at step_rescale {k}: {k * (L - 1) + 1} table entries) is longer than the "
                f"learned delta table (l_max={self.l_max}): set l_max to at least that (it comes from the "
                f"dataset's sequence length), or use a schedule delta_type ({', '.join(TIME_SCALES)})")
        return self.delta_table[:k * (L - 1) + 1:k]

    def guarded(self, Lambda_bar, delta):
        """(Λ̄ or a (L,P) diagonal transition, row scale or None) after the stability guard."""
        E, F = ssm.as_complex(self.E), ssm.as_complex(self.F)
        if self.mode == "diag":
            return clamp_modulus(extend_diag_transitions(Lambda_bar, E, F, delta)), None
        Lambda_bar = clamp_modulus(Lambda_bar)
        return Lambda_bar, lowrank_row_scale(Lambda_bar, E, F, delta)

    def __call__(self, u):
        L = u.shape[0]
        Lambda_bar, B_bar, C_tilde = self.discrete_system()
        delta = self.delta(L)
        a, s = self.guarded(Lambda_bar, delta)
        if self.mode == "diag":
            y = ssm.apply_ssm(a, B_bar, C_tilde, u, self.conj_sym, self.bidirectional)
        else:
            E, F = ssm.as_complex(self.E), ssm.as_complex(self.F)
            y = _apply_lowrank(a, B_bar, C_tilde, E, F, delta, u, self.conj_sym, self.bidirectional, s,
                               self.chunk)
        return y + self.D * u

    def recurrent_system(self, seq_len):
        """((Λ̄, B̄, C̃), δ(t) for t < seq_len (seq_len, R)): what every step reuses."""
        return super().recurrent_system(seq_len), self.delta(seq_len)

    def step(self, x_prev, u_t, t, seq_len, system=None):
        """(x_{t-1}, u_t) at time t of a sequence of length seq_len → (x_t, y_t); `system` as in S5SSM.step."""
        (Lambda_bar, B_bar, C_tilde), delta = self.recurrent_system(seq_len) if system is None else system
        delta_t = jax.lax.dynamic_slice_in_dim(delta, t, 1)  # (1, R)
        a, s = self.guarded(Lambda_bar, delta_t)
        if self.mode == "diag":
            x = a[0] * x_prev
        else:
            E, F = ssm.as_complex(self.E), ssm.as_complex(self.F)
            x = a * x_prev + (s[0] * (E @ (delta_t[0].astype(E.dtype) * (F @ x_prev))))
        x = x + B_bar @ u_t.astype(B_bar.dtype)
        return x, ssm.readout(x[None], C_tilde, self.conj_sym)[0] + self.D * u_t


# --------------------------------------------------------------------------------------------------
# Warm start from a trained S5 layer
# --------------------------------------------------------------------------------------------------


def warm_start(s5_params, ext_params):
    """Parameters of an extended layer that computes exactly the S5 layer `s5_params` computes.

    Every S5 leaf is copied from `s5_params`; E is set to zero (so the auxiliary term, or the rank-R
    correction, vanishes) and the other extension leaves keep their fresh initialisation, so training
    can start from the S5 function and learn only the extension (EXTENSION_PARAMS).
    """
    out = dict(ext_params)
    for name, value in s5_params.items():
        if name not in out:
            raise ValueError(f"S5 parameter {name!r} has no place in the extended layer")
        if jnp.shape(value) != jnp.shape(out[name]):
            raise ValueError(f"S5 parameter {name!r} has shape {jnp.shape(value)} but the extended layer "
                             f"expects {jnp.shape(out[name])}: the two layers' sizes differ")
        out[name] = value
    out["E"] = jnp.zeros_like(out["E"])
    return out
