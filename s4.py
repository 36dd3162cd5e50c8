"""The S4 family as baselines: S4 (diagonal plus low rank), S4D (diagonal) and DSS (diagonal, softmax kernel).

Gu, Goel & Ré, "Efficiently Modeling Long Sequences with Structured State Spaces", ICLR 2022 (S4);
Gu, Gupta, Goel & Ré, "On the Parameterization and Initialization of Diagonal State Space Models", 2022 (S4D);
Gupta, Gu & Berant, "Diagonal State Spaces are as Effective as Structured State Spaces", 2022 (DSS).

Every layer runs H independent single-input single-output SSMs, one per feature h, each with state size N:

    x'(t) = A x(t) + B u(t),   y(t) = C x(t) + D u(t),        A ∈ C^{N×N}, B ∈ C^N, C ∈ C^N, D ∈ R.

Discretised with a per-feature step Δ (learned as log Δ, log-uniform in [dt_min, dt_max] at init):

    x_k = Ā x_{k-1} + B̄ u_k,   y_k = C x_k + D u_k     ⇔    y = K * u + D u,   K_k = C Ā^k B̄,  k = 0..L-1

The convolution with the length-L kernel K is causal and done by FFT, zero-padded to 2L (`causal_conv`).

Conjugate symmetry. Every layer stores N/2 complex states (N = the field `P`, the size of the equivalent REAL
system). Each kept state stands for itself and its complex conjugate, so the kernel of the real system is
K_k = 2·Re(C Ā^k B̄) over the N/2 kept states (DSS writes Re(·) and absorbs the 2 into its weights W). N must
therefore be even.

S4 (DPLR). A = diag(Λ) − P Q* with Λ, P, B from the normal-plus-low-rank form of HiPPO-LegS
(`ssm.make_dplr_hippo`, in its eigenbasis; Q = P), the first N/2 eigenpairs kept; bilinear discretisation
Ā = (I − Δ/2·A)⁻¹(I + Δ/2·A), B̄ = (I − Δ/2·A)⁻¹ Δ B. The kernel comes from the truncated generating function

    K̂(z) = Σ_{k<L} C Ā^k B̄ z^k = C̃ (I − Ā z)⁻¹ B̄,      C̃ = C (I − Ā^L)     (exact at z^L = 1),

evaluated at the L roots of unity z_j = exp(−2πi j/L), so K̂_j is the DFT of K and K = IFFT(K̂). As in S4's own
code, the learned parameter of the convolutional mode is C̃ itself (stored as `C`), so the kernel needs no dense
N×N matrix, no matrix power and no linear solve: training is O(H·N·L) Cauchy sums plus an FFT. Inserting the
bilinear Ā, B̄:  K̂(z) = Δ · C̃ M(z)⁻¹ B  with  M(z) = (1 − z) I − (Δ/2)(1 + z) A = diag(d(z)) + b(z) P Q*,
d_n(z) = (1 − z) − b(z) Λ_n, b(z) = (Δ/2)(1 + z). The Woodbury identity reduces M⁻¹ to Cauchy kernels
k_{vw}(z) = Σ_n v_n w_n / d_n(z):

    K̂(z) = Δ · [ k_{C̃B} − b k_{C̃P} k_{Q̄B} / (1 + b k_{Q̄P}) ].

(This homogeneous form of the Cauchy kernel, 1/((1 − z) − b(z)Λ), stays finite at z = −1 where the usual
form 2/(1 + z) · 1/(g(z) − Λ), g = (2/Δ)(1 − z)/(1 + z), has a pole; d_n(z) = 0 only at |z| = 1/|Ā eigenvalue|
> 1, never on the unit circle for a stable system.)

Recurrent mode. Streaming needs the C of the recurrence, C = C̃ (I − Ā^L)⁻¹, which depends on L. It is formed
once, when the recurrent mode is set up (`S4SSM.recurrent_system(L)`), in numpy float64 on the host: a dense
solve never enters an XLA program (jaxlib's LAPACK kernels can deadlock XLA's CPU thread pool when two run at
once). Ā and B̄ themselves need no solve: I − Δ/2·A = diag(1 − Δ/2·Λ) + (Δ/2) P P* is inverted exactly by the
Sherman–Morrison formula (`dplr_bilinear`), and a step applies Ā = (I − Δ/2·A)⁻¹(I + Δ/2·A) in that factored
form, O(N) per feature.

S4D. A = diag(Λ), Λ from `s4d_init`: "legs" (the diagonal Λ of make_dplr_hippo, real parts −1/2; B from the
same DPLR form) or "lin" (Λ_n = −1/2 + iπn, B = 1). Zero-order hold: Λ̄ = exp(ΔΛ), B̄ = (Λ̄ − 1)/Λ · B; the
kernel is a Vandermonde product K_k = 2·Re(Σ_n C_n B̄_n Λ̄_n^k) with Λ̄_n^k = exp(kΔΛ_n).

DSS (DSS-softmax). Λ (complex, real part unconstrained), W (complex), Δ per feature:

    K_k = Re( Σ_n W_n / Λ_n · softmax_k(ΛΔk)_n ),   softmax_k(a k) = e^{a k} / Σ_{j<L} e^{a j}   (per state n).

The complex softmax is computed stably by shifting the exponent to the position with the largest real part
(k* = 0 if Re(a) ≤ 0, else L − 1), so every term has modulus ≤ 1 and the term at k* is exactly 1; the
reciprocal of the complex normaliser is regularised (z̄ / (|z|² + ε)) so an (unlikely) zero sum gives no inf.
The equivalent discrete diagonal system is Λ̄ = exp(ΔΛ), B̄ = 1, C̄_n = W_n / (Λ_n Σ_{j<L} e^{a_n j}): C̄ depends
on L, so DSS's recurrent mode needs `seq_len`.

Real parts. S4 and S4D use Re(Λ) = min(Lambda_re, −1e-4) (stable: for S4, A + A* = 2 Re Λ − 2 P P* ≼ 0);
DSS leaves Lambda_re free, as the softmax keeps the kernel bounded.

Bidirectional layers add a second kernel (a second C, or W) applied to the reversed sequence:
y_t = Σ_{s≤t} K_fwd[t−s] u_s + Σ_{s≥t} K_bwd[s−t] u_s; they have no recurrent mode.

Everything works on ONE sequence: u is (L, H). Callers vmap over the batch. Kernels are (dirs, L, H).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import ssm
from ssm import as_complex, complex_normal_init, log_step_init, make_dplr_hippo, real_pair

S4D_INITS = ("legs", "lin")
DSS_EPS = 1e-10  # regularises DSS's complex reciprocals: 1/z ≈ z̄ / (|z|² + ε)
MAX_RE = -1e-4  # S4 / S4D clip the real part of Λ to at most this

# --------------------------------------------------------------------------------------------------
# Initialisation (numpy float64, run once)
# --------------------------------------------------------------------------------------------------


def check_state_size(N) -> int:
    """N/2, the number of complex states kept under conjugate symmetry; ValueError unless N is even and ≥ 2."""
    if not isinstance(N, (int, np.integer)) or N < 1:
        raise ValueError(f"state size P={N!r} must be a positive even integer (e.g. P=64): the layer keeps P/2 "
                         f"complex conjugate-pair states")
    if N % 2 != 0:
        raise ValueError(f"state size P={N} must be even (e.g. P={N + 1}): the layer keeps P/2 complex "
                         f"conjugate-pair states")
    return int(N) // 2


def hippo_dplr_half(N: int):
    """(Λ, P, B), each (N/2,) complex: the first N/2 eigenpairs of the DPLR form of HiPPO-LegS."""
    n = check_state_size(N)
    Lambda, P, B, _, _ = make_dplr_hippo(N)
    return Lambda[:n], P[:n], B[:n]


def s4d_init_eigs(N: int, init: str):
    """S4D's (Λ, B), each (N/2,) complex. legs: HiPPO-LegS's diagonal part; lin: Λ_n = −1/2 + iπn, B = 1."""
    if init not in S4D_INITS:
        raise ValueError(f"unknown s4d_init {init!r}: use one of {S4D_INITS}")
    n = check_state_size(N)
    if init == "legs":
        Lambda, _, B = hippo_dplr_half(N)
        return Lambda, B
    return -0.5 + 1j * np.pi * np.arange(n), np.ones(n, complex)


# --------------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------------


def causal_conv(u, K):
    """y_t = Σ_{k=0}^{t} K_k u_{t−k} per feature, by FFT zero-padded to 2L (no wrap-around). u, K (L, H)."""
    L = u.shape[0]
    n = 2 * L
    y = jnp.fft.irfft(jnp.fft.rfft(u, n=n, axis=0) * jnp.fft.rfft(K, n=n, axis=0), n=n, axis=0)
    return y[:L].astype(u.dtype)


def apply_kernel(u, K):
    """Convolve u (L, H) with K (dirs, L, H): K[0] causally, K[1] (if present) on the reversed sequence."""
    y = causal_conv(u, K[0])
    if K.shape[0] == 2:
        y = y + causal_conv(u[::-1], K[1])[::-1]
    return y


# --------------------------------------------------------------------------------------------------
# S4: diagonal plus low rank, bilinear, generating function through Cauchy kernels
# --------------------------------------------------------------------------------------------------


def dplr_bilinear(Lambda, P, B, step):
    """Dense bilinear discretisation of A = diag(Λ) − P P* for one feature, without a linear solve.

    Lambda, P, B (N,), step scalar → Ā (N, N) = (I − Δ/2·A)⁻¹(I + Δ/2·A), B̄ (N,) = (I − Δ/2·A)⁻¹ Δ B.
    I − Δ/2·A = D + c P P* with D = diag(1 − Δ/2·Λ), c = Δ/2, and by Sherman–Morrison
    (D + c P P*)⁻¹ = D⁻¹ − c D⁻¹P P*D⁻¹ / (1 + c P*D⁻¹P).
    """
    c = step / 2.0
    A = jnp.diag(Lambda) - jnp.outer(P, P.conj())
    d_inv = 1.0 / (1.0 - c * Lambda)
    left = d_inv * P  # D⁻¹P
    right = P.conj() * d_inv  # P*D⁻¹
    inv = jnp.diag(d_inv) - c * jnp.outer(left, right) / (1.0 + c * jnp.sum(P.conj() * left))
    eye = jnp.eye(Lambda.shape[0], dtype=A.dtype)
    return inv @ (eye + c * A), inv @ (step * B)


def recurrent_C(A_bar, C_tilde, L: int):
    """C = C̃ (I − Ā^L)⁻¹ in numpy float64 (host; no XLA LAPACK). A_bar (H, N, N), C_tilde (D, H, N) → (D, H, N)."""
    A_bar, C_tilde = np.asarray(A_bar, np.complex128), np.asarray(C_tilde, np.complex128)
    N = A_bar.shape[-1]
    M = np.eye(N) - np.linalg.matrix_power(A_bar, int(L))  # (H, N, N)
    # C M = C̃  ⇔  Mᵀ Cᵀ = C̃ᵀ, one solve per feature
    return np.einsum("hnd->dhn", np.linalg.solve(np.swapaxes(M, -1, -2), np.einsum("dhn->hnd", C_tilde)))


def cauchy(v, a, b, Lambda):
    """Homogeneous Cauchy kernel: out[..., j] = Σ_n v[..., n] / (a_j − b_j Λ_n). v (..., N), a, b (L,) → (..., L)."""
    r = 1.0 / (a[:, None] - b[:, None] * Lambda[None, :])  # (L, N)
    return v @ r.T


def s4_generating_function(Lambda, P, B, C_tilde, step, z):
    """K̂(z) = C̃ (I − Ā z)⁻¹ B̄ for the bilinear DPLR system of one feature, by Woodbury + Cauchy kernels.

    Lambda, P, B (N,), C_tilde (D, N), step scalar, z (L,) → (D, L).
    """
    D = C_tilde.shape[0]
    a, b = 1.0 - z, step / 2.0 * (1.0 + z)
    v = jnp.concatenate([C_tilde * B, C_tilde * P, (P.conj() * B)[None], (P.conj() * P)[None]], axis=0)
    k = cauchy(v, a, b, Lambda)
    k_CB, k_CP, k_QB, k_QP = k[:D], k[D:2 * D], k[2 * D], k[2 * D + 1]
    return step * (k_CB - b * k_CP * k_QB / (1.0 + b * k_QP))


def s4_kernel_single(Lambda, P, B, C_tilde, step, L: int):
    """S4 kernel of one feature: K_k = 2·Re(C Ā^k B̄), k < L, with C = C̃ (I − Ā^L)⁻¹. C_tilde (D, N) → (D, L)."""
    z = jnp.exp(-2j * np.pi * jnp.arange(L) / L).astype(Lambda.dtype)
    K_hat = s4_generating_function(Lambda, P, B, C_tilde, step, z)
    return 2.0 * jnp.fft.ifft(K_hat, axis=-1).real


def s4_kernel(Lambda, P, B, C_tilde, step, L: int):
    """Lambda, P, B (H, N), C_tilde (D, H, N), step (H,) → K (D, L, H)."""
    return jax.vmap(lambda *args: s4_kernel_single(*args, L), in_axes=(0, 0, 0, 1, 0), out_axes=2)(
        Lambda, P, B, C_tilde, step)


# --------------------------------------------------------------------------------------------------
# S4D: diagonal, zero-order hold, Vandermonde kernel
# --------------------------------------------------------------------------------------------------


def zoh_diag(Lambda, B, step):
    """Λ̄ = exp(ΔΛ), B̄ = (Λ̄ − 1)/Λ · B. Lambda, B (H, N), step (H,)."""
    Lambda_bar = jnp.exp(step[:, None] * Lambda)
    return Lambda_bar, (Lambda_bar - 1.0) / Lambda * B


def vandermonde(Lambda, step, L: int):
    """V[h, n, k] = Λ̄_{hn}^k = exp(k Δ_h Λ_{hn}), (H, N, L)."""
    return jnp.exp((step[:, None] * Lambda)[..., None] * jnp.arange(L))


def s4d_kernel(Lambda, B, C, step, L: int):
    """K_k = 2·Re(Σ_n C_n B̄_n Λ̄_n^k). Lambda, B (H, N), C (D, H, N), step (H,) → K (D, L, H)."""
    _, B_bar = zoh_diag(Lambda, B, step)
    return 2.0 * jnp.einsum("dhn,hnl->dlh", C * B_bar, vandermonde(Lambda, step, L)).real


# --------------------------------------------------------------------------------------------------
# DSS: diagonal, softmax-normalised kernel
# --------------------------------------------------------------------------------------------------


def reciprocal(z, eps: float = DSS_EPS):
    """1/z regularised as z̄ / (|z|² + ε): finite at z = 0."""
    return z.conj() / (z.real ** 2 + z.imag ** 2 + eps)


def dss_softmax(Lambda, step, L: int):
    """Stable complex row-softmax over positions of a k, a = ΔΛ (H, N), k < L.

    Returns (E (H, N, L) = e^{a(k − k*)}, S (H, N) = Σ_k E, k* (H, N)) with k* = 0 where Re(a) ≤ 0, else L − 1,
    so that softmax = E / S and |E| ≤ 1.
    """
    a = step[:, None] * Lambda
    k_star = jnp.where(a.real > 0, L - 1, 0)
    E = jnp.exp(a[..., None] * (jnp.arange(L) - k_star[..., None]))
    return E, E.sum(-1), k_star


def dss_kernel(Lambda, W, step, L: int):
    """K_k = Re(Σ_n W_n / Λ_n · softmax_k(ΔΛk)_n). Lambda (H, N), W (D, H, N), step (H,) → K (D, L, H)."""
    E, S, _ = dss_softmax(Lambda, step, L)
    return jnp.einsum("dhn,hnl->dlh", W * reciprocal(Lambda * S), E).real


def dss_discrete(Lambda, W, step, L: int):
    """The equivalent discrete diagonal system of the DSS kernel for length L:

    Λ̄ = exp(ΔΛ), B̄ = 1, C̄ = W / (Λ Σ_{j<L} e^{aj}) = W · reciprocal(Λ S) · e^{−a k*}, so C̄ Λ̄^k = W/Λ · softmax_k.
    Returns (Λ̄ (H, N), C̄ (D, H, N)).
    """
    E, S, k_star = dss_softmax(Lambda, step, L)
    a = step[:, None] * Lambda
    return jnp.exp(a), W * reciprocal(Lambda * S) * jnp.exp(-a * k_star)


# --------------------------------------------------------------------------------------------------
# Flax modules
# --------------------------------------------------------------------------------------------------


def _tiled(z, H):
    """(N,) complex numpy → (H, N, 2) real, the same for every feature."""
    return lambda key: jnp.tile(real_pair(jnp.asarray(z, jnp.complex64))[None], (H, 1, 1))


class _ConvSSM(nn.Module):
    """Shared parts: fields, the FFT convolution, D, log_step, the zero state. Subclasses define
    `_params()` and `kernel(L)`; parameters are (H, ...) real leaves, complex values as a trailing (re, im) axis."""

    H: int
    P: int
    dt_min: float = 0.001
    dt_max: float = 0.1
    bidirectional: bool = False
    step_rescale: float = 1.0  # every step Δ × this: the same continuous system sampled k times coarser

    def setup(self):
        self.N = check_state_size(self.P)  # complex states kept per feature
        self.n_dirs = 2 if self.bidirectional else 1
        self._params()
        self.D = self.param("D", nn.initializers.normal(stddev=1.0), (self.H,))
        self.log_step = self.param("log_step", log_step_init(self.dt_min, self.dt_max), (self.H,))

    def _params(self):
        raise NotImplementedError

    def _eigenvalue_params(self, Lambda):
        """Lambda_re, Lambda_im (H, N): the same (N,) complex initial eigenvalues for every feature."""
        self.Lambda_re = self.param("Lambda_re", lambda k: jnp.tile(jnp.asarray(Lambda.real, jnp.float32), (self.H, 1)))
        self.Lambda_im = self.param("Lambda_im", lambda k: jnp.tile(jnp.asarray(Lambda.imag, jnp.float32), (self.H, 1)))

    def kernel(self, L: int):
        raise NotImplementedError

    def _out_weights(self, W):
        """(H, dirs·N, 2) stored → (dirs, H, N) complex."""
        return jnp.moveaxis(as_complex(W).reshape(self.H, self.n_dirs, self.N), 1, 0)

    def Lambda(self):
        """The continuous-time eigenvalues (H, N), real parts clipped at MAX_RE (stable)."""
        return jnp.minimum(self.Lambda_re, MAX_RE) + 1j * self.Lambda_im

    def step_size(self):
        return self.step_rescale * jnp.exp(self.log_step)

    def __call__(self, u):
        """(L, H) → (L, H): y = K * u (+ the backward kernel) + D u."""
        return apply_kernel(u, self.kernel(u.shape[0])) + self.D * u

    def initial_state(self):
        """x_{-1} = 0, complex (H, P/2)."""
        return jnp.zeros((self.H, self.N), jnp.complex64)

    def _check_streamable(self):
        if self.bidirectional:
            raise ValueError("a bidirectional SSM has no recurrent mode: its backward kernel needs the whole "
                             "sequence; use the convolutional mode (__call__)")


class S4SSM(_ConvSSM):
    """S4 with the DPLR HiPPO-LegS matrix, bilinear discretisation and the generating-function kernel.

    Parameters: Lambda_re, Lambda_im (H, P/2); P, B (H, P/2, 2); C (H, dirs·P/2, 2) = C̃, the generating
    function's output weights (see the module docstring); D (H,); log_step (H,).
    """

    def _params(self):
        Lambda, Pv, B = hippo_dplr_half(self.P)
        self._eigenvalue_params(Lambda)
        self.P_lr = self.param("P", _tiled(Pv, self.H))
        self.B = self.param("B", _tiled(B, self.H))
        self.C = self.param("C", complex_normal_init(), (self.H, self.n_dirs * self.N))

    def kernel(self, L: int):
        return s4_kernel(self.Lambda(), as_complex(self.P_lr), as_complex(self.B),
                         self._out_weights(self.C), self.step_size(), L)

    def recurrent_system(self, seq_len: int):
        """What every step of a length-seq_len sequence reuses: the factors of Ā = M₁⁻¹ M₀ (all (H, N) or (H,)),
        B̄ (H, N) and C (H, N).

        With c = Δ/2: M₀ = I + cA = diag(1 + cΛ) − c P P*, and M₁⁻¹ = (I − cA)⁻¹ = D⁻¹ − c D⁻¹P P*D⁻¹ / (1 + c P*D⁻¹P),
        D = diag(1 − cΛ) (Sherman–Morrison), so a step costs O(N) per feature, not the O(N²) of a dense Ā.
        C = C̃ (I − Ā^L)⁻¹ is solved once here, on the host in float64 (`recurrent_C`, from the dense Ā of
        `dplr_bilinear`).
        """
        self._check_streamable()
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"S4's recurrent mode needs seq_len, the length L of the sequence (a positive Python "
                             f"int), because its learned C̃ = C (I − Ā^L) depends on L; got {seq_len!r}")
        Lambda, P, B, step = self.Lambda(), as_complex(self.P_lr), as_complex(self.B), self.step_size()
        A_bar, B_bar = jax.vmap(dplr_bilinear)(Lambda, P, B, step)
        C_tilde = self._out_weights(self.C)[:1]
        C = jax.pure_callback(lambda a, c: recurrent_C(a, c, int(seq_len)).astype(np.complex64),
                              jax.ShapeDtypeStruct(C_tilde.shape, jnp.complex64), A_bar, C_tilde,
                              vmap_method="sequential")
        c = (step / 2.0)[:, None]
        d_inv = 1.0 / (1.0 - c * Lambda)
        denom = 1.0 + c[:, 0] * jnp.sum(P.conj() * d_inv * P, -1)  # 1 + c P*D⁻¹P, (H,)
        return dict(m0=1.0 + c * Lambda, P=P, c=c, d_inv=d_inv, denom=denom, B_bar=B_bar, C=C[0])

    def step(self, x_prev, u_t, t=None, seq_len=None, system=None):
        """(x_{t-1} (H, N), u_t (H,)) → (x_t, y_t (H,)) for a sequence of length seq_len; t is unused.
        `system` = recurrent_system(seq_len), set up once; without it, it is formed at every call."""
        f = self.recurrent_system(seq_len) if system is None else system
        P, c, d_inv = f["P"], f["c"], f["d_inv"]
        v = f["m0"] * x_prev - c * P * jnp.sum(P.conj() * x_prev, -1, keepdims=True)  # M₀ x
        w = d_inv * v  # D⁻¹ v
        x = w - c * d_inv * P * (jnp.sum(P.conj() * w, -1) / f["denom"])[:, None]  # M₁⁻¹ M₀ x
        x = x + f["B_bar"] * u_t[:, None]
        return x, 2.0 * jnp.sum(f["C"] * x, -1).real + self.D * u_t


class S4DSSM(_ConvSSM):
    """S4D: diagonal A, zero-order hold, Vandermonde kernel.

    Parameters: Lambda_re, Lambda_im (H, P/2); B (H, P/2, 2); C (H, dirs·P/2, 2); D (H,); log_step (H,).
    """

    s4d_init: str = "legs"

    def _params(self):
        Lambda, B = s4d_init_eigs(self.P, self.s4d_init)
        self._eigenvalue_params(Lambda)
        self.B = self.param("B", _tiled(B, self.H))
        self.C = self.param("C", complex_normal_init(), (self.H, self.n_dirs * self.N))

    def kernel(self, L: int):
        return s4d_kernel(self.Lambda(), as_complex(self.B), self._out_weights(self.C),
                          self.step_size(), L)

    def discrete_system(self):
        """(Λ̄ (H, N), B̄ (H, N), C (dirs, H, N))."""
        Lambda_bar, B_bar = zoh_diag(self.Lambda(), as_complex(self.B), self.step_size())
        return Lambda_bar, B_bar, self._out_weights(self.C)

    def recurrent_system(self, seq_len=None):
        """(Λ̄, B̄, C), what every step reuses (as S4SSM.recurrent_system); seq_len unused."""
        self._check_streamable()
        return self.discrete_system()

    def step(self, x_prev, u_t, t=None, seq_len=None, system=None):
        """(x_{t-1} (H, N), u_t (H,)) → (x_t, y_t (H,)). t, seq_len unused; `system` = recurrent_system()."""
        Lambda_bar, B_bar, C = self.recurrent_system() if system is None else system
        x = Lambda_bar * x_prev + B_bar * u_t[:, None]
        return x, 2.0 * jnp.sum(C[0] * x, -1).real + self.D * u_t


class DSSSSM(_ConvSSM):
    """DSS-softmax: diagonal Λ (free real part), output weights W, softmax-normalised kernel.

    Parameters: Lambda_re, Lambda_im (H, P/2); W (H, dirs·P/2, 2) (the output weights); D (H,); log_step (H,).
    """

    def _params(self):
        Lambda, _, _ = hippo_dplr_half(self.P)
        self._eigenvalue_params(Lambda)
        self.W = self.param("W", complex_normal_init(), (self.H, self.n_dirs * self.N))

    def Lambda(self):
        """The continuous-time eigenvalues (H, N); DSS leaves the real part free (the softmax bounds the kernel)."""
        return self.Lambda_re + 1j * self.Lambda_im

    def kernel(self, L: int):
        return dss_kernel(self.Lambda(), self._out_weights(self.W), self.step_size(), L)

    def discrete_system(self, seq_len: int):
        """(Λ̄ (H, N), C̄ (dirs, H, N)) of the diagonal system whose kernel of length seq_len is DSS's; B̄ = 1."""
        return dss_discrete(self.Lambda(), self._out_weights(self.W), self.step_size(), seq_len)

    def recurrent_system(self, seq_len: int):
        """(Λ̄, C̄) for sequences of length seq_len (a Python int: DSS's C̄ is normalised over the seq_len
        positions), what every step reuses."""
        self._check_streamable()
        if seq_len is None or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"DSS's recurrent mode needs seq_len, the length L of the sequence (a positive Python "
                             f"int), because its kernel is normalised over L positions; got {seq_len!r}")
        return self.discrete_system(int(seq_len))

    def step(self, x_prev, u_t, t=None, seq_len=None, system=None):
        """(x_{t-1} (H, N), u_t (H,)) → (x_t, y_t (H,)) for a sequence of length seq_len; t is unused;
        `system` = recurrent_system(seq_len)."""
        Lambda_bar, C_bar = self.recurrent_system(seq_len) if system is None else system
        x = Lambda_bar * x_prev + u_t[:, None].astype(Lambda_bar.dtype)
        return x, jnp.sum(C_bar[0] * x, -1).real + self.D * u_t


# --------------------------------------------------------------------------------------------------
# The declarations of s4, s4d and dss (ssm.register)
# --------------------------------------------------------------------------------------------------


def s4_eigs(module, p):
    """The eigenvalues of each feature's dense bilinear Ā, and the steps Δ per feature."""
    m = module.bind({"params": p})
    A_bar, _ = jax.vmap(dplr_bilinear)(m.Lambda(), as_complex(m.P_lr), as_complex(m.B), m.step_size())
    return np.linalg.eigvals(np.asarray(A_bar, np.complex128)).ravel(), np.asarray(m.step_size())


def diagonal_eigs(module, p):
    """exp(Δ Λ) per feature (S4D, DSS), and the steps Δ per feature."""
    m = module.bind({"params": p})
    step = m.step_size()
    return np.asarray(np.exp(step[:, None] * m.Lambda())).ravel(), np.asarray(step)


def check_conv(args, error):
    if args.ssm_size_base % 2:
        error(f"--ssm_type {args.ssm_type} keeps conjugate pairs: --ssm_size_base must be even, got "
              f"{args.ssm_size_base}")
    ssm.check_steps(args, error)


_CONV_PARAMS = dict(Lambda_re="eig", Lambda_im="eig", D="D", log_step="step")
for _decl in (
    ssm.SSMType(("s4",), S4SSM, "S4: diagonal plus low rank, bilinear (this file)",
                params=dict(_CONV_PARAMS, P="eig", B="B", C="C")),
    ssm.SSMType(("s4d",), S4DSSM, "S4D: diagonal, zero-order hold (this file)",
                params=dict(_CONV_PARAMS, B="B", C="C"),
                options=(ssm.Option("s4d_init", "legs", "S4D eigenvalues: S4D-LegS or S4D-Lin",
                                    choices=("legs", "lin")),)),
    ssm.SSMType(("dss",), DSSSSM, "DSS-softmax (this file)", params=dict(_CONV_PARAMS, W="regular")),
):
    ssm.register(ssm.SSMType(
        _decl.names, _decl.cls, _decl.summary, options=(ssm.DT_MIN, ssm.DT_MAX) + _decl.options,
        params=_decl.params, eigs=s4_eigs if _decl.cls is S4SSM else diagonal_eigs, check=check_conv,
        module="s4.py"))
