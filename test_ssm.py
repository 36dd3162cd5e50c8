"""Proof that every scan in ssm.py / ssm_ex.py equals its step-by-step recurrence.

References are independent of the code under test: numpy float64 loops written from the equations,
scipy's matrix exponential, dense linear solves, and (for gradients) plain unrolled JAX loops.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import ssm
import ssm_ex

SHAPES = [(1, 4, 3), (7, 8, 2), (64, 16, 4), (100, 6, 5)]  # (L, P, H): L = 1 and L not a power of two
KINDS = ssm_ex.TIME_SCALES
BOOL2 = list(itertools.product([False, True], [False, True]))  # (conj_sym, bidirectional)


def covering(*axes):
    """Every combination of the axes, each given one of SHAPES in turn: all options and all shapes are
    covered without compiling the full Cartesian product with SHAPES."""
    return [(*SHAPES[i % len(SHAPES)], *combo) for i, combo in enumerate(itertools.product(*axes))]

# Everything under test runs jit-compiled, as it does in training (and eager dispatch of a scan is slow).
linear_scan = jax.jit(ssm.linear_scan, static_argnames="reverse")
linear_recurrence = jax.jit(ssm.linear_recurrence, static_argnames="reverse")
discretize = jax.jit(ssm.discretize, static_argnames="method")
apply_ssm = jax.jit(ssm.apply_ssm, static_argnames=("conj_sym", "bidirectional"))
apply_ssm_aux = jax.jit(ssm_ex.apply_ssm_aux, static_argnames=("conj_sym", "bidirectional"))
apply_ssm_extend = jax.jit(ssm_ex.apply_ssm_extend, static_argnames=("conj_sym", "bidirectional", "mode", "chunk"))
lowrank_scan = jax.jit(ssm_ex.lowrank_scan, static_argnames="chunk")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def crandn(rng, *shape, scale=1.0):
    return scale * (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / np.sqrt(2)


def stable_diag(rng, P, r_min=0.5, r_max=0.999):
    return rng.uniform(r_min, r_max, P) * np.exp(1j * rng.uniform(-np.pi, np.pi, P))


def rel_err(x, ref):
    x, ref = np.asarray(x), np.asarray(ref)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    return np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-12)


def c64(x):
    return jnp.asarray(x, jnp.complex64)


def np_linear_recurrence(a, b, reverse=False):
    a = np.broadcast_to(a, b.shape)
    x, out = np.zeros(b.shape[1], complex), np.zeros(b.shape, complex)
    for t in (range(len(b) - 1, -1, -1) if reverse else range(len(b))):
        x = a[t] * x + b[t]
        out[t] = x
    return out


def np_readout(xs, C, conj_sym):
    y = (xs @ C.T).real
    return 2 * y if conj_sym else y


def np_apply_ssm(Lambda_bar, B_bar, C, u, conj_sym, bidirectional):
    """Plain loop of x_t = Λ̄ x_{t-1} + B̄ u_t, y_t = Re(C x_t) (forward, then backward from the end)."""
    L, P = len(u), len(Lambda_bar)
    fwd, bwd = np.zeros((L, P), complex), np.zeros((L, P), complex)
    x = np.zeros(P, complex)
    for t in range(L):
        x = Lambda_bar * x + B_bar @ u[t]
        fwd[t] = x
    x = np.zeros(P, complex)
    for t in reversed(range(L)):
        x = Lambda_bar * x + B_bar @ u[t]
        bwd[t] = x
    xs = np.concatenate([fwd, bwd], axis=1) if bidirectional else fwd
    return np_readout(xs, C, conj_sym)


def random_system(rng, L, P, H, n_dirs=1):
    return (stable_diag(rng, P), crandn(rng, P, H), crandn(rng, H, n_dirs * P), rng.normal(size=(L, H)))


# --------------------------------------------------------------------------------------------------
# linear_scan
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,P,H", SHAPES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_equals_recurrence(L, P, H, shared, reverse):
    rng = np.random.default_rng(L * 100 + P)
    a = stable_diag(rng, P) if shared else np.stack([stable_diag(rng, P) for _ in range(L)])
    b = crandn(rng, L, P)
    ref = np_linear_recurrence(a, b, reverse)
    assert rel_err(linear_scan(c64(a), c64(b), reverse=reverse), ref) < 1e-5
    assert rel_err(linear_recurrence(c64(a), c64(b), reverse=reverse), ref) < 1e-5


@pytest.mark.parametrize("L,P,H,shared,reverse", covering([True, False], [False, True]))
def test_linear_scan_gradients_equal_recurrence(L, P, H, shared, reverse):
    rng = np.random.default_rng(L + P)
    a = c64(stable_diag(rng, P) if shared else np.stack([stable_diag(rng, P) for _ in range(L)]))
    b, w = c64(crandn(rng, L, P)), c64(crandn(rng, L, P))

    def loss(fn):
        return lambda a, b: jnp.sum((w * fn(a, b, reverse=reverse)).real)

    g_scan = jax.jit(jax.grad(loss(ssm.linear_scan), argnums=(0, 1)))(a, b)
    g_loop = jax.jit(jax.grad(loss(ssm.linear_recurrence), argnums=(0, 1)))(a, b)
    for gs, gl in zip(g_scan, g_loop):
        assert rel_err(gs, np.asarray(gl)) < 1e-5


# --------------------------------------------------------------------------------------------------
# HiPPO and discretisation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 2, 5, 8, 16])
def test_make_hippo_matches_definition(N):
    A = np.zeros((N, N))
    for n in range(N):
        for k in range(N):
            if n > k:
                A[n, k] = -np.sqrt(2 * n + 1) * np.sqrt(2 * k + 1)
            elif n == k:
                A[n, k] = -(n + 1)
    np.testing.assert_array_equal(ssm.make_hippo(N), A)


@pytest.mark.parametrize("N", [2, 7, 16, 64])
def test_dplr_hippo_reconstructs_hippo(N):
    Lambda, P, B, V, B_orig = ssm.make_dplr_hippo(N)
    np.testing.assert_allclose(Lambda.real, -0.5, atol=1e-12)
    assert np.all(np.diff(Lambda.imag) >= 0), "imaginary parts must be ascending"
    np.testing.assert_allclose(V.conj().T @ V, np.eye(N), atol=1e-10)
    P_orig = V @ P  # P was returned projected by V*
    np.testing.assert_allclose(P_orig, np.sqrt(np.arange(N) + 0.5), atol=1e-10)
    np.testing.assert_allclose(V @ B, B_orig, atol=1e-10)
    np.testing.assert_allclose(B_orig, np.sqrt(2 * np.arange(N) + 1))
    A = V @ np.diag(Lambda) @ V.conj().T - np.outer(P_orig, P_orig.conj())
    np.testing.assert_allclose(A, ssm.make_hippo(N), atol=1e-9 * N)


@pytest.mark.parametrize("P,blocks,conj_sym", [(16, 1, True), (16, 4, True), (12, 3, False), (8, 8, False)])
def test_init_s5_eigs_block_diagonal(P, blocks, conj_sym):
    Lambda, V, Vinv = ssm.init_s5_eigs(P, blocks, conj_sym)
    block = P // blocks
    keep = block // 2 if conj_sym else block
    assert Lambda.shape == (keep * blocks,) and V.shape == (P, keep * blocks) and Vinv.shape == (keep * blocks, P)
    L1, _, _, V1, _ = ssm.make_dplr_hippo(block)
    for i in range(blocks):
        np.testing.assert_allclose(Lambda[i * keep:(i + 1) * keep], L1[:keep])
        np.testing.assert_allclose(V[i * block:(i + 1) * block, i * keep:(i + 1) * keep], V1[:, :keep])
    np.testing.assert_allclose(Vinv @ V, np.eye(keep * blocks), atol=1e-10)
    np.testing.assert_allclose(Vinv, V.conj().T)


@pytest.mark.parametrize("P,blocks,conj_sym", [(10, 3, False), (12, 4, True), (0, 1, True), (8, 0, False)])
def test_init_s5_eigs_rejects_bad_sizes(P, blocks, conj_sym):
    with pytest.raises(ValueError, match="blocks"):
        ssm.init_s5_eigs(P, blocks, conj_sym)


@pytest.mark.parametrize("P,H", [(1, 1), (5, 3), (16, 4)])
def test_zoh_equals_matrix_exponential(P, H):
    rng = np.random.default_rng(P * H)
    Lambda = -rng.uniform(0.1, 2, P) + 1j * rng.normal(size=P) * 5
    B_tilde, step = crandn(rng, P, H), np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), P))
    # The augmented system d/dτ [x; u] = [[diag(Λ step), diag(step) B̃], [0, 0]] [x; u] over τ ∈ [0, 1].
    M = np.zeros((P + H, P + H), complex)
    M[:P, :P] = np.diag(Lambda * step)
    M[:P, P:] = step[:, None] * B_tilde
    expM = scipy.linalg.expm(M)
    Lambda_bar, B_bar = discretize(c64(Lambda), c64(B_tilde), jnp.asarray(step, jnp.float32), "zoh")
    assert rel_err(Lambda_bar, np.diag(expM[:P, :P])) < 1e-5
    assert rel_err(B_bar, expM[:P, P:]) < 1e-5
    np.testing.assert_allclose(np.asarray(expM[:P, :P]), np.diag(np.diag(expM[:P, :P])), atol=1e-12)


@pytest.mark.parametrize("P,H", [(1, 1), (5, 3), (16, 4)])
def test_bilinear_equals_closed_form(P, H):
    rng = np.random.default_rng(P + H)
    Lambda = -rng.uniform(0.1, 2, P) + 1j * rng.normal(size=P) * 5
    B_tilde, step = crandn(rng, P, H), np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), P))
    A, D = np.diag(Lambda), np.diag(step)
    left = np.eye(P) - D @ A / 2
    A_bar = np.linalg.solve(left, np.eye(P) + D @ A / 2)
    B_bar_ref = np.linalg.solve(left, D @ B_tilde)
    Lambda_bar, B_bar = discretize(c64(Lambda), c64(B_tilde), jnp.asarray(step, jnp.float32), "bilinear")
    assert rel_err(Lambda_bar, np.diag(A_bar)) < 1e-5
    assert rel_err(B_bar, B_bar_ref) < 1e-5


def test_discretize_rejects_unknown_method():
    with pytest.raises(ValueError, match="zoh"):
        discretize(c64(np.ones(2)), c64(np.ones((2, 1))), jnp.ones(2), "euler")


# --------------------------------------------------------------------------------------------------
# apply_ssm
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,P,H", SHAPES)
@pytest.mark.parametrize("conj_sym", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_apply_ssm_equals_loop(L, P, H, conj_sym, bidirectional):
    rng = np.random.default_rng(7 * L + P)
    Lambda_bar, B_bar, C, u = random_system(rng, L, P, H, 2 if bidirectional else 1)
    y = apply_ssm(c64(Lambda_bar), c64(B_bar), c64(C), jnp.asarray(u, jnp.float32), conj_sym, bidirectional)
    assert y.shape == (L, H) and y.dtype == jnp.float32
    assert rel_err(y, np_apply_ssm(Lambda_bar, B_bar, C, u, conj_sym, bidirectional)) < 1e-5


@pytest.mark.parametrize("L,P,H", SHAPES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_conj_sym_equals_full_system(L, P, H, bidirectional):
    """Half the states with 2·Re(·) == the full system made of each state and its conjugate."""
    rng = np.random.default_rng(L * P * H)
    Lambda_bar, B_bar, C, u = random_system(rng, L, P, H, 2 if bidirectional else 1)
    Lambda_full = np.concatenate([Lambda_bar, Lambda_bar.conj()])
    B_full = np.concatenate([B_bar, B_bar.conj()])
    C_dirs = np.split(C, 2 if bidirectional else 1, axis=1)
    C_full = np.concatenate([np.concatenate([c, c.conj()], axis=1) for c in C_dirs], axis=1)
    u32 = jnp.asarray(u, jnp.float32)
    y_half = apply_ssm(c64(Lambda_bar), c64(B_bar), c64(C), u32, True, bidirectional)
    y_full = apply_ssm(c64(Lambda_full), c64(B_full), c64(C_full), u32, False, bidirectional)
    assert rel_err(y_half, np.asarray(y_full)) < 1e-5
    # the full system's output really is real: its imaginary part vanishes
    Bu = u @ B_full.T
    xs = np_linear_recurrence(Lambda_full, Bu)
    np.testing.assert_allclose((xs @ C_full[:, :2 * P].T).imag, 0, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# The S5SSM module
# --------------------------------------------------------------------------------------------------


def module_reference(params, u, conj_sym, bidirectional, discretization, clip_eigs=False, step_rescale=1.0):
    """The layer's output computed in numpy straight from its raw parameters."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    re = np.minimum(p["Lambda_re"], -1e-4) if clip_eigs else p["Lambda_re"]
    Lambda = re + 1j * p["Lambda_im"]
    B = p["B"][..., 0] + 1j * p["B"][..., 1]
    C = p["C"][..., 0] + 1j * p["C"][..., 1]
    step = step_rescale * np.exp(p["log_step"])
    if discretization == "zoh":
        Lambda_bar = np.exp(Lambda * step)
        B_bar = ((Lambda_bar - 1) / Lambda)[:, None] * B
    else:
        Lambda_bar = (1 + step / 2 * Lambda) / (1 - step / 2 * Lambda)
        B_bar = (step / (1 - step / 2 * Lambda))[:, None] * B
    return np_apply_ssm(Lambda_bar, B_bar, C, u, conj_sym, bidirectional) + p["D"] * u


@pytest.mark.parametrize("i,conj_sym,bidirectional,discretization",
                         [(i, *c) for i, c in enumerate(itertools.product([True, False], [False, True],
                                                                           ["zoh", "bilinear"]))])
def test_s5ssm_equals_reference(i, conj_sym, bidirectional, discretization):
    C_init = ssm.C_INITS[i % len(ssm.C_INITS)]
    L, H, P = 33, 3, 8
    u = jax.random.normal(jax.random.PRNGKey(0), (L, H))
    model = ssm.S5SSM(H=H, P=P, blocks=2, C_init=C_init, discretization=discretization, conj_sym=conj_sym,
                      bidirectional=bidirectional, step_rescale=1.5)
    params = model.init(jax.random.PRNGKey(1), method="initial_state")["params"]
    P_s = P // 2 if conj_sym else P
    assert params["B"].shape == (P_s, H, 2) and params["C"].shape == (H, P_s * (1 + bidirectional), 2)
    ref = module_reference(params, np.asarray(u, np.float64), conj_sym, bidirectional, discretization,
                           step_rescale=1.5)
    assert rel_err(jax.jit(model.apply)({"params": params}, u), ref) < 1e-5


def test_s5ssm_clip_eigs():
    L, H, P = 20, 2, 4
    u = jax.random.normal(jax.random.PRNGKey(0), (L, H))
    model = ssm.S5SSM(H=H, P=P, clip_eigs=True)
    params = dict(model.init(jax.random.PRNGKey(1), method="initial_state")["params"])
    params["Lambda_re"] = jnp.array([0.3, -0.2])  # an unstable eigenvalue, clipped to -1e-4
    ref = module_reference(params, np.asarray(u, np.float64), True, False, "zoh", clip_eigs=True)
    assert rel_err(jax.jit(model.apply)({"params": params}, u), ref) < 1e-5


def test_s5ssm_init_values():
    H, P, blocks = 4, 16, 2
    model = ssm.S5SSM(H=H, P=P, blocks=blocks, dt_min=1e-3, dt_max=1e-1)
    params = model.init(jax.random.PRNGKey(0), method="initial_state")["params"]
    Lambda, _, _ = ssm.init_s5_eigs(P, blocks, True)
    np.testing.assert_allclose(params["Lambda_re"], Lambda.real, rtol=1e-6)
    np.testing.assert_allclose(params["Lambda_im"], Lambda.imag, rtol=1e-6)
    steps = np.exp(np.asarray(params["log_step"]))
    assert np.all((steps >= 1e-3) & (steps <= 1e-1))


@pytest.mark.parametrize("conj_sym", [True, False])
def test_s5ssm_recurrent_mode_equals_parallel(conj_sym):
    L, H, P = 25, 3, 6
    u = jax.random.normal(jax.random.PRNGKey(2), (L, H))
    model = ssm.S5SSM(H=H, P=P, conj_sym=conj_sym)
    variables = model.init(jax.random.PRNGKey(3), method="initial_state")
    y = jax.jit(model.apply)(variables, u)
    step = jax.jit(lambda x, u_t: model.apply(variables, x, u_t, method="step"))
    x = model.apply(variables, method="initial_state")
    for t in range(L):
        x, y_t = step(x, u[t])
        assert rel_err(y_t, np.asarray(y[t])) < 1e-5


def test_s5ssm_bidirectional_has_no_recurrent_mode():
    model = ssm.S5SSM(H=2, P=4, bidirectional=True)
    variables = model.init(jax.random.PRNGKey(0), method="initial_state")
    with pytest.raises(ValueError, match="bidirectional"):
        model.apply(variables, jnp.zeros(2, jnp.complex64), jnp.zeros(2), method="step")


def test_s5ssm_jit_under_vmap():
    Bsz, L, H, P = 5, 17, 3, 8
    u = jax.random.normal(jax.random.PRNGKey(0), (Bsz, L, H))
    model = ssm.S5SSM(H=H, P=P, bidirectional=True)
    variables = model.init(jax.random.PRNGKey(1), method="initial_state")
    y = jax.jit(jax.vmap(lambda x: model.apply(variables, x)))(u)
    assert y.shape == (Bsz, L, H)
    for i in range(Bsz):
        assert rel_err(y[i], np.asarray(model.apply(variables, u[i]))) < 1e-6


@pytest.mark.parametrize("P,blocks,conj_sym", [(10, 3, False), (12, 4, True)])
def test_s5ssm_bad_sizes_raise(P, blocks, conj_sym):
    with pytest.raises(ValueError, match="blocks"):
        ssm.S5SSM(H=2, P=P, blocks=blocks, conj_sym=conj_sym).init(jax.random.PRNGKey(0), jnp.zeros((3, 2)))


# ==================================================================================================
# ssm_ex: the time-varying extensions
# ==================================================================================================


@pytest.mark.parametrize("L", [1, 10, 157])
def test_time_scale_formulas(L):
    t = np.arange(L)
    expected = {"linear": 1 + 0.1 * t / L, "exponential": np.exp(-0.01 * t),
                "sinusoidal": 1 + 0.1 * np.sin(0.1 * t), "constant": np.ones(L)}
    for kind in KINDS:
        np.testing.assert_allclose(ssm_ex.time_scale(L, kind), expected[kind], rtol=1e-6)
    with pytest.raises(ValueError, match="time_scale_type"):
        ssm_ex.time_scale(L, "cubic")


def np_aux_states(Lambda_bar, B_bar, E, delta, u):
    """x_t = Λ̄ x_{t-1} + B̄ u_t + E p_{t-1},  p_t = Δ(t) x_t, with x and p kept separately."""
    x, p = np.zeros(len(Lambda_bar), complex), np.zeros(len(Lambda_bar), complex)
    out = []
    for t in range(len(u)):
        x = Lambda_bar * x + B_bar @ u[t] + E * p
        p = delta[t] * x
        out.append(x)
    return np.array(out)


def np_extend_states(Lambda_bar, B_bar, E, F, delta, u, mode):
    """x_t = Λ_ex(t) x_{t-1} + B̄ u_t with the dense P×P Λ_ex(t) = diag(Λ̄) + E diag(δ(t)) F."""
    x, out = np.zeros(len(Lambda_bar), complex), []
    for t in range(len(u)):
        A = np.diag(Lambda_bar) + E @ np.diag(delta[t]) @ F
        if mode == "diag":
            A = np.diag(np.diag(A))
        x = A @ x + B_bar @ u[t]
        out.append(x)
    return np.array(out)


def np_bidirectional(states_fn, u, C, conj_sym, bidirectional):
    """Backward direction = the same recurrence on the reversed sequence (own time index), reversed back."""
    xs = states_fn(u)
    if bidirectional:
        xs = np.concatenate([xs, states_fn(u[::-1])[::-1]], axis=1)
    return np_readout(xs, C, conj_sym)


@pytest.mark.parametrize("L,P,H,kind,conj_sym,bidirectional", covering(KINDS, [False, True], [False, True]))
def test_apply_ssm_aux_equals_loop(L, P, H, kind, conj_sym, bidirectional):
    rng = np.random.default_rng(L + 3 * P)
    Lambda_bar, B_bar, C, u = random_system(rng, L, P, H, 2 if bidirectional else 1)
    E = crandn(rng, P, scale=0.1)
    delta = np.asarray(ssm_ex.time_scale(L, kind), np.float64)
    ref = np_bidirectional(lambda v: np_aux_states(Lambda_bar, B_bar, E, delta, v), u, C, conj_sym, bidirectional)
    y = apply_ssm_aux(c64(Lambda_bar), c64(B_bar), c64(C), c64(E), jnp.asarray(delta, jnp.float32),
                             jnp.asarray(u, jnp.float32), conj_sym, bidirectional)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("L,P,H,mode,conj_sym,bidirectional",
                         covering(ssm_ex.EXTEND_MODES, [False, True], [False, True]))
def test_apply_ssm_extend_equals_loop(L, P, H, mode, conj_sym, bidirectional):
    R = 3
    rng = np.random.default_rng(L * 5 + P)
    Lambda_bar, B_bar, C, u = random_system(rng, L, P, H, 2 if bidirectional else 1)
    Lambda_bar *= 0.9
    E, F, delta = crandn(rng, P, R, scale=0.2), crandn(rng, R, P, scale=0.2), rng.normal(size=(L, R))
    ref = np_bidirectional(lambda v: np_extend_states(Lambda_bar, B_bar, E, F, delta, v, mode), u, C, conj_sym,
                           bidirectional)
    y = apply_ssm_extend(c64(Lambda_bar), c64(B_bar), c64(C), c64(E), c64(F), jnp.asarray(delta, jnp.float32),
                                jnp.asarray(u, jnp.float32), conj_sym, bidirectional, mode)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("L,chunk", [(1, 1), (1, 4), (5, 3), (16, 4), (16, 16), (23, 1), (23, 4), (23, 50)])
def test_lowrank_scan_any_chunk_equals_loop(L, chunk):
    P, R = 5, 2
    rng = np.random.default_rng(L * chunk)
    Lambda_bar = 0.9 * stable_diag(rng, P)
    E, F, delta, b = crandn(rng, P, R, scale=0.3), crandn(rng, R, P, scale=0.3), rng.normal(size=(L, R)), crandn(
        rng, L, P)
    s = rng.uniform(0, 1, size=(L, P))
    x, ref = np.zeros(P, complex), []
    for t in range(L):
        x = (np.diag(Lambda_bar) + np.diag(s[t]) @ E @ np.diag(delta[t]) @ F) @ x + b[t]
        ref.append(x)
    xs = lowrank_scan(c64(Lambda_bar), c64(E), c64(F), jnp.asarray(delta, jnp.float32), c64(b),
                             jnp.asarray(s, jnp.float32), chunk=chunk)
    assert rel_err(xs, np.array(ref)) < 1e-5


# Full mode against a float64 loop with the dense Λ_ex(t): states, outputs and gradients (the chunked scan's
# reverse mode is a hand-written adjoint, so its gradients get their own float64 reference).


def x64_dense_loop_output(Lambda_bar, B_bar, C, E, F, delta, s, u, conj_sym, bidirectional):
    """y from x_t = (diag(a_t) + diag(s_t) E diag(δ_t) F) x_{t-1} + B̄ u_t, one dense P×P matrix per step, with
    a_t = Λ̄ (P,) or a time-varying diagonal Lambda_bar (L, P) (call inside jax.enable_x64 with float64/complex128
    arguments; s None means no row scale)."""
    L, P = u.shape[0], Lambda_bar.shape[-1]
    s = jnp.ones((L, P)) if s is None else s
    a = jnp.broadcast_to(Lambda_bar, (L, P))

    def states(v):
        def step(x, inp):
            a_t, d_t, s_t, v_t = inp
            A = jnp.diag(a_t) + s_t[:, None] * (E @ jnp.diag(d_t.astype(E.dtype)) @ F)
            x = A @ x + B_bar @ v_t.astype(B_bar.dtype)
            return x, x

        return jax.lax.scan(step, jnp.zeros(P, B_bar.dtype), (a, delta, s, v))[1]

    xs = states(u)
    if bidirectional:  # own time index: the reversed sequence runs through the same a_t, δ(t), s_t from t = 0
        xs = jnp.concatenate([xs, states(u[::-1])[::-1]], axis=1)
    y = (xs @ C.T).real
    return 2 * y if conj_sym else y


def full_mode_case(L, P, R, H, bidirectional, guarded, seed, varying=False):
    """Arguments of full mode: a row scale s when `guarded`, a time-varying diagonal (L, P) when `varying` (the
    spectral guard's c_t Λ̄)."""
    rng = np.random.default_rng(seed)
    Lambda_bar, B_bar, C, u = random_system(rng, L, P, H, 2 if bidirectional else 1)
    E, F, delta = crandn(rng, P, R, scale=0.3), crandn(rng, R, P, scale=0.3), rng.normal(size=(L, R))
    s = rng.uniform(0.2, 1.0, size=(L, P)) if guarded else None
    a = 0.9 * Lambda_bar * (rng.uniform(0.5, 1.0, size=(L, 1)) if varying else 1.0)
    return [a, B_bar, C, E, F, delta, s, u]


FULL_CASES = [  # (L, P, R, chunk, guarded, bidirectional, conj_sym, time-varying diagonal)
    (1, 4, 2, None, False, False, True, False),  # L = 1
    (1, 4, 3, 2, True, True, False, True),
    (23, 6, 1, 5, True, False, True, False),  # R = 1, L not a multiple of the chunk
    (40, 8, 5, None, True, True, True, False),  # default chunk, R > P/2
    (64, 4, 2, 8, False, False, False, True),  # L a multiple of the chunk
] + [pytest.param(*case, marks=pytest.mark.slow) for case in [  # more of the same: in the full suite only
    (23, 6, 4, 5, False, True, False, True),  # R > P/2
    (40, 8, 3, None, True, True, True, True),
    (37, 5, 3, 4, True, True, False, False),
]]


@pytest.mark.parametrize("L,P,R,chunk,guarded,bidirectional,conj_sym,varying", FULL_CASES)
def test_full_mode_outputs_and_gradients_equal_float64_dense_loop(L, P, R, chunk, guarded, bidirectional, conj_sym,
                                                                   varying):
    H = 3
    case = full_mode_case(L, P, R, H, bidirectional, guarded, seed=L * 7 + P + R, varying=varying)
    diff = [i for i, a in enumerate(case) if a is not None]  # every argument, the row scale included
    w = np.random.default_rng(1).normal(size=(L, H))

    def fast(Lambda_bar, B_bar, C, E, F, delta, s, u):
        return ssm_ex._apply_lowrank(Lambda_bar, B_bar, C, E, F, delta, u, conj_sym, bidirectional, s, chunk)

    def ref(*a):
        return x64_dense_loop_output(*a, conj_sym, bidirectional)

    def grads(fn, args):
        def loss(*d):
            return jnp.sum(jnp.asarray(w, d[0].real.dtype) * fn(*d[:6], d[6] if guarded else None, d[7]))

        return jax.jit(jax.grad(loss, argnums=tuple(diff)))(*[a if a is not None else 0.0 for a in args])

    as32 = [None if a is None else (c64(a) if np.iscomplexobj(a) else jnp.asarray(a, jnp.float32)) for a in case]
    y = jax.jit(fast)(*as32)
    g = grads(fast, as32)
    with jax.enable_x64(True):
        as64 = [None if a is None else jnp.asarray(a) for a in case]
        y_ref = np.asarray(jax.jit(ref)(*as64))
        g_ref = [np.asarray(x) for x in grads(ref, as64)]
    assert rel_err(y, y_ref) < 1e-5
    names = ["Lambda_bar", "B_bar", "C", "E", "F", "delta", "row_scale", "u"]
    for i, gf, gr in zip(diff, g, g_ref):
        assert rel_err(gf, gr) < 1e-4, f"gradient of {names[i]}"


@pytest.mark.parametrize("L,P,R,chunk,guarded,varying", [(23, 6, 4, 5, True, True), (40, 8, 3, None, False, False),
                                                         (1, 4, 2, None, True, False)])
def test_lowrank_scan_equals_its_plain_loop_beside_it(L, P, R, chunk, guarded, varying):
    """lowrank_scan (chunks, shared chunk maps, hand-written adjoint) against lowrank_recurrence, the step-by-step loop
    written beside it in ssm_ex.py: all states and the gradient of every argument."""
    a, _, _, E, F, delta, s, _ = full_mode_case(L, P, R, 2, False, guarded, seed=L + P, varying=varying)
    b = crandn(np.random.default_rng(3), L, P)
    w = c64(crandn(np.random.default_rng(4), L, P))
    args = [c64(a), c64(E), c64(F), jnp.asarray(delta, jnp.float32), c64(b)] + ([jnp.asarray(s, jnp.float32)]
                                                                               if guarded else [])
    fast = lambda *x: ssm_ex.lowrank_scan(*x[:5], x[5] if guarded else None, chunk)  # noqa: E731
    ref = lambda *x: ssm_ex.lowrank_recurrence(*x[:5], x[5] if guarded else None)  # noqa: E731
    assert rel_err(jax.jit(fast)(*args), jax.jit(ref)(*args)) < 1e-5
    def grad(f):
        return jax.jit(jax.grad(lambda *x: jnp.sum(jnp.real(w * f(*x))), argnums=tuple(range(len(args)))))(*args)

    for i, (g, g_ref) in enumerate(zip(grad(fast), grad(ref))):
        assert rel_err(g, g_ref) < 1e-4, i


def test_full_mode_batched_gradients_equal_float64_dense_loop():
    """Under vmap (how the model runs it) the chunk maps are shared and the parameter cotangents are summed
    over the batch."""
    L, P, R, H, Bsz = 29, 6, 4, 2, 3
    Lambda_bar, B_bar, C, E, F, delta, s, _ = full_mode_case(L, P, R, H, True, True, seed=11, varying=True)
    u = np.random.default_rng(2).normal(size=(Bsz, L, H))
    w = np.random.default_rng(3).normal(size=(Bsz, L, H))
    params = [Lambda_bar, B_bar, C, E, F, delta, s]

    def loss(fn, p, u):
        return jnp.sum(jnp.asarray(w, u.dtype) * jax.vmap(lambda v: fn(*p, v))(u))

    fast = lambda *a: ssm_ex._apply_lowrank(*a[:6], a[7], True, True, a[6], 5)  # noqa: E731
    p32 = [c64(a) if np.iscomplexobj(a) else jnp.asarray(a, jnp.float32) for a in params]
    g = jax.jit(jax.grad(lambda p, u: loss(fast, p, u), argnums=(0, 1)))(p32, jnp.asarray(u, jnp.float32))
    with jax.enable_x64(True):
        ref = lambda *a: x64_dense_loop_output(*a, True, True)  # noqa: E731
        g_ref = jax.jit(jax.grad(lambda p, u: loss(ref, p, u), argnums=(0, 1)))([jnp.asarray(a) for a in params],
                                                                            jnp.asarray(u))
        g_ref = jax.tree_util.tree_map(np.asarray, g_ref)
    for gf, gr in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        assert rel_err(gf, gr) < 1e-4


def dense_power_iteration(Lambda_bar, E, F, delta, iterations=ssm_ex.POWER_ITERATIONS):
    """v_t (L, P) after `iterations` steps of v ← A_tᴴA_t v / ‖·‖ from the spectral guard's start vector, each
    A_t = diag(Λ̄) + E diag(δ_t) F formed as a dense matrix, a plain numpy float64 loop over t."""
    v0 = np.asarray(ssm_ex._start_vector(len(Lambda_bar)), np.complex128)
    out = []
    for d in delta:
        A = np.diag(Lambda_bar) + E @ np.diag(d) @ F
        v = v0
        for _ in range(iterations):
            v = A.conj().T @ (A @ v)
            v = v / np.linalg.norm(v)
        out.append(v)
    return np.stack(out)


@pytest.mark.parametrize("guard,bidirectional,growth", [("rows", False, 1.0), ("spectral", False, 1.0)] + [
    pytest.param(*case, marks=pytest.mark.slow) for case in [("rows", True, 1.0), ("spectral", True, 1.0),
                                                             ("spectral", False, 30.0), ("none", False, 1.0)]])
def test_guarded_full_module_equals_float64_reference(guard, bidirectional, growth):
    """The module (discretisation, modulus clamp, guard, chunked scan) against the same layer written out in float64
    from its raw parameters, with the guard active; outputs and every parameter's gradient. The spectral guard's
    reference forms every A_t as a dense float64 matrix and runs the power iteration on it (dense_power_iteration),
    then σ_t = ‖A_t v_t‖ with v_t held; each step's bound is r = growth^(1/L)."""
    L, H, P, R = 33, 3, 8, 5
    model = ssm_ex.S5SSMExtend(H=H, P=P, R=R, l_max=40, mode="full", bidirectional=bidirectional, chunk=6,
                               guard=guard, guard_growth=growth)
    r = growth ** (1 / L)
    params = dict(model.init(jax.random.PRNGKey(1), method="initial_state")["params"])
    params["E"], params["F"] = params["E"] * 20, params["F"] * 20  # large enough that the guard scales rows
    if guard != "none":
        params["Lambda_re"] = params["Lambda_re"].at[0].set(0.3)  # and one unstable base eigenvalue to clamp
    params["log_step"] = jnp.full_like(params["log_step"], np.log(0.5))  # |λ̄| well inside the circle: room
    u = jax.random.normal(jax.random.PRNGKey(0), (L, H))
    w = jax.random.normal(jax.random.PRNGKey(2), (L, H))
    cplx = lambda a: a[..., 0] + 1j * a[..., 1]  # noqa: E731

    def system(p):
        Lambda = p["Lambda_re"] + 1j * p["Lambda_im"]
        Lb = jnp.exp(Lambda * jnp.exp(p["log_step"]))
        B_bar = ((Lb - 1) / Lambda)[:, None] * cplx(p["B"])
        if guard != "none":
            Lb = Lb * jnp.minimum(1.0, r / jnp.abs(Lb))
        return Lb, B_bar, cplx(p["E"]), cplx(p["F"]), p["delta_table"][:L]

    def reference(p, u, v):
        Lb, B_bar, E, F, delta = system(p)
        s = None
        if guard == "rows":
            row = jnp.abs(delta) @ (jnp.abs(E) * jnp.sum(jnp.abs(F), axis=1)[None, :]).T  # bound on Σ_q |(EδF)_pq|
            s = jnp.minimum(1.0, jnp.maximum(1.0 - jnp.abs(Lb), 0.0)[None, :] / row)
        elif guard == "spectral":
            A = jnp.diag(Lb)[None] + jnp.einsum("pr,lr,rq->lpq", E, delta.astype(E.dtype), F)
            sigma = jnp.linalg.norm(jnp.einsum("lpq,lq->lp", A, v), axis=1)
            c = jnp.minimum(1.0, r / sigma)[:, None]
            Lb, s = c * Lb[None, :], jnp.broadcast_to(c, (L, P // 2))
        y = x64_dense_loop_output(Lb, B_bar, cplx(p["C"]), E, F, delta, s, u, True, bidirectional)
        return y + p["D"] * u, (jnp.ones((L, 1)) if s is None else s)

    y = jax.jit(model.apply)({"params": params}, u)
    g = jax.jit(jax.grad(lambda p: jnp.sum(w * model.apply({"params": p}, u))))(params)
    with jax.enable_x64(True):
        p64 = {k: jnp.asarray(np.asarray(v), jnp.float64) for k, v in params.items()}
        Lb, _, E, F, delta = (np.asarray(a) for a in jax.jit(system)(p64))
        v = jnp.asarray(dense_power_iteration(Lb, E, F, delta))
        u64, w64 = jnp.asarray(np.asarray(u), jnp.float64), jnp.asarray(np.asarray(w), jnp.float64)
        y_ref, s = jax.jit(reference)(p64, u64, v)
        s = np.asarray(s)
        g_ref = jax.jit(jax.grad(lambda p: jnp.sum(w64 * reference(p, u64, v)[0])))(p64)
        g_ref = {k: np.asarray(v) for k, v in g_ref.items()}
    if guard != "none":
        assert np.mean((s > 0.05) & (s < 0.95)) > 0.3, "the guard must act in this test (not only by zeroing rows)"
    assert rel_err(y, np.asarray(y_ref)) < 1e-5
    for k in params:
        assert rel_err(g[k], g_ref[k]) < 1e-4, f"gradient of {k}"


# Gradients: the parallel / chunked implementations against plain unrolled JAX loops of the equations.


def jnp_aux_loop(Lambda_bar, B_bar, C, E, delta, u, conj_sym):
    x, p, ys = jnp.zeros_like(Lambda_bar), jnp.zeros_like(Lambda_bar), []
    for t in range(u.shape[0]):
        x = Lambda_bar * x + B_bar @ u[t] + E * p
        p = delta[t] * x
        ys.append((C @ x).real)
    y = jnp.stack(ys)
    return 2 * y if conj_sym else y


def jnp_extend_loop(Lambda_bar, B_bar, C, E, F, delta, u, conj_sym, mode):
    x, ys = jnp.zeros_like(Lambda_bar), []
    for t in range(u.shape[0]):
        A = jnp.diag(Lambda_bar) + E @ jnp.diag(delta[t].astype(E.dtype)) @ F
        if mode == "diag":
            A = jnp.diag(jnp.diag(A))
        x = A @ x + B_bar @ u[t]
        ys.append((C @ x).real)
    y = jnp.stack(ys)
    return 2 * y if conj_sym else y


def assert_grads_close(f_fast, f_ref, args, argnums, tol=1e-4):
    w = jax.random.normal(jax.random.PRNGKey(9), f_ref(*args).shape)
    g_fast = jax.jit(jax.grad(lambda *a: jnp.sum(w * f_fast(*a)), argnums=argnums))(*args)
    g_ref = jax.jit(jax.grad(lambda *a: jnp.sum(w * f_ref(*a)), argnums=argnums))(*args)
    for i, gf, gr in zip(argnums, g_fast, g_ref):
        assert rel_err(gf, np.asarray(gr)) < tol, f"gradient of argument {i}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("conj_sym", [pytest.param(False, marks=pytest.mark.slow), True])
def test_aux_gradients_equal_loop(kind, conj_sym):
    L, P, H = 11, 4, 3
    rng = np.random.default_rng(3)
    Lambda_bar, B_bar, C, u = random_system(rng, L, P, H)
    args = (c64(Lambda_bar), c64(B_bar), c64(C), c64(crandn(rng, P, scale=0.2)),
            jnp.asarray(ssm_ex.time_scale(L, kind)), jnp.asarray(u, jnp.float32))

    def fast(*a):
        return apply_ssm_aux(*a, conj_sym=conj_sym, bidirectional=False)

    assert_grads_close(fast, lambda *a: jnp_aux_loop(*a, conj_sym), args, argnums=(0, 1, 2, 3, 4, 5))


@pytest.mark.parametrize("mode", ssm_ex.EXTEND_MODES)
@pytest.mark.parametrize("conj_sym", [False, True])
def test_extend_gradients_equal_loop(mode, conj_sym):
    L, P, H, R = 12, 4, 3, 2
    rng = np.random.default_rng(4)
    Lambda_bar, B_bar, C, u = random_system(rng, L, P, H)
    args = (c64(0.9 * Lambda_bar), c64(B_bar), c64(C), c64(crandn(rng, P, R, scale=0.3)),
            c64(crandn(rng, R, P, scale=0.3)), jnp.asarray(rng.normal(size=(L, R)), jnp.float32),
            jnp.asarray(u, jnp.float32))

    def fast(*a):
        return apply_ssm_extend(*a, conj_sym=conj_sym, bidirectional=False, mode=mode, chunk=5)

    assert_grads_close(fast, lambda *a: jnp_extend_loop(*a, conj_sym, mode), args, argnums=(0, 1, 2, 3, 4, 5, 6))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_zero_E_reduces_to_s5(bidirectional):
    L, P, H, R = 29, 6, 3, 4
    rng = np.random.default_rng(5)
    Lambda_bar, B_bar, C, u = (c64(x) for x in random_system(rng, L, P, H, 2 if bidirectional else 1))
    u = u.real
    y_s5 = np.asarray(apply_ssm(Lambda_bar, B_bar, C, u, True, bidirectional))
    delta = jnp.asarray(rng.normal(size=(L, R)), jnp.float32)
    y_aux = apply_ssm_aux(Lambda_bar, B_bar, C, jnp.zeros(P, jnp.complex64), delta[:, 0], u, True,
                                 bidirectional)
    np.testing.assert_allclose(y_aux, y_s5, rtol=0, atol=1e-6 * np.abs(y_s5).max())
    for mode in ssm_ex.EXTEND_MODES:
        y_ex = apply_ssm_extend(Lambda_bar, B_bar, C, jnp.zeros((P, R), jnp.complex64),
                                       c64(crandn(rng, R, P)), delta, u, True, bidirectional, mode)
        np.testing.assert_allclose(y_ex, y_s5, rtol=0, atol=1e-6 * np.abs(y_s5).max())


# The modules: guard, recurrent mode, learned-table length, warm start.

EXT_CORE = [
    ("aux", dict(time_scale_type="linear")),
    ("aux", dict(time_scale_type="sinusoidal")),
    ("extend", dict(mode="full", delta_type="learned")),
    ("extend", dict(mode="diag", delta_type="learned")),
    ("extend", dict(mode="full", delta_type="exponential")),
    ("extend", dict(mode="diag", delta_type="sinusoidal")),
    ("extend", dict(mode="full", delta_type="learned", guard="rows")),
]
EXT_MORE = [  # the other guards, bases and bounds: in the full suite only (pytest -m "not slow" leaves them out)
    ("extend", dict(mode="full", delta_type="legendre")),
    ("extend", dict(mode="diag", delta_type="fourier", guard="none")),
    ("aux", dict(time_scale_type="linear", guard="none")),
    ("extend", dict(mode="full", delta_type="fourier", guard_growth=100.0)),
    ("extend", dict(mode="diag", delta_type="learned", guard_growth=100.0)),  # diag mode clamps at 1 whatever G
]
EXT_MODULES = EXT_CORE + [pytest.param(*case, marks=pytest.mark.slow) for case in EXT_MORE]


def make_module(name, H, P, l_max, **kw):
    if name == "aux":
        return ssm_ex.S5SSMAux(H=H, P=P, **kw)
    return ssm_ex.S5SSMExtend(H=H, P=P, R=3, l_max=l_max, **kw)


@pytest.mark.parametrize("name,kw", EXT_MODULES)
def test_module_recurrent_mode_equals_parallel(name, kw):
    L, H, P = 21, 3, 6
    u = jax.random.normal(jax.random.PRNGKey(0), (L, H))
    model = make_module(name, H, P, l_max=32, **kw)
    variables = model.init(jax.random.PRNGKey(1), method="initial_state")
    y = jax.jit(model.apply)(variables, u)
    step = jax.jit(lambda x, u_t, t: model.apply(variables, x, u_t, t, L, method="step"))
    x = model.apply(variables, method="initial_state")
    for t in range(L):
        x, y_t = step(x, u[t], t)
        assert rel_err(y_t, np.asarray(y[t])) < 1e-5, f"step {t}"


@pytest.mark.parametrize("name,kw", EXT_MODULES)
def test_module_without_active_guard_equals_pure_function(name, kw):
    """With small extension parameters the guard is inactive and the module is exactly its equations."""
    L, H, P = 19, 2, 8
    u = jax.random.normal(jax.random.PRNGKey(0), (L, H))
    model = make_module(name, H, P, l_max=L, bidirectional=True, **kw)
    params = model.init(jax.random.PRNGKey(1), method="initial_state")["params"]
    params = {k: (v * 1e-2 if k in ("E", "F") else v) for k, v in params.items()}
    m = model.bind({"params": params})
    Lambda_bar, B_bar, C = m.discrete_system()
    E = ssm.as_complex(params["E"])
    if name == "aux":
        y = apply_ssm_aux(Lambda_bar, B_bar, C, E, ssm_ex.time_scale(L, kw["time_scale_type"]), u, True, True)
    else:
        y = apply_ssm_extend(Lambda_bar, B_bar, C, E, ssm.as_complex(params["F"]), m.delta(L), u, True,
                                    True, kw["mode"])
    assert rel_err(jax.jit(model.apply)({"params": params}, u), np.asarray(y + params["D"] * u)) < 1e-5


BOUNDED_CASES = [(n, k, 1e3) for n, k in EXT_CORE[:1] + EXT_CORE[2:4]] + [
    ("extend", dict(mode="full", delta_type="learned"), 10.0),  # the spectral guard at 10× the initial scale
] + [pytest.param(*case, marks=pytest.mark.slow) for case in [(n, k, 1e3) for n, k in EXT_CORE[1:2] + EXT_CORE[4:] +
                                                                  EXT_MORE if k.get("guard") != "none"] + [
    ("extend", dict(mode="full", delta_type="learned", guard_growth=1.0), 10.0),  # ... with no growth allowed
    ("extend", dict(mode="full", delta_type="legendre"), 10.0),
    ("extend", dict(mode="full", delta_type="fourier"), 1e3),
]]


@pytest.mark.parametrize("name,kw,scale", BOUNDED_CASES)
def test_module_stays_bounded_over_16k_steps_with_extreme_parameters(name, kw, scale):
    """Path-X's length with the extension's parameters at `scale` × their initial size and an unstable base
    eigenvalue: the guarded module's output stays within the bound of non-expanding transitions (diagonal clamps
    and the rows guard: ‖x_t‖_∞ ≤ Σ_{s≤t} ‖B̄ u_s‖_∞, exactly; the spectral guard: ‖x_t‖₂ ≤ Σ_{s≤t} ‖B̄ u_s‖₂, up to
    its power iteration's error, so at most twice that bound; both times guard_growth, the growth a sequence is
    allowed), while the same parameters unguarded explode."""
    L, H, P = 16384, 2, 8
    u = jax.random.normal(jax.random.PRNGKey(0), (L, H))
    model = make_module(name, H, P, l_max=L, **kw)
    params = dict(model.init(jax.random.PRNGKey(1), method="initial_state")["params"])
    params["Lambda_re"] = params["Lambda_re"].at[0].set(0.5)  # an unstable base eigenvalue too
    for k in ("E", "F", "delta_table", "delta_amp", "delta_weights"):
        if k in params:
            params[k] = params[k] * scale
    m = model.bind({"params": params})
    Lambda_bar, B_bar, C = m.discrete_system()
    y = np.asarray(jax.jit(model.apply)({"params": params}, u))
    assert np.all(np.isfinite(y))
    Bu = np.abs(np.asarray(u, np.float64) @ np.asarray(B_bar, np.complex128).T)
    C_abs = np.abs(np.asarray(C, np.complex128))
    if name == "extend" and kw["mode"] == "full" and kw.get("guard", "spectral") == "spectral":
        x_bound, C_norm, slack = np.cumsum(np.linalg.norm(Bu, axis=1)), np.linalg.norm(C_abs, axis=1), 2.0
    else:
        x_bound, C_norm, slack = np.cumsum(Bu.max(axis=1)), C_abs.sum(axis=1), 1 + 1e-4
    full_spectral = name == "extend" and kw["mode"] == "full" and kw.get("guard", "spectral") == "spectral"
    growth = kw.get("guard_growth", ssm_ex.GUARD_GROWTH) if full_spectral else 1.0
    y_bound = 2 * C_norm[None, :] * x_bound[:, None] * growth + np.abs(np.asarray(params["D"] * u))
    assert np.all(np.abs(y) <= y_bound * slack + 1e-4)
    # ... and the same parameters without the guard do explode: the test exercises the guard.
    y_raw = np.asarray(jax.jit(make_module(name, H, P, l_max=L, **{**kw, "guard": "none"}).apply)(
        {"params": params}, u))
    assert not np.all(np.isfinite(y_raw)) or np.max(np.abs(y_raw)) > 1e6 * np.max(np.abs(y))


def test_learned_delta_table_too_short_is_a_clear_error():
    model = ssm_ex.S5SSMExtend(H=2, P=4, R=2, delta_type="learned", l_max=100)
    with pytest.raises(ValueError, match=r"sequence length 101 .*l_max=100"):
        jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((101, 2)))


@pytest.mark.parametrize("field,value", [("R", 0), ("mode", "dense"), ("delta_type", "random")])
def test_extend_module_rejects_bad_options(field, value):
    with pytest.raises(ValueError, match=field if field != "mode" else "mode"):
        ssm_ex.S5SSMExtend(H=2, P=4, **{field: value}).init(jax.random.PRNGKey(0), jnp.zeros((3, 2)))


@pytest.mark.parametrize("name,kw,bidirectional", [(n, k, True) for n, k in EXT_CORE[:4]] + [
    pytest.param(*case, marks=pytest.mark.slow) for case in [(n, k, True) for n, k in EXT_CORE[4:] + EXT_MORE] +
    [(n, k, False) for n, k in EXT_CORE[1:3]]])
def test_warm_start_computes_the_s5_function(name, kw, bidirectional):
    L, H, P = 40, 3, 8
    u = jax.random.normal(jax.random.PRNGKey(0), (L, H))
    s5 = ssm.S5SSM(H=H, P=P, bidirectional=bidirectional)
    s5_params = s5.init(jax.random.PRNGKey(1), method="initial_state")["params"]
    ext = make_module(name, H, P, l_max=L, bidirectional=bidirectional, **kw)
    ext_params = ssm_ex.warm_start(s5_params, ext.init(jax.random.PRNGKey(2), method="initial_state")["params"])
    y_s5 = np.asarray(jax.jit(s5.apply)({"params": s5_params}, u))
    np.testing.assert_allclose(jax.jit(ext.apply)({"params": ext_params}, u), y_s5, rtol=0,
                               atol=1e-6 * np.abs(y_s5).max())
    # the extension is live: its gradient is finite and non-zero, so fine-tuning can move it
    g = jax.jit(jax.grad(lambda p: jnp.sum(ext.apply({"params": p}, u) ** 2)))(ext_params)
    for k, v in g.items():
        assert np.all(np.isfinite(np.asarray(v))), f"non-finite gradient for {k} at the warm start"
    assert float(jnp.max(jnp.abs(g["E"]))) > 0


def test_warm_start_rejects_mismatched_sizes():
    s5_params = ssm.S5SSM(H=3, P=8).init(jax.random.PRNGKey(0), method="initial_state")["params"]
    ext_params = ssm_ex.S5SSMAux(H=3, P=4).init(jax.random.PRNGKey(0), method="initial_state")["params"]
    with pytest.raises(ValueError, match="shape"):
        ssm_ex.warm_start(s5_params, ext_params)


# --------------------------------------------------------------------------------------------------
# Another sampling rate: step_rescale
# --------------------------------------------------------------------------------------------------


def rate_errors(make, L=1200, H=2, seed=0):
    """(error at rate 2 with the steps doubled, error at rate 2 without) against the rate-1 output taken every
    second step, relative to that output, for a smooth input."""
    t = np.arange(L)
    u = jnp.asarray(np.stack([np.sin(2 * np.pi * t / 300), np.cos(2 * np.pi * t / 460 + 0.4)], 1)[:, :H],
                    jnp.float32)
    layer1, layer2 = make(1.0), make(2.0)
    params = layer1.init(jax.random.PRNGKey(seed), method="initial_state")
    y1 = np.asarray(jax.jit(layer1.apply)(params, u))[::2]
    y2 = np.asarray(jax.jit(layer2.apply)(params, u[::2]))
    y_plain = np.asarray(jax.jit(layer1.apply)(params, u[::2]))
    scale = np.max(np.abs(y1))
    return np.max(np.abs(y2 - y1)) / scale, np.max(np.abs(y_plain - y1)) / scale


@pytest.mark.parametrize("name", ["s5", "s4", "s4d", "dss"])
def test_step_rescale_keeps_the_continuous_system(name):
    """At rate 2 (input u[::2], steps × 2) the layer's output is close to its rate-1 output every second step,
    and much closer than without the step change: the continuous-time system is kept."""
    import s4

    steps = dict(H=2, P=8, dt_min=0.005, dt_max=0.05)  # a signal smooth on the scale of the steps
    make = {"s5": lambda k: ssm.S5SSM(**steps, step_rescale=k), "s4": lambda k: s4.S4SSM(**steps, step_rescale=k),
            "s4d": lambda k: s4.S4DSSM(**steps, step_rescale=k),
            "dss": lambda k: s4.DSSSSM(**steps, step_rescale=k)}[name]
    rescaled, plain = rate_errors(make)
    print(f"{name}: relative error at rate 2 {rescaled:.4f} with the step change, {plain:.4f} without")
    assert rescaled < 0.1 and rescaled < plain / 5


@pytest.mark.parametrize("name,kw", EXT_MODULES)
def test_extensions_at_another_rate_reduce_to_s5_with_zero_E(name, kw):
    """The extensions' rate-k definition (schedule at k·t, every k-th δ entry) with E = 0 is S5 at rate k."""
    L, H, P = 30, 3, 8
    u = jax.random.normal(jax.random.PRNGKey(0), (L, H))
    s5 = ssm.S5SSM(H=H, P=P, step_rescale=2.0)
    ext = make_module(name, H, P, l_max=2 * L, step_rescale=2.0, **kw)
    s5_params = s5.init(jax.random.PRNGKey(1), method="initial_state")["params"]
    ext_params = ssm_ex.warm_start(s5_params, ext.init(jax.random.PRNGKey(2), method="initial_state")["params"])
    np.testing.assert_allclose(jax.jit(ext.apply)({"params": ext_params}, u),
                               jax.jit(s5.apply)({"params": s5_params}, u), rtol=1e-5, atol=1e-5)


def test_extension_time_terms_are_read_at_physical_time():
    model = ssm_ex.S5SSMExtend(H=2, P=4, R=2, l_max=20, delta_type="learned", step_rescale=2.0)
    p = model.init(jax.random.PRNGKey(0), method="initial_state")["params"]
    table = np.asarray(p["delta_table"])
    np.testing.assert_array_equal(model.apply({"params": p}, 10, method="delta"), table[0:19:2])
    with pytest.raises(ValueError, match="l_max=20"):
        model.apply({"params": p}, 11, method="delta")
    sched = ssm_ex.S5SSMExtend(H=2, P=4, R=2, delta_type="sinusoidal", step_rescale=3.0)
    q = sched.init(jax.random.PRNGKey(0), method="initial_state")["params"]
    t = np.arange(7)
    np.testing.assert_allclose(sched.apply({"params": q}, 7, method="delta")[:, 0],
                               (1 + 0.1 * np.sin(0.1 * 3 * t)) * np.asarray(q["delta_amp"])[0], rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# The spectral guard's estimate of ‖A_t‖₂, and the δ basis
# --------------------------------------------------------------------------------------------------


def random_lowrank(rng, L, P, R, scale):
    return stable_diag(rng, P, 0.9, 0.9995), crandn(rng, P, R, scale=scale), crandn(rng, R, P, scale=scale), \
        rng.normal(size=(L, R))


@pytest.mark.parametrize("scale", [0.05, 0.3, 3.0])
def test_spectral_norms_approach_the_largest_singular_value_from_below(scale):
    """Against numpy's float64 SVD of every dense A_t: never above it (a power iteration's Rayleigh quotient), and
    as close as spectral_norms' docstring says: within 3 % where the top singular values cluster (scale 0.05: the
    correction is small and many states decay alike), 0.3 % at scale 0.3, 1e-5 where the correction dominates."""
    L, P, R = 50, 16, 4
    a, E, F, d = random_lowrank(np.random.default_rng(int(scale * 100)), L, P, R, scale)
    sigma = np.asarray(jax.jit(ssm_ex.spectral_norms)(c64(a), c64(E), c64(F), jnp.asarray(d, jnp.float32)))
    true = np.linalg.svd(np.diag(a)[None] + np.einsum("pr,lr,rq->lpq", E, d, F), compute_uv=False)[:, 0]
    assert np.all(sigma <= true * (1 + 1e-5))
    assert np.max((true - sigma) / true) < {0.05: 3e-2, 0.3: 3e-3, 3.0: 1e-5}[scale]


def test_spectral_guard_is_the_identity_inside_the_bound():
    """E = 0 and |Λ̄| < 1: the guarded transition is Λ̄ itself (a warm start computes S5's function exactly)."""
    rng = np.random.default_rng(0)
    a, E, F, d = random_lowrank(rng, 20, 8, 3, 1.0)
    out, s, scale = ssm_ex.guard_full(c64(a), c64(0 * E), c64(F), jnp.asarray(d, jnp.float32), "spectral")
    assert np.array_equal(np.asarray(out), np.broadcast_to(np.asarray(c64(a)), (20, 8)))
    assert np.all(np.asarray(s) == 1.0) and np.all(np.asarray(scale) == 1.0)


@pytest.mark.parametrize("kind", ssm_ex.DELTA_BASES)
@pytest.mark.parametrize("L,K", [(1, 1), (7, 3), (100, 12), (64, 9)])
def test_delta_basis_equals_its_closed_form(kind, L, K):
    """Legendre polynomials from numpy.polynomial (not the three-term recurrence under test), sines and cosines
    written out; every function has mean square 1 on a fine grid."""
    phi = ssm_ex.delta_basis(L, kind, K)
    tau = np.arange(L) / L
    if kind == "legendre":
        legendre = np.polynomial.legendre.Legendre.basis
        ref = np.stack([np.sqrt(2 * k + 1) * legendre(k)(2 * tau - 1) for k in range(K)], 1)
    else:
        cols = [np.ones(L)] + [f(2 * np.pi * (k // 2 + 1) * tau) * np.sqrt(2) for k, f in
                               zip(range(K - 1), itertools.cycle([np.cos, np.sin]))]
        ref = np.stack(cols, 1)
    np.testing.assert_allclose(phi, ref, atol=1e-5 * max(1, np.abs(ref).max()))
    fine = ssm_ex.delta_basis(20000, kind, K).astype(np.float64)
    np.testing.assert_allclose((fine ** 2).mean(0), 1.0, rtol=2e-3)


@pytest.mark.parametrize("kind", ssm_ex.DELTA_BASES)
def test_basis_delta_has_k_by_r_parameters_and_runs_at_twice_the_length(kind):
    """A layer built for l_max = L (a dataset of length L) with the basis δ: K × R parameters for δ, whatever L;
    at 2L it runs, its recurrent mode equals its parallel mode, and its δ is the same function of t/L."""
    L, H, P, R, K = 24, 2, 8, 3, 5
    model = ssm_ex.S5SSMExtend(H=H, P=P, R=R, l_max=L, delta_type=kind, basis_size=K)
    params = model.init(jax.random.PRNGKey(0), method="initial_state")["params"]
    assert params["delta_weights"].shape == (K, R) and "delta_table" not in params
    u = jax.random.normal(jax.random.PRNGKey(1), (2 * L, H))
    y = np.asarray(jax.jit(model.apply)({"params": params}, u))
    x = model.apply({"params": params}, method="initial_state")
    step = jax.jit(lambda x, u_t, t: model.apply({"params": params}, x, u_t, t, 2 * L, method="step"))
    for t in range(2 * L):
        x, y_t = step(x, u[t], t)
        assert rel_err(y_t, y[t]) < 1e-5, f"step {t}"
    m = model.bind({"params": params})
    np.testing.assert_allclose(np.asarray(m.delta(2 * L))[::2], np.asarray(m.delta(L)), atol=1e-6)
