"""s4.py: every kernel against powers of its discretised matrices, the FFT convolution against direct sums,
the recurrent mode against the convolution, and a few Adam steps for each layer.

References are independent of the code under test: numpy float64 loops written from the equations (the dense
Ā = (I − Δ/2·A)⁻¹(I + Δ/2·A) for S4, solved with numpy), and np.convolve.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import s4
from test_ssm import c64, crandn, rel_err  # the shared float64-reference helpers

# (N, L): N is the real state size (N/2 complex states); L = 1 and L not a power of two included.
SHAPES = [(2, 1), (4, 7), (8, 16), (6, 33)]
CLASSES = [(s4.S4SSM, {}), (s4.S4DSSM, {"s4d_init": "legs"}), (s4.S4DSSM, {"s4d_init": "lin"}), (s4.DSSSSM, {})]
CLASS_IDS = ["s4", "s4d-legs", "s4d-lin", "dss"]

s4_kernel = jax.jit(s4.s4_kernel, static_argnames="L")
s4d_kernel = jax.jit(s4.s4d_kernel, static_argnames="L")
dss_kernel = jax.jit(s4.dss_kernel, static_argnames="L")
apply_kernel = jax.jit(s4.apply_kernel)


# --------------------------------------------------------------------------------------------------
# helpers: numpy float64 references
# --------------------------------------------------------------------------------------------------


def f32(x):
    return jnp.asarray(x, jnp.float32)


def random_diag_system(rng, H, n, re_range=(-1.0, -0.1)):
    Lambda = rng.uniform(*re_range, (H, n)) + 1j * rng.normal(size=(H, n)) * 5
    step = np.exp(rng.uniform(np.log(1e-2), np.log(0.5), H))
    return Lambda, step


def np_powers_kernel(A_bar, B_bar, C, L, scale):
    """K_k = scale·Re(C Ā^k B̄) for one feature, by powering: A_bar (n, n) or (n,) (diagonal), C (D, n) → (D, L)."""
    K = np.zeros((C.shape[0], L))
    x = B_bar.astype(complex)
    for k in range(L):
        K[:, k] = scale * (C @ x).real
        x = A_bar @ x if A_bar.ndim == 2 else A_bar * x
    return K


def np_s4_discrete(Lambda, P, B, step):
    """Dense bilinear discretisation of A = diag(Λ) − P P* (one feature)."""
    n = len(Lambda)
    A = np.diag(Lambda) - np.outer(P, P.conj())
    left = np.eye(n) - step / 2 * A
    return np.linalg.solve(left, np.eye(n) + step / 2 * A), np.linalg.solve(left, step * B)


def np_C_from_C_tilde(A_bar, C_tilde, L):
    """S4's learned C̃ = C (I − Ā^L) → the C of the recurrence (one feature). C_tilde (D, n)."""
    n = A_bar.shape[0]
    return C_tilde @ np.linalg.inv(np.eye(n) - np.linalg.matrix_power(A_bar, L))


def np_s4d_discrete(Lambda, B, step):
    A_bar = np.exp(Lambda * step)
    return A_bar, (A_bar - 1) / Lambda * B


def np_dss_discrete(Lambda, W, step, L):
    """Λ̄ = exp(ΔΛ), C̄ = W / (Λ Σ_{j<L} Λ̄^j) (one feature, plain sum of powers)."""
    A_bar = np.exp(Lambda * step)
    Z = sum(A_bar ** j for j in range(L))
    return A_bar, W / (Lambda * Z)


def np_apply_kernel(u, K):
    """Direct causal (and, for K[1], anti-causal) convolution. u (L, H), K (dirs, L, H)."""
    L, H = u.shape
    y = np.stack([np.convolve(u[:, h], K[0][:, h])[:L] for h in range(H)], axis=1)
    if len(K) == 2:
        for t in range(L):
            for s in range(t, L):
                y[t] += K[1][s - t] * u[s]
    return y


def params64(params):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    return {k: (v[..., 0] + 1j * v[..., 1] if v.ndim == 3 else v) for k, v in p.items()}


def out_weights(W, dirs):
    H, n2 = W.shape
    return W.reshape(H, dirs, n2 // dirs).transpose(1, 0, 2)


def module_kernel_reference(cls, params, L, dirs):
    """(dirs, L, H) kernel of a module, by powering its discretised matrices built from the raw parameters."""
    p = params64(params)
    step = np.exp(p["log_step"])
    H = len(step)
    if cls is s4.DSSSSM:
        Lambda = p["Lambda_re"] + 1j * p["Lambda_im"]
        W = out_weights(p["W"], dirs)
    else:
        Lambda = np.minimum(p["Lambda_re"], -1e-4) + 1j * p["Lambda_im"]
        W = out_weights(p["C"], dirs)
    K = np.zeros((dirs, L, H))
    for h in range(H):
        if cls is s4.S4SSM:
            A_bar, B_bar = np_s4_discrete(Lambda[h], p["P"][h], p["B"][h], step[h])
            K[:, :, h] = np_powers_kernel(A_bar, B_bar, np_C_from_C_tilde(A_bar, W[:, h], L), L, 2.0)
        elif cls is s4.S4DSSM:
            A_bar, B_bar = np_s4d_discrete(Lambda[h], p["B"][h], step[h])
            K[:, :, h] = np_powers_kernel(A_bar, B_bar, W[:, h], L, 2.0)
        else:
            A_bar, C_bar = np_dss_discrete(Lambda[h], W[:, h], step[h], L)
            K[:, :, h] = np_powers_kernel(A_bar, np.ones(len(A_bar)), C_bar, L, 1.0)
    return K


def init_params(cls, kw, H, N, bidirectional=False, seed=0, perturb=True):
    model = cls(H=H, P=N, bidirectional=bidirectional, **kw)
    params = dict(model.init(jax.random.PRNGKey(seed), method="initial_state")["params"])
    if perturb:  # move off the initialisation (and push one real part above the clip) to test generic values
        rng = np.random.default_rng(seed)
        params = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        params["Lambda_re"] = params["Lambda_re"].at[0, 0].set(0.05)
    return model, params


# --------------------------------------------------------------------------------------------------
# Kernels against powers of the discretised matrices
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,L", SHAPES)
def test_s4_kernel_equals_dense_powers(N, L):
    """Generating function + Woodbury + Cauchy + IFFT == 2·Re(C Ā^k B̄) with the dense bilinear Ā and
    C = C̃ (I − Ā^L)⁻¹ (the kernel's parameter is C̃)."""
    rng = np.random.default_rng(N * 100 + L)
    H, n, D = 3, N // 2, 2
    Lambda, step = random_diag_system(rng, H, n)
    P, B, C = crandn(rng, H, n), crandn(rng, H, n), crandn(rng, D, H, n)
    K = s4_kernel(c64(Lambda), c64(P), c64(B), c64(C), f32(step), L=L)
    ref = np.zeros((D, L, H))
    for h in range(H):
        A_bar, B_bar = np_s4_discrete(Lambda[h], P[h], B[h], step[h])
        ref[:, :, h] = np_powers_kernel(A_bar, B_bar, np_C_from_C_tilde(A_bar, C[:, h], L), L, 2.0)
    assert K.shape == (D, L, H) and K.dtype == jnp.float32
    assert rel_err(K, ref) < 2e-4


def test_s4_kernel_at_hippo_init_equals_dense_powers():
    """The HiPPO-LegS DPLR initialisation (large low-rank term) over a longer kernel, L = 100."""
    N, L, H = 16, 100, 2
    Lambda, P, B = s4.hippo_dplr_half(N)
    rng = np.random.default_rng(0)
    C, step = crandn(rng, 1, H, N // 2), np.array([1e-3, 0.1])
    tile = lambda z: np.tile(z, (H, 1))  # noqa: E731
    K = s4_kernel(c64(tile(Lambda)), c64(tile(P)), c64(tile(B)), c64(C), f32(step), L=L)
    ref = np.zeros((1, L, H))
    for h in range(H):
        A_bar, B_bar = np_s4_discrete(Lambda, P, B, step[h])
        ref[:, :, h] = np_powers_kernel(A_bar, B_bar, np_C_from_C_tilde(A_bar, C[:, h], L), L, 2.0)
    assert rel_err(K, ref) < 2e-4


@pytest.mark.parametrize("N", [2, 6, 16])
def test_dplr_bilinear_equals_dense_solve(N):
    """Sherman–Morrison's closed form == numpy's dense solve of (I − Δ/2·A) for A = diag(Λ) − P P*."""
    rng = np.random.default_rng(N)
    Lambda, step = random_diag_system(rng, 1, N // 2)
    P, B = crandn(rng, N // 2), crandn(rng, N // 2)
    A_bar, B_bar = jax.jit(s4.dplr_bilinear)(c64(Lambda[0]), c64(P), c64(B), f32(step[0]))
    A_ref, B_ref = np_s4_discrete(Lambda[0], P, B, step[0])
    assert rel_err(A_bar, A_ref) < 1e-5 and rel_err(B_bar, B_ref) < 1e-5


@pytest.mark.parametrize("N,L", SHAPES)
def test_s4d_kernel_equals_powers(N, L):
    rng = np.random.default_rng(N * 10 + L)
    H, n, D = 3, N // 2, 2
    Lambda, step = random_diag_system(rng, H, n)
    B, C = crandn(rng, H, n), crandn(rng, D, H, n)
    K = s4d_kernel(c64(Lambda), c64(B), c64(C), f32(step), L=L)
    ref = np.zeros((D, L, H))
    for h in range(H):
        A_bar, B_bar = np_s4d_discrete(Lambda[h], B[h], step[h])
        ref[:, :, h] = np_powers_kernel(A_bar, B_bar, C[:, h], L, 2.0)
    assert rel_err(K, ref) < 1e-5


@pytest.mark.parametrize("N,L", SHAPES)
def test_dss_kernel_equals_powers(N, L):
    """Softmax kernel == Re(C̄ Λ̄^k) with C̄ = W/(Λ Σ_j Λ̄^j), including growing modes (Re Λ > 0)."""
    rng = np.random.default_rng(N + L)
    H, n, D = 3, N // 2, 2
    Lambda, step = random_diag_system(rng, H, n, re_range=(-1.0, 3.0))
    W = crandn(rng, D, H, n)
    K = dss_kernel(c64(Lambda), c64(W), f32(step), L=L)
    ref = np.zeros((D, L, H))
    for h in range(H):
        A_bar, C_bar = np_dss_discrete(Lambda[h], W[:, h], step[h], L)
        ref[:, :, h] = np_powers_kernel(A_bar, np.ones(n), C_bar, L, 1.0)
    assert rel_err(K, ref) < 1e-5


def test_dss_softmax_is_stable_for_strongly_growing_modes():
    """e^{ΔΛL} ≈ e^{300}, e^{-300} overflow float32; the shifted softmax stays finite and exact."""
    L, H, n = 300, 2, 2
    Lambda = np.array([[1.0 + 3j, -1.0 + 0.5j], [2.0 - 1j, 0.5 + 0.0j]])
    step = np.array([1.0, 0.5])
    W = crandn(np.random.default_rng(1), 1, H, n)
    K = dss_kernel(c64(Lambda), c64(W), f32(step), L=L)
    ref = np.zeros((1, L, H))
    for h in range(H):
        A_bar, C_bar = np_dss_discrete(Lambda[h], W[:, h], step[h], L)
        ref[:, :, h] = np_powers_kernel(A_bar, np.ones(n), C_bar, L, 1.0)
    assert np.all(np.isfinite(np.asarray(K)))
    assert rel_err(K, ref) < 1e-4


# --------------------------------------------------------------------------------------------------
# FFT convolution
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,H,dirs", [(1, 2, 1), (7, 3, 2), (16, 2, 1), (33, 4, 2)])
def test_fft_convolution_equals_direct(L, H, dirs):
    rng = np.random.default_rng(L * H * dirs)
    u, K = rng.normal(size=(L, H)), rng.normal(size=(dirs, L, H))
    y = apply_kernel(f32(u), f32(K))
    assert y.shape == (L, H) and y.dtype == jnp.float32
    assert rel_err(y, np_apply_kernel(u, K)) < 1e-5


# --------------------------------------------------------------------------------------------------
# Modules: parameters, convolutional mode, recurrent mode
# --------------------------------------------------------------------------------------------------

LEAVES = {
    s4.S4SSM: {"Lambda_re": (4,), "Lambda_im": (4,), "P": (4, 2), "B": (4, 2), "C": (4, 2), "D": (), "log_step": ()},
    s4.S4DSSM: {"Lambda_re": (4,), "Lambda_im": (4,), "B": (4, 2), "C": (4, 2), "D": (), "log_step": ()},
    s4.DSSSSM: {"Lambda_re": (4,), "Lambda_im": (4,), "W": (4, 2), "D": (), "log_step": ()},
}


@pytest.mark.parametrize("cls,kw", CLASSES, ids=CLASS_IDS)
def test_parameters_and_initialisation(cls, kw):
    H, N = 3, 8
    model, params = init_params(cls, kw, H, N, perturb=False)
    assert {k: v.shape for k, v in params.items()} == {k: (H, *s) for k, s in LEAVES[cls].items()}
    assert all(v.dtype == jnp.float32 for v in params.values())
    step = np.exp(np.asarray(params["log_step"]))
    assert np.all((step >= 1e-3) & (step <= 1e-1))
    Lambda = np.asarray(params["Lambda_re"]) + 1j * np.asarray(params["Lambda_im"])
    if kw.get("s4d_init") == "lin":
        np.testing.assert_allclose(Lambda, np.tile(-0.5 + 1j * np.pi * np.arange(N // 2), (H, 1)), rtol=1e-6)
    else:  # HiPPO-LegS: the real parts are −1/2, the imaginary parts the ±-paired eigenvalues of the skew part
        np.testing.assert_allclose(Lambda.real, -0.5, atol=1e-6)
        q = np.sqrt(2.0 * np.arange(N) + 1.0)
        skew = np.tril(np.outer(q, q), -1) / 2
        skew = skew - skew.T  # S = A + P Pᵀ − diag part: (A + PPᵀ)[n,k] = −√(2n+1)√(2k+1)/2 for n > k
        mu = np.sort(np.linalg.eigvals(skew).imag)
        np.testing.assert_allclose(np.sort(Lambda[0].imag), mu[: N // 2], atol=1e-4)


@pytest.mark.parametrize("cls,kw,bidirectional",
                         [(*c, b) for c, b in itertools.product(CLASSES, [False, True])],
                         ids=[f"{i}-{b}" for i, b in itertools.product(CLASS_IDS, ["uni", "bi"])])
def test_module_equals_reference(cls, kw, bidirectional):
    L, H, N = 21, 3, 6
    model, params = init_params(cls, kw, H, N, bidirectional, seed=L)
    u = np.random.default_rng(2).normal(size=(L, H))
    y = jax.jit(model.apply)({"params": params}, f32(u))
    K = module_kernel_reference(cls, params, L, 2 if bidirectional else 1)
    ref = np_apply_kernel(u, K) + np.asarray(params["D"], np.float64) * u
    assert y.shape == (L, H) and y.dtype == jnp.float32
    assert rel_err(y, ref) < 1e-4


@pytest.mark.parametrize("cls,kw", CLASSES, ids=CLASS_IDS)
@pytest.mark.parametrize("L", [1, 19])
def test_recurrent_mode_equals_convolution(cls, kw, L):
    H, N = 3, 8
    model, params = init_params(cls, kw, H, N, seed=L, perturb=False)
    variables = {"params": params}
    u = f32(np.random.default_rng(L).normal(size=(L, H)))

    @jax.jit
    def run(variables, u):
        def body(x, ut):
            t, u_t = ut
            return model.apply(variables, x, u_t, t, L, method="step")

        x0 = model.apply(variables, method="initial_state")
        return jax.lax.scan(body, x0, (jnp.arange(L), u))[1]

    x0 = model.apply(variables, method="initial_state")
    assert x0.shape == (H, N // 2) and x0.dtype == jnp.complex64 and not np.any(np.asarray(x0))
    y_rec, y_conv = run(variables, u), jax.jit(model.apply)(variables, u)
    assert y_rec.shape == (L, H)
    assert rel_err(y_rec, np.asarray(y_conv, np.float64)) < 1e-4


# --------------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kw", CLASSES[:2] + CLASSES[3:], ids=["s4", "s4d", "dss"])
def test_adam_steps_lower_the_loss(cls, kw):
    """A tiny regression through jax.vmap: target = a fixed causal moving average of the input."""
    Bsz, L, H, N = 4, 12, 2, 4
    model, params = init_params(cls, kw, H, N, perturb=False)
    rng = np.random.default_rng(0)
    u = rng.normal(size=(Bsz, L, H))
    target = np.stack([np.stack([np.convolve(u[b, :, h], [0.5, 0.3, 0.2])[:L] for h in range(H)], 1)
                       for b in range(Bsz)])
    u, target = f32(u), f32(target)
    opt = optax.adam(1e-2)

    def loss_fn(params):
        y = jax.vmap(lambda x: model.apply({"params": params}, x))(u)
        return jnp.mean((y - target) ** 2)

    @jax.jit
    def update(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    opt_state = opt.init(params)
    losses = []
    for _ in range(6):
        params, opt_state, loss, grads = update(params, opt_state)
        losses.append(float(loss))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
    assert losses[-1] < 0.9 * losses[0], losses


# --------------------------------------------------------------------------------------------------
# Bad options
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [s4.S4SSM, s4.S4DSSM, s4.DSSSSM])
@pytest.mark.parametrize("N", [0, -2, 3])
def test_bad_state_size_raises(cls, N):
    with pytest.raises(ValueError, match="P="):
        cls(H=2, P=N).init(jax.random.PRNGKey(0), method="initial_state")


def test_unknown_s4d_init_raises():
    with pytest.raises(ValueError, match="legs"):
        s4.S4DSSM(H=2, P=4, s4d_init="hippo").init(jax.random.PRNGKey(0), method="initial_state")


@pytest.mark.parametrize("cls", [s4.S4SSM, s4.S4DSSM, s4.DSSSSM])
def test_bidirectional_step_raises(cls):
    model = cls(H=2, P=4, bidirectional=True)
    variables = model.init(jax.random.PRNGKey(0), method="initial_state")
    with pytest.raises(ValueError, match="bidirectional"):
        model.apply(variables, jnp.zeros((2, 2), jnp.complex64), jnp.zeros(2), 0, 5, method="step")


def test_dss_step_needs_seq_len():
    model = s4.DSSSSM(H=2, P=4)
    variables = model.init(jax.random.PRNGKey(0), method="initial_state")
    with pytest.raises(ValueError, match="seq_len"):
        model.apply(variables, jnp.zeros((2, 2), jnp.complex64), jnp.zeros(2), method="step")
