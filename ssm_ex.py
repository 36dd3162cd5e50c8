"""Time-varying S5: the auxiliary state and the Lambda extension.

Notation as in ssm.py's glossary (one sequence, t = 0..L-1, x_{-1} = 0, p_{-1} = 0, Λ̄ and B̄ from S5's
discretisation, y_t = Re(C̃ x_t) (2·Re under conj_sym) + D u_t).

Time schedules Δ(t) (`time_scale`):
    linear 1 + 0.1 t/L,  exponential exp(-0.01 t),  sinusoidal 1 + 0.1 sin(0.1 t),  constant 1.

Auxiliary state (E ∈ C^P):
    x_t = Λ̄ ⊙ x_{t-1} + B̄ u_t + E ⊙ p_{t-1},   p_t = Δ(t) x_t
  ⇔ x_t = (Λ̄ + E Δ(t-1)) ⊙ x_{t-1} + B̄ u_t          (Δ(-1) := 0, since p_{-1} = 0)
  a diagonal time-varying recurrence: computed exactly by the parallel scan `ssm.linear_scan`.

Lambda extension (E ∈ C^{P×R}, F ∈ C^{R×P}, δ(t) ∈ R^R):   Λ_ex(t) = diag(Λ̄) + E diag(δ(t)) F
  δ(t): a learned table (l_max × R), a basis δ_r(t) = Σ_k w_rk φ_k(t/L) (K × R, any length; `delta_basis`),
        or a fixed schedule times a learned amplitude per r.
  full: x_t = Λ̄ ⊙ x_{t-1} + E (δ(t) ⊙ (F x_{t-1})) + B̄ u_t     (dense transition, rank-R correction)
  diag: x_t = (Λ̄ + diag(E diag(δ(t)) F)) ⊙ x_{t-1} + B̄ u_t       (diagonal only: parallel scan)

Full mode: a time-varying linear system shared by the batch. Λ̄, E, F, δ(t) and the guard's scales do not
depend on the sample; only b_t = B̄u_t does. So every P×P operator is built once per step of training, for the
whole batch, and the per-sample work is P-vectors only. `lowrank_scan` splits the sequence into n = ⌈L/W⌉
chunks of W steps (W ≈ √(L/2) by default) and makes three passes:
  0. shared:  each chunk's transition Φ_c = Λ_ex(end)···Λ_ex(start) (P×P), the identity carried through the
     chunk's W steps, all chunks at once: O(L P² R) work, once for the batch, W dependent steps;
  1. per sample, all chunks at once, each from a zero state: its end state e_c (W dependent steps);
  2. per sample, across chunks: h_{c+1} = Φ_c h_c + e_c, the true start state of every chunk (n steps);
  3. per sample, all chunks at once again from their true start states, keeping every state (W steps).
Every state equals the step-by-step recurrence (no truncation). Per sample: two runs of the recurrence,
O(L P R) each, plus O(L P²/W) across chunks; the batch is a matmul dimension in every step.
Sequential depth (dependent steps on the longest path): 2W + n ≈ 2√(2L) per direction and pass (L = 1024:
2·23 + 45 = 91 instead of 1024; L = 16,384: 2·91 + 181 = 363).

Reverse mode (`jax.custom_vjp`): nothing of the passes is stored but the states x_t and the n chunk maps. With
x̄_t the cotangent of state x_t and ḡ_t the cotangent arriving from the output, the adjoint recurrence runs
backwards with the transposed transitions, which are again diagonal plus rank R. Written for the guarded
transition A_t = diag(a_t) + diag(s_t) E diag(δ_t) F (a_t = Λ̄, or c_t Λ̄ under the spectral guard; s_t = 1 unguarded):
    κ_t = A_tᵀ (κ_{t+1} + ḡ_t),  κ_L = 0,   x̄_t = κ_{t+1} + ḡ_t,   A_tᵀ = diag(a_t) + Fᵀ diag(δ_t) Eᵀ diag(s_t),
by the same chunked scan, reusing the forward's Φ_cᵀ as its chunk maps; then, with v_t = F x_{t-1},
w_t = δ_t ⊙ v_t and m̄_t = s_t ⊙ x̄_t:
    ā_t = x̄_t ⊙ x_{t-1},  Ē = Σ_t m̄_t w_tᵀ,  F̄ = Σ_t (δ_t ⊙ Eᵀm̄_t) x_{t-1}ᵀ,  δ̄_t = Re(Eᵀm̄_t ⊙ v_t),
    s̄_t = Re(x̄_t ⊙ E w_t),  b̄_t = x̄_t
(transposes, not conjugates: JAX's reverse mode of complex-linear maps). Memory: O(L (P + R)) per sample
(the states), O(n P²) shared, the same order as S5's scan, instead of O(L P²) per sample.

Another sampling rate (`step_rescale` k, e.g. a model trained at 16 kHz evaluated at 8 kHz on x[::k]): S5's
steps are multiplied by k, which is exact for its continuous-time system. The extensions' terms are discrete
(a schedule over steps, a learned table per step) and have no exact continuous-time meaning; they are read as
functions of physical time, the natural choice: step t at rate k is physical time k·t, so a schedule is read at
k·t (of a sequence of physical length k·L) and the learned δ table every k-th entry (a δ basis reads relative
time t/L, which is the same at every rate). With E = 0 both reduce
exactly to S5 at rate k.

Bidirectional: the backward direction is the same recurrence run on the reversed sequence with its own
time index (t counts from the sequence end), its states reversed back and concatenated as in S5.

Stability guard (modules only, `guard`; the pure `apply_*` functions implement the equations exactly). If every
transition of a sequence of L steps has 2-norm at most r, then ‖x_t‖₂ ≤ r ‖x_{t-1}‖₂ + ‖B̄ u_t‖₂, so the state is at
most r^L · Σ_s ‖B̄ u_s‖₂: bounded at every length for r = 1, and for r = G^{1/L} at most G times that sum over the
whole sequence. Three guards:
  * "spectral" (the default): the whole transition is scaled, A_t ← c_t A_t with c_t = min(1, r/σ_t), σ_t its
    largest singular value and r = guard_growth^{1/L} (`step_bound`; guard_growth G = GUARD_GROWTH = 1e4 by
    default: a step may expand a little, a sequence by at most 10⁴, which copying's validation accuracy chose over
    G = 1 and 100, see RESULTS.md). σ_t is estimated by power iteration on A_tᴴA_t (POWER_ITERATIONS steps of
    O(P R) each, all t at once, shared by the batch; `spectral_norms`). A correction that rotates the state
    changes ‖A_t‖₂ only to second order, so it is charged only to second order: a slow state (|λ̄| near 1) may
    still vary in time. The estimate approaches σ_t from below, so after scaling ‖A_t‖₂ can exceed 1 by the iteration's
    error; the tests bound the state over 16,384 steps with the extension's parameters at 10× and 1000× their
    initial scale, but this is measured, not proved. The estimate is least accurate where the top singular
    values cluster (a small correction on many states that decay alike: up to about 3 % low, test_ssm.py).
  * "rows" (the guard of every run before the choice existed): the rows of the correction are scaled,
    E_t ← diag(s_t) E, s_{t,p} = min(1, (1 − |λ̄_p|) / Σ_r |E_pr| |δ_r(t)| Σ_q |F_rq|), so ‖Λ_ex(t)‖_∞ ≤ 1.
    Proved non-expanding in the ∞-norm, but a slow state has room 1 − |λ̄_p| ≈ 0.001–0.03 at S5's
    initialisation: the correction is pinned near zero, and full mode near S5.
  * "none": the equations as they are; a state may explode (a non-finite loss stops the run).
Diagonal transitions are clamped in modulus under "spectral" and "rows", a ← a · min(1, r/|a|): for a diagonal
matrix that is the smallest change to 2-norm ≤ r; a clamped entry keeps its phase and its gradient along the
phase. The auxiliary state and diag mode clamp at r = 1 under both (a clamp at G^{1/L} was measured and cost diag
mode 9 points of validation accuracy on copying); full mode clamps Λ̄ at the step bound r of its guard. Where a
model sits inside the bound (e.g. E = 0 and |Λ̄| < 1) every guard is the identity, so a warm-started extension
computes exactly the S5 function it started from. `guard_scales(L)` of a module gives the factor each guard
applied to each (t, state) row: the evidence of whether a run's extension was allowed to act.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import ssm
import utils

TIME_SCALES = ("linear", "exponential", "sinusoidal", "constant")
DELTA_BASES = ("legendre", "fourier")  # δ(t) = Σ_k w_k φ_k(t/L): K × R parameters, any length
DELTA_TYPES = ("learned",) + DELTA_BASES + TIME_SCALES
EXTEND_MODES = ("full", "diag")
EXTENSION_PARAMS = ("E", "F", "delta_table", "delta_amp", "delta_weights")  # leaves warm start trains on top of S5
GUARDS = ("spectral", "rows", "none")  # the stability guard (see the top of this file)
LEGACY_GUARD = "rows"  # the guard of every run written before there was a choice
POWER_ITERATIONS = 24  # the spectral guard's power iterations per step
GUARD_GROWTH = 1e4  # the spectral guard's default bound on a sequence's growth (chosen on copying's validation set)


# --------------------------------------------------------------------------------------------------
# Time schedules
# --------------------------------------------------------------------------------------------------


def schedule(t, L, kind: str):
    """Δ(t) for time index t (array or scalar) in a sequence of length L."""
    t = jnp.asarray(t, jnp.float32)
    if kind == "linear":
        return 1.0 + 0.1 * t / L
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


def delta_basis(L: int, kind: str, K: int) -> np.ndarray:
    """φ_k(τ_t), k = 0..K-1, at τ_t = t/L for t = 0..L-1: (L, K) float32, each basis function of mean square 1
    over [0, 1). Time is the position relative to the sequence's own length, so a sequence of 2L reads the same
    δ(τ), twice as slowly, and a sequence at step_rescale k (k·t of k·L) the same δ as at rate 1.

      legendre: √(2k+1) P_k(2τ − 1)     (Legendre polynomials on [-1, 1))
      fourier:  1, √2 cos(2πτ), √2 sin(2πτ), √2 cos(4πτ), √2 sin(4πτ), ...
    """
    if K < 1:
        raise ValueError(f"the δ basis needs at least one function, got K={K}")
    tau = np.arange(L, dtype=np.float64) / L
    if kind == "legendre":
        x, phi = 2.0 * tau - 1.0, [np.ones(L), 2.0 * tau - 1.0]
        for n in range(1, K - 1):  # (n+1) P_{n+1} = (2n+1) x P_n − n P_{n−1}
            phi.append(((2 * n + 1) * x * phi[n] - n * phi[n - 1]) / (n + 1))
        phi = [np.sqrt(2 * k + 1) * p for k, p in enumerate(phi[:K])]
    elif kind == "fourier":
        phi = [np.ones(L)]
        for j in range(1, K // 2 + 1):
            phi += [np.sqrt(2) * np.cos(2 * np.pi * j * tau), np.sqrt(2) * np.sin(2 * np.pi * j * tau)]
        phi = phi[:K]
    else:
        raise ValueError(f"unknown δ basis {kind!r}: use one of {DELTA_BASES}")
    return np.stack(phi, axis=1).astype(np.float32)


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


def lowrank_row_scale(Lambda_bar, E, F, delta, r_max: float = 1.0):
    """s (L, P) such that ‖diag(Λ̄) + diag(s_t) E diag(δ(t)) F‖_∞ ≤ r_max for every t (needs |Λ̄| ≤ r_max).

    Uses the bound Σ_q |(E diag(δ) F)_pq| ≤ Σ_r |E_pr| |δ_r| Σ_q |F_rq|, O(L P R) instead of O(L P² R).
    """
    row_bound = jnp.abs(delta) @ (jnp.abs(E) * jnp.sum(jnp.abs(F), axis=1)[None, :]).T  # (L, P)
    room = jnp.maximum(r_max - jnp.abs(Lambda_bar), 0.0)[None, :]
    return _shrink(row_bound, room)


def _start_vector(P: int):
    """The power iteration's start: a fixed unit vector with every component nonzero (no direction excluded)."""
    z = np.random.default_rng(0).normal(size=(P, 2))
    v = (1.0 + np.abs(z[:, 0])) * np.exp(1j * np.pi * z[:, 1])
    return jnp.asarray(v / np.linalg.norm(v), jnp.complex64)


def spectral_norms(a, E, F, delta, iterations: int = POWER_ITERATIONS):
    """σ_t ≈ ‖A_t‖₂, the largest singular value of A_t = diag(a) + E diag(δ(t)) F, for every t: (L,) real.

    a (P,) or (L, P), E (P,R), F (R,P), delta (L,R). `iterations` steps of the power iteration v ← A_tᴴA_t v
    (each O(P R): A v = a ⊙ v + E(δ ⊙ F v)), all t at once, from a fixed start; then σ_t = ‖A_t v_t‖. The
    vector carries no gradient (at convergence ∂σ = Re(uᴴ ∂A v), which ‖A_t v_t‖ with v_t held gives). The
    estimate never exceeds ‖A_t‖₂ and approaches it as the iterations converge: slowly where the top singular
    values cluster (measured with POWER_ITERATIONS = 24: within 3 % for a small correction of many states with
    |λ̄| in [0.9, 0.9995], 0.3 % for a moderate one, 1e-5 where the correction dominates).
    """
    L, P = delta.shape[0], E.shape[0]
    d = delta.astype(E.dtype)

    def A(v, a, E, F, d):
        return a * v + (d * (v @ F.T)) @ E.T

    def AH(w, a, E, F, d):
        return jnp.conj(a) * w + (d * (w @ jnp.conj(E))) @ jnp.conj(F)

    held = jax.lax.stop_gradient((a, E, F, d))

    def body(_, v):
        v = AH(A(v, *held), *held)
        return v / jnp.sqrt(jnp.maximum(jnp.sum(jnp.abs(v) ** 2, axis=-1, keepdims=True), 1e-30))

    v = jax.lax.fori_loop(0, iterations, body, jnp.broadcast_to(_start_vector(P), (L, P)))
    return jnp.sqrt(jnp.maximum(jnp.sum(jnp.abs(A(v, a, E, F, d)) ** 2, axis=-1), 1e-30))


def spectral_scale(a, E, F, delta, r_max: float = 1.0, iterations: int = POWER_ITERATIONS):
    """c_t = min(1, r_max/σ_t) (L,): the factor that brings the whole transition A_t to 2-norm ≤ r_max
    (spectral_norms)."""
    return _shrink(spectral_norms(a, E, F, delta, iterations), r_max)


# --------------------------------------------------------------------------------------------------
# The low-rank time-varying recurrence (full mode)
# --------------------------------------------------------------------------------------------------


def default_chunk(L: int) -> int:
    """W ≈ √(L/2), which minimises the scan's sequential depth 2W + L/W."""
    return max(1, int(math.ceil(math.sqrt(L / 2))))


def _transition(E, F, transpose: bool):
    """x ↦ A_t x (or A_tᵀ x) for states stored as rows x (..., P), with A_t = diag(a_t) + diag(s_t) E diag(δ_t) F.

    A_t x  = a_t ⊙ x + s_t ⊙ (E (δ_t ⊙ (F x)))        A_tᵀ x = a_t ⊙ x + Fᵀ (δ_t ⊙ (Eᵀ (s_t ⊙ x)))
    (transposes, not conjugate transposes: the adjoint of a complex-linear map in JAX's reverse mode).
    a_t is (P,); s_t is (P,) or None (= 1); δ_t is (R,), cast to the state's dtype.
    """
    Ft, Et = F.T, E.T  # transposed once, outside the loops

    def apply(x, a, d, s):
        d = d.astype(x.dtype)
        if transpose:
            return a * x + (d * ((x if s is None else s * x) @ E)) @ F
        out = (d * (x @ Ft)) @ Et
        return a * x + (out if s is None else s * out)

    return apply


def _chunked(step, Phi_T, inputs, zero, reverse: bool, transpose: bool):
    """All states of an affine recurrence x ← step(x, input_t), chunked. inputs: leaves (W, n, ...), step t of
    chunk c at [t, c]; zero: the zero state (P,). Phi_T (n, P, P) holds each chunk's composed linear map as
    Φ_cᵀ (so that h ↦ Φ_c h is h @ Φ_cᵀ); transpose applies Φ_cᵀ instead (the adjoint). Returns (W, n, P).

    1. all chunks at once, each from a zero state → its end state e_c (per sample: W dependent steps);
    2. across chunks, h_{c+1} = Φ_c h_c + e_c → every chunk's true start state (n dependent steps);
    3. all chunks at once again, each from its true start state, keeping every state (W dependent steps).
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


def _chunk_transitions(a, E, F, d, s):
    """Φ_cᵀ (n, P, P) for every chunk c, Φ_c = A(end)···A(start): the identity's rows carried through the chunk's
    steps. a (W, n, P), d (W, n, R), s (W, n, P) or None. Depends on parameters only: built once for the batch."""
    P, n = a.shape[-1], a.shape[1]
    apply = _transition(E, F, transpose=False)

    def body(X, inp):  # X (n, P, P): row k of chunk c is Φ e_k so far
        a_t, d_t, s_t = inp
        return apply(X, a_t[:, None, :], d_t[:, None, :], None if s_t is None else s_t[:, None, :]), None

    X0 = jnp.broadcast_to(jnp.eye(P, dtype=a.dtype), (n, P, P))
    return jax.lax.scan(body, X0, (a, d, s))[0]


def _chunks(L: int, chunk):
    W = min(chunk or default_chunk(L), L)
    n = -(-L // W)
    return W, n, n * W - L


def _split(a, n, W, pad):
    """(L, ...) → (W, n, ...): step t of chunk c at [t, c], zero-padded at the end (steps after the end cannot
    change earlier states)."""
    if a is None:
        return None
    return jnp.swapaxes(jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(n, W, *a.shape[1:]), 0, 1)


def _join(xs, L):
    """(W, n, P) → (L, P)."""
    return jnp.swapaxes(xs, 0, 1).reshape(-1, xs.shape[-1])[:L]


def _lowrank_forward(a, E, F, delta, b, s, chunk):
    L, P = b.shape
    W, n, pad = _chunks(L, chunk)
    cast = lambda v: None if v is None else v.astype(b.dtype)  # noqa: E731  (once, not in every step)
    ac, d, sc, bc = (_split(v, n, W, pad) for v in (a, cast(delta), cast(s), b))
    apply = _transition(E, F, transpose=False)
    Phi_T = None if n == 1 else _chunk_transitions(ac, E, F, d, sc)
    xs = _chunked(lambda x, inp: apply(x, inp[0], inp[1], inp[2]) + inp[3], Phi_T, (ac, d, sc, bc),
                  jnp.zeros((P,), b.dtype), reverse=False, transpose=False)
    return _join(xs, L), Phi_T


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _lowrank_states(a, E, F, delta, b, s, chunk):
    return _lowrank_forward(a, E, F, delta, b, s, chunk)[0]


def _lowrank_states_fwd(a, E, F, delta, b, s, chunk):
    xs, Phi_T = _lowrank_forward(a, E, F, delta, b, s, chunk)
    return xs, (a, E, F, delta, s, xs, Phi_T)


def _lowrank_states_bwd(chunk, res, g):
    """Reverse mode by the adjoint recurrence, run with the same chunked scan and the forward's chunk maps:
    κ_t = A_tᵀ (κ_{t+1} + ḡ_t), κ_L = 0, so x̄_t = κ_{t+1} + ḡ_t is the cotangent of state x_t; the
    parameters' cotangents are sums over t of outer products of x̄_t with x_{t-1} (no stored P×P per step)."""
    a, E, F, delta, s, xs, Phi_T = res
    L, P = xs.shape
    W, n, pad = _chunks(L, chunk)
    cast = lambda v: None if v is None else v.astype(xs.dtype)  # noqa: E731
    ac, d, sc, gc = (_split(v, n, W, pad) for v in (a, cast(delta), cast(s), g))
    apply_T = _transition(E, F, transpose=True)
    kappa = _join(_chunked(lambda k, inp: apply_T(k + inp[3], inp[0], inp[1], inp[2]), Phi_T, (ac, d, sc, gc),
                           jnp.zeros((P,), xs.dtype), reverse=True, transpose=True), L)
    x_bar = g + jnp.concatenate([kappa[1:], jnp.zeros((1, P), xs.dtype)])
    x_prev = jnp.concatenate([jnp.zeros((1, P), xs.dtype), xs[:-1]])
    v = x_prev @ F.T  # (L, R)  F x_{t-1}
    w = delta.astype(xs.dtype) * v  # δ_t ⊙ F x_{t-1}
    m_bar = x_bar if s is None else cast(s) * x_bar  # cotangent of E w_t
    w_bar = m_bar @ E
    v_bar = delta.astype(xs.dtype) * w_bar
    s_bar = None if s is None else jnp.real(x_bar * (w @ E.T)).astype(s.dtype)
    return (x_bar * x_prev, m_bar.T @ w, v_bar.T @ x_prev, jnp.real(w_bar * v).astype(delta.dtype), x_bar, s_bar)


_lowrank_states.defvjp(_lowrank_states_fwd, _lowrank_states_bwd)


def lowrank_scan(a, E, F, delta, b, row_scale=None, chunk=None):
    """All states of x_t = a_t ⊙ x_{t-1} + (s_t ⊙ E)(δ(t) ⊙ (F x_{t-1})) + b_t, x_{-1} = 0, by the chunked scan
    with shared chunk maps and the adjoint reverse mode described at the top of this file.

    a: the diagonal, Λ̄ (P,) or a time-varying (L, P) (the spectral guard's c_t Λ̄); E (P,R), F (R,P),
    delta (L,R) real, b (L,P), row_scale s (L,P) real or None (= 1).
    chunk: steps per chunk (default ≈ √(L/2); ≥ L: one chunk, the plain recurrence).
    """
    dtype = b.dtype
    s = None if row_scale is None else jnp.asarray(row_scale, jnp.float32)
    a = jnp.broadcast_to(jnp.asarray(a, dtype), b.shape)
    return _lowrank_states(a, jnp.asarray(E, dtype), jnp.asarray(F, dtype), jnp.asarray(delta, jnp.float32), b, s,
                           chunk)


def lowrank_recurrence(a, E, F, delta, b, row_scale=None):
    """The plain loop `lowrank_scan` must equal: x_t = a_t ⊙ x_{t-1} + s_t ⊙ (E (δ_t ⊙ (F x_{t-1}))) + b_t, one step
    at a time, with the same arguments (no chunks, no custom reverse mode)."""
    L, P = b.shape
    a = jnp.broadcast_to(jnp.asarray(a, b.dtype), (L, P))
    s = jnp.ones((L, P), jnp.float32) if row_scale is None else jnp.asarray(row_scale, jnp.float32)

    def step(x, inp):
        a_t, d_t, s_t, b_t = inp
        x = a_t * x + s_t * (E @ (d_t.astype(b.dtype) * (F @ x))) + b_t
        return x, x

    return jax.lax.scan(step, jnp.zeros((P,), b.dtype), (a, jnp.asarray(delta, jnp.float32), s, b))[1]


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


def _check_guard(guard, growth: float = 1.0):
    if guard not in GUARDS:
        raise ValueError(f"unknown stability guard {guard!r}: use one of {GUARDS}")
    if not growth >= 1.0:
        raise ValueError(f"the guard's growth bound must be at least 1 (1: no step may expand), got {growth}")


def step_bound(guard: str, growth: float, seq_len: int) -> float:
    """r, the largest 2-norm a guarded full-mode transition may have at one step of a sequence of seq_len steps:
    growth^(1/L) under the spectral guard (so that r^L = growth bounds the state's growth over the whole sequence),
    1 under rows (the earlier guard)."""
    return float(growth) ** (1.0 / seq_len) if guard == "spectral" else 1.0


def guard_diagonal(a, guard: str, r_max: float = 1.0):
    """(guarded diagonal transitions, the factor applied to each) for a diagonal transition a ((P,) or (L, P)):
    the modulus clamp a · min(1, r_max/|a|) under every guard but "none" (for a diagonal matrix the 2-norm and the
    ∞-norm are both max |a|, so the clamp is the least change that bounds it by r_max)."""
    _check_guard(guard)
    if guard == "none":
        return a, jnp.ones(a.shape, jnp.float32)
    k = _shrink(jnp.abs(a), r_max)
    return a * k, k


def guard_full(Lambda_bar, E, F, delta, guard: str, r_max: float = 1.0):
    """Full mode's guarded transition A_t = diag(a_t) + diag(s_t) E diag(δ(t)) F as (a, s, scale):
    a (P,) or (L, P), s (L, P) or None, and scale (L, P), the smallest factor the guard applied to an entry of
    row p of A_t (1 where that row is unchanged). See the top of this file for the three guards; r_max: the
    spectral guard's bound on each step's 2-norm (step_bound)."""
    a, k = guard_diagonal(Lambda_bar, guard, r_max)
    L = delta.shape[0]
    if guard == "none":
        return a, None, jnp.ones((L, a.shape[0]), jnp.float32)
    if guard == "rows":
        s = lowrank_row_scale(a, E, F, delta)
        return a, s, jnp.minimum(s, k[None, :])
    c = spectral_scale(a, E, F, delta, r_max)[:, None]  # (L, 1): the whole transition
    return c * a[None, :], jnp.broadcast_to(c, (L, a.shape[0])), c * k[None, :]


class S5SSMAux(ssm.S5SSM):
    """S5 with the auxiliary state, (L, H) → (L, H). Extra parameter: E (P_s, 2), complex, scale
    `auxiliary_strength`. Transitions are modulus-clamped unless guard="none" (see the module docstring)."""

    time_scale_type: str = "sinusoidal"
    auxiliary_strength: float = 0.1
    guard: str = "spectral"

    def setup(self):
        super().setup()
        if self.time_scale_type not in TIME_SCALES:
            raise ValueError(f"unknown time_scale_type {self.time_scale_type!r}: use one of {TIME_SCALES}")
        _check_guard(self.guard)
        self.E = self.param("E", ssm.complex_normal_init(self.auxiliary_strength), (self.P_s,))

    def transitions(self, L: int):
        """(a_t (L, P) after the guard, the guard's factor per (t, state) (L, P))."""
        Lambda_bar = self.discrete_system()[0]
        a = aux_transitions(Lambda_bar, ssm.as_complex(self.E), time_scale(L, self.time_scale_type, self.step_rescale))
        return guard_diagonal(a, self.guard)

    def guard_scales(self, L: int):
        return self.transitions(L)[1]

    def __call__(self, u):
        _, B_bar, C_tilde = self.discrete_system()
        a = self.transitions(u.shape[0])[0]
        return ssm.apply_ssm(a, B_bar, C_tilde, u, self.conj_sym, self.bidirectional) + self.D * u

    def step(self, x_prev, u_t, t, seq_len, system=None):
        """(x_{t-1}, u_t) at time t of a sequence of length seq_len → (x_t, y_t); `system` as in S5SSM.step."""
        Lambda_bar, B_bar, C_tilde = self.recurrent_system(seq_len) if system is None else system
        k = self.step_rescale
        delta_prev = jnp.where(t > 0, schedule(k * (t - 1), k * seq_len, self.time_scale_type), 0.0)
        a = guard_diagonal(Lambda_bar + delta_prev * ssm.as_complex(self.E), self.guard)[0]
        x = a * x_prev + B_bar @ u_t.astype(B_bar.dtype)
        return x, ssm.readout(x[None], C_tilde, self.conj_sym)[0] + self.D * u_t


class S5SSMExtend(ssm.S5SSM):
    """S5 with the rank-R Lambda extension, (L, H) → (L, H). Extra parameters: E (P_s, R, 2),
    F (R, P_s, 2), and δ's source: `delta_table` (l_max, R) for delta_type='learned', `delta_weights` (K, R) over
    a basis (legendre, fourier; K = basis_size), or `delta_amp` (R,) times a time schedule. Transitions are
    guarded by `guard` (see the module docstring)."""

    R: int = 10
    mode: str = "full"
    delta_type: str = "learned"
    l_max: int = 1024
    init_scale: float = 0.05
    chunk: int | None = None
    guard: str = "spectral"
    guard_growth: float = GUARD_GROWTH
    basis_size: int = 12

    def setup(self):
        super().setup()
        if self.R < 1:
            raise ValueError(f"the extension rank R={self.R} must be at least 1")
        if self.mode not in EXTEND_MODES:
            raise ValueError(f"unknown extend mode {self.mode!r}: use one of {EXTEND_MODES}")
        if self.delta_type not in DELTA_TYPES:
            raise ValueError(f"unknown delta_type {self.delta_type!r}: use one of {DELTA_TYPES}")
        _check_guard(self.guard, self.guard_growth)
        self.E = self.param("E", ssm.complex_normal_init(self.init_scale), (self.P_s, self.R))
        self.F = self.param("F", ssm.complex_normal_init(self.init_scale), (self.R, self.P_s))
        if self.delta_type == "learned":
            self.delta_table = self.param(
                "delta_table", nn.initializers.normal(stddev=self.init_scale), (self.l_max, self.R))
        elif self.delta_type in DELTA_BASES:
            if self.basis_size < 1:
                raise ValueError(f"the δ basis size K={self.basis_size} must be at least 1")
            # δ(t) of mean square init_scale², as the table's (the basis functions have mean square 1)
            self.delta_weights = self.param("delta_weights", nn.initializers.normal(
                stddev=self.init_scale / math.sqrt(self.basis_size)), (self.basis_size, self.R))
        else:
            self.delta_amp = self.param("delta_amp", nn.initializers.ones, (self.R,))

    def delta(self, L: int):
        """δ(t) for t = 0..L-1, (L, R); at step_rescale k, δ at physical time k·t (every k-th table entry; a basis
        reads relative time t/L, the same at every rate)."""
        k = self.step_rescale
        if self.delta_type in DELTA_BASES:
            return jnp.asarray(delta_basis(L, self.delta_type, self.basis_size)) @ self.delta_weights
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
                f"dataset's sequence length), or a delta_type that works at any length "
                f"({', '.join(DELTA_BASES + TIME_SCALES)})")
        return self.delta_table[:k * (L - 1) + 1:k]

    def guarded(self, Lambda_bar, delta, seq_len: int):
        """(a, s, scale) after the stability guard, for δ at some steps of a sequence of seq_len steps: diag mode
        a (L, P) diagonal transitions, s None; full mode as guard_full. scale (L, P): the guard's factor per
        (t, state) row."""
        E, F = ssm.as_complex(self.E), ssm.as_complex(self.F)
        if self.mode == "diag":  # clamped at 1 (a looser clamp cost diag mode 9 points on copying: RESULTS.md)
            a, scale = guard_diagonal(extend_diag_transitions(Lambda_bar, E, F, delta), self.guard)
            return a, None, scale
        return guard_full(Lambda_bar, E, F, delta, self.guard, step_bound(self.guard, self.guard_growth, seq_len))

    def guard_scales(self, L: int):
        return self.guarded(self.discrete_system()[0], self.delta(L), L)[2]

    def __call__(self, u):
        L = u.shape[0]
        Lambda_bar, B_bar, C_tilde = self.discrete_system()
        delta = self.delta(L)
        a, s, _ = self.guarded(Lambda_bar, delta, L)
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
        a, s, _ = self.guarded(Lambda_bar, delta_t, seq_len)
        a = a.reshape(-1)  # (P,): Λ̄ (rows, none), c_t Λ̄ (spectral) or the diagonal transition (diag mode)
        if self.mode == "diag":
            x = a * x_prev
        else:
            E, F = ssm.as_complex(self.E), ssm.as_complex(self.F)
            corr = E @ (delta_t[0].astype(E.dtype) * (F @ x_prev))
            x = a * x_prev + (corr if s is None else s[0] * corr)
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


# --------------------------------------------------------------------------------------------------
# The declarations of aux and extend (ssm.register): options, parameter roles, pictures, bench variants
# --------------------------------------------------------------------------------------------------

EXACT_MAX_P = 128  # Λ_ex(t) spectra from dense matrices up to this many states; an upper bound beyond


def aux_modulus(module, p, L):
    """|Λ̄ + E Δ(t−1)| (L, P) after the clamp, the fraction of (t, state) the clamp acted on, and the clamp's bound."""

    a, scale = module.apply({"params": p}, L, method="transitions")
    return np.abs(np.asarray(a)), float(np.mean(np.asarray(scale) < 1.0)), (1.0 if module.guard != "none" else None)


def extend_spectra(module, p, L, n_t=64):
    """δ(t) (L, R); for a sample of t: spectral radius, 2-norm and ∞-norm of Λ_ex(t) as the model runs it
    (guarded), exact from the P×P matrices for P ≤ EXACT_MAX_P (or diag mode, which is diagonal), else the
    2-norm from the spectral guard's power iteration and upper bounds for the others; the guard's factor per
    (t, state) row (L, P)."""

    m = module.bind({"params": p})
    Lambda_bar, _, _ = m.discrete_system()
    delta = m.delta(L)
    a, s, guard_scale = m.guarded(Lambda_bar, delta, L)
    E, F = np.asarray(ssm.as_complex(p["E"]), np.complex128), np.asarray(ssm.as_complex(p["F"]), np.complex128)
    ts = np.unique(np.linspace(0, L - 1, min(n_t, L)).astype(int))
    d = np.asarray(delta, np.float64)
    guard_scale = np.asarray(guard_scale, np.float64)
    if module.mode == "diag":  # the transition is diagonal: all three are max |a_t|
        mod = np.abs(np.asarray(a))[ts].max(1)
        return dict(t=ts, delta=d, radius=mod, norm_2=mod, norm_inf=mod, how="exact (diagonal)",
                    guard_scale=guard_scale)
    lam = np.broadcast_to(np.asarray(a, np.complex128), (L, E.shape[0]))  # a_t: Λ̄, or c_t Λ̄ (spectral guard)
    scale = np.ones((L, E.shape[0])) if s is None else np.asarray(s, np.float64)
    if E.shape[0] <= EXACT_MAX_P:
        A = np.stack([np.diag(lam[t]) + (scale[t][:, None] * E) @ np.diag(d[t]) @ F for t in ts])
        radius = np.abs(np.linalg.eigvals(A)).max(1)
        norm_2 = np.linalg.svd(A, compute_uv=False)[:, 0]
        norm = np.abs(A).sum(2).max(1)
        how = "exact (dense P×P matrices)"
    else:  # ‖·‖∞ ≤ |a_p| + s_p Σ_r |E_pr||δ_r| Σ_q |F_rq| per row; the spectral radius is at most the 2-norm
        bound = np.abs(lam[ts]) + scale[ts] * (np.abs(d[ts]) @ (np.abs(E) * np.abs(F).sum(1)[None, :]).T)
        norm = bound.max(1)
        corr = E[None] * scale[ts][:, :, None]  # the row-scaled E at each sampled t
        norm_2 = radius = np.array([float(spectral_norms(lam[t], corr[i], F, d[t][None])[0])
                                    for i, t in enumerate(ts)])
        how = "2-norm by power iteration (a lower bound), ∞-norm an upper bound"
    return dict(t=ts, delta=d, radius=np.asarray(radius), norm_2=np.asarray(norm_2), norm_inf=np.asarray(norm),
                how=how, guard_scale=guard_scale)


def plot_aux(path, aux):
    plt = utils.pyplot()
    fig, axes = plt.subplots(len(aux), 1, figsize=(9, 3 * len(aux)), squeeze=False)
    for ax, (name, info) in zip(axes[:, 0], aux.items()):
        q = np.asarray(info["quantiles"])  # (5, L)
        t = np.arange(q.shape[1])
        ax.fill_between(t, q[0], q[4], color="tab:blue", alpha=0.15, label="min–max over states")
        ax.fill_between(t, q[1], q[3], color="tab:blue", alpha=0.35, label="25–75%")
        ax.plot(t, q[2], color="tab:blue", label="median")
        if info["bound"] is not None:
            ax.axhline(info["bound"], color="tab:red", ls="--", label=f"clamp |a| ≤ {info['bound']:.4g}")
        ax.set_xlabel("t (steps)")
        ax.set_ylabel("|Λ̄ + E Δ(t−1)|")
        ax.set_title(f"{name}: auxiliary state, effective transition modulus "
                     f"(clamped at {100 * info['clamped_fraction']:.2f}% of (t, state))")
        ax.legend(fontsize=8)
    utils.save_figure(plt, fig, path)


def plot_extend(path, ext):
    plt = utils.pyplot()
    fig, axes = plt.subplots(len(ext), 2, figsize=(12, 3.2 * len(ext)), squeeze=False)
    for (ax_d, ax_r), (name, info) in zip(axes, ext.items()):
        d = np.asarray(info["delta"])
        for r in range(d.shape[1]):
            ax_d.plot(d[:, r], lw=0.8, label=f"rank {r}" if d.shape[1] <= 10 else None)
        ax_d.set_xlabel("t (steps)")
        ax_d.set_ylabel("δ_r(t)")
        ax_d.set_title(f"{name}: δ(t) per rank")
        if d.shape[1] <= 10:
            ax_d.legend(fontsize=7, ncol=2)
        ax_r.plot(info["t"], info["radius"], "o-", ms=3, label="spectral radius")
        ax_r.plot(info["t"], info["norm_2"], "d-", ms=3, label="2-norm")
        ax_r.plot(info["t"], info["norm_inf"], "s-", ms=3, label="∞-norm")
        ax_r.plot(info["t"], info["guard_scale_min"], "^-", ms=3,
                  label=f"guard: min row scale (scaled {100 * info['guard_scaled']:.0f}% of (t, state))")
        ax_r.axhline(1.0, color="tab:red", ls="--", lw=0.8)
        ax_r.set_xlabel("t (steps)")
        ax_r.set_ylabel("value")
        ax_r.set_title(f"{name}: Λ_ex(t), {info['how']}")
        ax_r.legend(fontsize=8)
    utils.save_figure(plt, fig, path)


def _aux_numbers(module, p, L):
    mod, frac, bound = aux_modulus(module, p, L)
    return dict(quantiles=np.quantile(mod, [0, 0.25, 0.5, 0.75, 1.0], axis=1), clamped_fraction=frac, bound=bound)


def _extend_numbers(module, p, L):
    e = extend_spectra(module, p, L)
    e["guard_scale_min"] = e["guard_scale"][e["t"]].min(axis=1)
    e["guard_scaled"] = float(np.mean(e["guard_scale"] < 1.0))
    return e


def _real(a):
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, np.float64).ravel()]


AUX_PICTURE = ssm.Picture(
    "aux_modulus.png", _aux_numbers, plot_aux,
    lambda n: {"aux_modulus_quantiles": np.asarray(n["quantiles"]).tolist(),
               "aux_clamped_fraction": n["clamped_fraction"]})
EXTEND_PICTURE = ssm.Picture(
    "extend.png", _extend_numbers, plot_extend,
    lambda n: {"extend_t": _real(n["t"]), "extend_spectral_radius": _real(n["radius"]),
               "extend_norm_2": _real(n["norm_2"]), "extend_norm_inf": _real(n["norm_inf"]), "extend_how": n["how"],
               "extend_delta": np.asarray(n["delta"]).tolist(), "extend_guard_scale_min": _real(n["guard_scale_min"]),
               "extend_guard_scaled": n["guard_scaled"]})

GUARD = ssm.Option(
    "extend_guard", "spectral", "stability guard of --ssm_type extend and aux (ssm_ex.py): spectral = each step's "
    "whole transition scaled to 2-norm <= guard_growth^(1/L) (power iteration); rows = the earlier guard, the "
    "correction's rows scaled to row sum <= 1 (pins full mode near S5; runs without this option in their config "
    "resume with it); none = the equations as they are (diagonal clamps off too)", choices=GUARDS, field="guard")
GROWTH = ssm.Option(
    "guard_growth", GUARD_GROWTH, "--extend_guard spectral, --extend_mode full: the most the state may grow over a "
    "whole sequence of L steps; each step's transition may have 2-norm up to guard_growth^(1/L) (1: none may "
    "expand; the auxiliary state and diag mode clamp each |a_t| at 1)", type=float)


def _check_extend(args, error):
    ssm.check_s5(args, error)
    for name in ("R", "delta_basis_size"):
        if getattr(args, name) < 1:
            error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.guard_growth >= 1:
        error(f"--guard_growth must be at least 1 (1: no step may expand), got {args.guard_growth}")


# E, F and δ's parameters: the leaves a warm start trains on top of a frozen S5 layer
EXTENSION_ROLES = {name: "extension" for name in EXTENSION_PARAMS}

ssm.register(ssm.SSMType(
    ("aux",), S5SSMAux, "the auxiliary state, also spelled --enable_auxiliary_state (this file)", module="ssm_ex.py",
    options=ssm.S5_OPTIONS + (
        ssm.Option("time_scale_type", "sinusoidal", "aux: the schedule Δ(t) of the auxiliary state (formulas at the "
                   "top of ssm_ex.py)", choices=TIME_SCALES, arch=True),
        ssm.Option("auxiliary_strength", 0.1, "aux: std of the initial coupling E", type=float),
        GUARD),
    params={**ssm.S5_PARAMS, "E": "extension"}, eigs=ssm.s5_eigs, pictures=(AUX_PICTURE,),
    bench={"aux": ["--ssm_type", "aux"]}, check=ssm.check_s5, frozen_base=True))

ssm.register(ssm.SSMType(
    ("extend",), S5SSMExtend, "the Lambda extension (this file)", module="ssm_ex.py",
    options=ssm.S5_OPTIONS + (
        ssm.Option("R", 10, "rank of the Lambda extension", type=int, arch=True),
        ssm.Option("extend_mode", "full", "extend: full = the dense rank-R correction (exact, chunked scan); diag = "
                   "its diagonal only (parallel scan)", choices=EXTEND_MODES, field="mode", arch=True),
        ssm.Option("delta_type", "learned", "extend: δ(t) learned per step and rank (a table of the dataset's "
                   "length), from a basis of relative time (legendre, fourier: any length), or a fixed schedule",
                   choices=DELTA_TYPES, arch=True),
        ssm.Option("extend_init_scale", 0.05, "extend: std of the initial E, F and learned δ table", type=float,
                   field="init_scale"),
        ssm.Option("extend_chunk", 0, "full mode: steps per chunk of the chunked scan (0: about sqrt(L/2), the "
                   "smallest sequential depth; >= L: one chunk, the plain recurrence)", type=int, field="chunk",
                   convert=lambda v: v or None),
        GUARD, GROWTH,
        ssm.Option("delta_basis_size", 12, "--delta_type legendre|fourier: K basis functions of relative time t/L, "
                   "so δ has K x R parameters per layer and works at any length", type=int, field="basis_size")),
    params={**ssm.S5_PARAMS, **EXTENSION_ROLES}, eigs=ssm.s5_eigs, pictures=(EXTEND_PICTURE,),
    bench={"extend diag": ["--ssm_type", "extend", "--extend_mode", "diag"],
           "extend full": ["--ssm_type", "extend", "--extend_mode", "full"],  # the default guard (spectral)
           "extend full rows": ["--ssm_type", "extend", "--extend_mode", "full", "--extend_guard", "rows"],
           "extend full none": ["--ssm_type", "extend", "--extend_mode", "full", "--extend_guard", "none"]},
    check=_check_extend, module_kw=lambda cfg, meta: {"l_max": meta["seq_len"]}, frozen_base=True))
