"""focal_jax under every JAX transform, with traced hyperparameters, and gradients for every floating input.

Gradients are checked against central finite differences of the float64 reference value
(``focal_spec.reference``), computed here in float64 with a relative step of 1e-6, and against JAX's own
finite differences (``jax.test_util.check_grads``, orders 1 and 2) under a scoped x64.
"""

from __future__ import annotations

import numpy as np
import pytest

from focal_spec import reference
from parity_tests import _harness as H

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
import focal_jax  # noqa: E402


def _close(actual, expected, **tol):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), **tol)


def _fd(f, theta, step=1e-6, side=None):
    """Finite-difference gradient of the scalar f at theta (float64): central with a relative step, or
    one-sided and of second order with an absolute step where ``side`` is +1 (forward) or -1 (backward)."""
    theta = np.array(theta, np.float64)
    side = np.zeros(theta.shape) if side is None else np.broadcast_to(side, theta.shape)
    grad = np.zeros(theta.shape)
    for idx in np.ndindex(*theta.shape):
        h = step * max(1.0, abs(theta[idx])) if side[idx] == 0 else step

        def at(k, idx=idx, h=h):
            t = theta.copy()
            t[idx] += k * h
            return float(f(t))

        s = side[idx]
        if s == 0:
            grad[idx] = (at(1) - at(-1)) / (2 * h)
        else:
            grad[idx] = (-3 * at(0) + 4 * at(s) - at(2 * s)) / (2 * s * h)
    return grad


# ----------------------------------------------------------------------------------------
# B4. Gradients for every floating input, against the float64 reference.
# ----------------------------------------------------------------------------------------


def _sigmoid_setup(rng):
    x = rng.normal(scale=2.5, size=(4, 3))
    return {
        "logits": x,
        "targets": rng.uniform(0.05, 0.95, size=(4, 3)),
        "gamma": np.array(1.7),
        "alpha": rng.uniform(0.1, 0.9, size=3),
        "weight": rng.uniform(0.5, 2.0, size=(4, 3)),
        "pos_weight": rng.uniform(0.5, 3.0, size=3),
        "label_smoothing": np.array(0.1),
    }


SIGMOID_INPUTS = ["logits", "targets", "gamma", "gamma-per-class", "gamma-zero", "alpha", "weight", "pos_weight",
                  "label_smoothing"]


def _sigmoid_case(name):
    rng = np.random.default_rng(11)
    args = _sigmoid_setup(rng)
    if name == "gamma-per-class":
        args["gamma"] = np.array([0.0, 0.5, 3.0])
    if name == "gamma-zero":
        args["gamma"] = np.array(0.0)
    wrt = name.split("-")[0]
    return args, wrt


def _sigmoid_objective(r, mask):
    def jax_fn(**args):
        x, t = args.pop("logits"), args.pop("targets")
        return jnp.sum(r * focal_jax.sigmoid_focal_loss(x, t, where=mask, reduction="none", **args))

    def ref_fn(**args):
        x, t = args.pop("logits"), args.pop("targets")
        return np.sum(r * reference.sigmoid_focal_loss(x, t, where=mask, reduction="none", **args)[0])

    return jax_fn, ref_fn


@pytest.mark.parametrize("name", SIGMOID_INPUTS)
def test_sigmoid_gradient_of_every_input_matches_the_reference(name, x64):
    args, wrt = _sigmoid_case(name)
    rng = np.random.default_rng(12)
    r = rng.normal(size=(4, 3))  # a random cotangent: elementwise errors cannot cancel in a sum
    mask = rng.uniform(size=(4, 3)) < 0.8
    jax_fn, ref_fn = _sigmoid_objective(r, mask)
    others = {k: v for k, v in args.items() if k != wrt}
    ours = jax.grad(lambda v: jax_fn(**others, **{wrt: v}))(jnp.asarray(args[wrt]))
    # γ = 0 is the edge of the reference's domain: a forward difference there
    fd = _fd(lambda v: ref_fn(**others, **{wrt: v}), args[wrt], side=np.where(args[wrt] == 0, 1, 0))
    np.testing.assert_allclose(np.asarray(ours), fd, rtol=1e-6, atol=1e-8)
    assert ours.shape == np.shape(args[wrt])
    if wrt != "logits":
        assert np.abs(np.asarray(ours)).max() > 0  # never silently zero


SIGMOID_FAST = ("targets", "gamma-per-class")


@pytest.mark.parametrize("name", [n if n in SIGMOID_FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in SIGMOID_INPUTS])
def test_sigmoid_check_grads_orders_1_and_2(name, x64):
    from jax.test_util import check_grads

    args, wrt = _sigmoid_case(name)
    r = np.random.default_rng(13).normal(size=(4, 3))
    jax_fn, _ = _sigmoid_objective(r, None)
    others = {k: v for k, v in args.items() if k != wrt}
    # jit: the differences step γ below 0, which a concrete gamma would (rightly) reject
    check_grads(jax.jit(lambda v: jax_fn(**others, **{wrt: v})), (jnp.asarray(args[wrt]),), order=2,
                modes=("fwd", "rev"))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 2.5])
def test_sigmoid_gradient_wrt_hard_targets(gamma, x64):
    """At t = 0 or 1 the central difference leaves [0, 1]: one-sided differences of each element's loss,
    pointing inward, with a step small against 1-p_t (the loss curves on that scale when γ < 1)."""
    rng = np.random.default_rng(14)
    x = rng.normal(scale=3.0, size=(3, 4))
    t = (rng.uniform(size=(3, 4)) < 0.5).astype(np.float64)
    kw = {"gamma": gamma, "alpha": 0.3, "reduction": "none"}
    ours = np.asarray(jax.grad(lambda tt: jnp.sum(focal_jax.sigmoid_focal_loss(x, tt, **kw)))(jnp.asarray(t)))
    q = np.where(t == 1, 1 / (1 + np.exp(x)), 1 / (1 + np.exp(-x)))  # 1 - p_t
    for i in np.ndindex(*t.shape):
        def elem(ti, i=i):
            tt = t.copy()
            tt[i] = ti[()]
            return reference.sigmoid_focal_loss(x, tt, **kw)[0][i]

        fd = _fd(elem, t[i], step=1e-4 * min(q[i], 1.0), side=-1 if t[i] == 1 else 1)
        np.testing.assert_allclose(ours[i], fd, rtol=1e-6, atol=1e-12, err_msg=str(i))


def _softmax_setup(rng, labels):
    x = rng.normal(scale=2.0, size=(4, 5))
    if labels == "index":
        y = np.array([0, 3, 4, 1])
    else:
        y = rng.dirichlet(np.ones(5), size=4)
    return x, y, {"gamma": np.array(1.6), "weight": rng.uniform(0.5, 2.0, size=5), "label_smoothing": np.array(0.1)}


SOFTMAX_INPUTS = [
    ("logits", "index"), ("logits", "probs"), ("labels", "probs"), ("weight", "index"), ("weight", "probs"),
    ("gamma", "index"), ("gamma", "probs"), ("gamma-per-class", "index"), ("gamma-per-class", "probs"),
    ("gamma-per-class-no-smoothing", "index"), ("label_smoothing", "index"), ("label_smoothing", "probs"),
]


def _softmax_case(name, labels, reduction):
    rng = np.random.default_rng(21)
    x, y, opts = _softmax_setup(rng, labels)
    if name.startswith("gamma-per-class"):
        opts["gamma"] = np.array([0.0, 0.5, 1.0, 2.5, 4.0])
    if name.endswith("no-smoothing"):
        opts["label_smoothing"] = np.array(0.0)
    where = np.array([True, True, False, True])
    r = rng.normal(size=4) if reduction == "none" else 1.0

    def jax_fn(xx, yy, **kw):
        return jnp.sum(r * focal_jax.softmax_focal_loss(xx, yy, where=where, reduction=reduction, **kw))

    def ref_fn(xx, yy, **kw):
        return np.sum(r * reference.softmax_focal_loss(xx, yy, where=where, reduction=reduction, **kw)[0])

    return x, y, opts, name.split("-")[0], jax_fn, ref_fn


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("name,labels", SOFTMAX_INPUTS, ids=[f"{n}-{lab}" for n, lab in SOFTMAX_INPUTS])
def test_softmax_gradient_of_every_input_matches_the_reference(name, labels, reduction, x64):
    x, y, opts, wrt, jax_fn, ref_fn = _softmax_case(name, labels, reduction)
    if wrt == "logits":
        ours = jax.grad(lambda v: jax_fn(v, y, **opts))(jnp.asarray(x))
        fd = _fd(lambda v: ref_fn(v, y, **opts), x)
    elif wrt == "labels":
        ours = jax.grad(lambda v: jax_fn(x, v, **opts))(jnp.asarray(y))
        fd = _fd(lambda v: ref_fn(x, v, **opts), y)
    else:
        others = {k: v for k, v in opts.items() if k != wrt}
        ours = jax.grad(lambda v: jax_fn(x, y, **others, **{wrt: v}))(jnp.asarray(opts[wrt]))
        fd = _fd(lambda v: ref_fn(x, y, **others, **{wrt: v}), opts[wrt], side=np.where(opts[wrt] == 0, 1, 0))
    np.testing.assert_allclose(np.asarray(ours), fd, rtol=1e-6, atol=1e-8)
    assert np.abs(np.asarray(ours)).max() > 0


SOFTMAX_FAST = (("labels", "probs"), ("gamma-per-class", "index"))


@pytest.mark.parametrize("name,labels", [pytest.param(n, lab, id=f"{n}-{lab}", marks=() if (n, lab) in SOFTMAX_FAST
                                                      else pytest.mark.slow) for n, lab in SOFTMAX_INPUTS])
def test_softmax_check_grads_orders_1_and_2(name, labels, x64):
    from jax.test_util import check_grads

    x, y, opts, wrt, jax_fn, _ = _softmax_case(name, labels, "mean")
    if wrt == "logits":
        f, arg = (lambda v: jax_fn(v, y, **opts)), x
    elif wrt == "labels":
        f, arg = (lambda v: jax_fn(x, v, **opts)), y
    else:
        others = {k: v for k, v in opts.items() if k != wrt}
        f, arg = (lambda v: jax_fn(x, y, **others, **{wrt: v})), opts[wrt]
    check_grads(jax.jit(f), (jnp.asarray(arg),), order=2, modes=("fwd", "rev"))


# ----------------------------------------------------------------------------------------
# B5. A drop-in for optax.sigmoid_focal_loss, in value and gradient, with traced alpha and gamma.
# ----------------------------------------------------------------------------------------


def _sigmoid_t_terms(x, tp, a, g):
    """Elementwise, float64: the modulator's condition number K and the magnitudes of the terms of
    dℓ/dt' for ℓ = α_t (1-p_t)^γ ce at the target t' (α_t = α t' + (1-α)(1-t'), 1-p_t = t'σ(-x) + (1-t')σ(x))."""
    lp, ln = -np.logaddexp(0.0, -x), -np.logaddexp(0.0, x)
    s, sn = np.exp(lp), np.exp(ln)
    ce = -(tp * lp + (1.0 - tp) * ln)
    q = tp * sn + (1.0 - tp) * s
    m = q ** g
    at = a * tp + (1.0 - a) * (1.0 - tp)
    k = H.modulator_condition(np.broadcast_to(g, x.shape), np.log(q))
    with np.errstate(divide="ignore", invalid="ignore"):
        dm = np.where(g == 0, 0.0, g * q ** (g - 1.0))
    d_tp = np.abs(2 * a - 1) * m * ce + at * dm * np.abs(sn - s) * ce + at * m * np.abs(x)
    return k, d_tp, at, m, ce, q


@pytest.mark.parametrize("targets", ["soft", "hard"])
@pytest.mark.parametrize("alpha", ["scalar", "per_class"])
def test_sigmoid_equals_optax_sigmoid_focal_loss(targets, alpha, x64):
    """Ours in float32 meets the precision contract against the reference; in float64 it equals optax's
    formula in value and in the gradients for the logits and the targets, relative to the magnitudes of
    their terms (optax forms 1 - p_t by subtraction, so float32 would compare its rounding, not its formula)."""
    import inspect

    import optax

    assert {"alpha", "gamma"} <= set(inspect.signature(optax.sigmoid_focal_loss).parameters)
    rng = np.random.default_rng(31)
    x = rng.normal(scale=3.0, size=(6, 4)).astype(np.float32).astype(np.float64)
    t = rng.uniform(size=(6, 4)) if targets == "soft" else (rng.uniform(size=(6, 4)) < 0.4).astype(np.float64)
    t = t.astype(np.float32).astype(np.float64)
    a = np.float32(0.3) if alpha == "scalar" else rng.uniform(0.1, 0.9, size=4).astype(np.float32)
    a = np.asarray(a, np.float64)
    r = rng.normal(size=(6, 4))

    def ours(xx, tt, aa, gg):
        return focal_jax.sigmoid_focal_loss(xx, tt, alpha=aa, gamma=gg, reduction="none")

    def theirs(xx, tt, aa, gg):
        return optax.sigmoid_focal_loss(xx, tt, alpha=aa, gamma=gg)

    for fn in (ours, theirs):
        fn.value = jax.jit(fn)
        fn.grad = jax.jit(jax.grad(lambda xx, tt, aa, gg, fn=fn: jnp.sum(r * fn(xx, tt, aa, gg)), argnums=(0, 1)))
    per_class = ("alpha",) if a.ndim else ()
    for g in (0.0, 0.5, 2.0, 3.5):
        want = H.expected("sigmoid", H.Inputs(x, t, {"gamma": g, "alpha": a, "reduction": "none"}, "float32",
                                              per_class))
        f32 = [jnp.asarray(v, jnp.float32) for v in (x, t, a, g)]
        value = ours.value(*f32)
        grad = jax.grad(lambda xx, f32=f32: jnp.sum(ours(xx, *f32[1:])))(f32[0])
        want.check(value, grad, "float32", f"γ={g}")
        args = [jnp.asarray(v, jnp.float64) for v in (x, t, a, g)]
        (mine_x, mine_t), (other_x, other_t) = ours.grad(*args), theirs.grad(*args)
        H.assert_close(ours.value(*args), theirs.value(*args), "float64", f"γ={g} value vs optax",
                       scale=1e3 * want.value_scale)
        H.assert_close(mine_x, other_x, "float64", f"γ={g} dℓ/dx vs optax", scale=1e3 * np.abs(r) * want.grad_scale)
        if targets == "soft":  # see the next test for labels of exactly 0 or 1
            k, d_tp = _sigmoid_t_terms(x, t, a, g)[:2]
            H.assert_close(mine_t, other_t, "float64", f"γ={g} dℓ/dt vs optax", scale=1e3 * np.abs(r) * k * d_tp)


def test_label_gradient_at_hard_labels_matches_optax_differences(x64):
    """At labels of exactly 0 or 1, optax's autodiff drops the term of logsumexp whose weight b is 0, so its
    label gradient there is not the derivative of its own value; ours is (and equals optax's differences)."""
    import optax

    x = jnp.asarray([2.0, -1.0, 0.5, -3.0])
    t = jnp.asarray([1.0, 0.0, 1.0, 0.0])
    ours = jax.grad(lambda tt: jnp.sum(focal_jax.sigmoid_focal_loss(x, tt, alpha=0.25, reduction="none")))(t)
    fd = _fd(lambda tt: float(jnp.sum(optax.sigmoid_focal_loss(x, jnp.asarray(tt), alpha=0.25))), np.asarray(t))
    np.testing.assert_allclose(np.asarray(ours), fd, rtol=1e-7)


# ----------------------------------------------------------------------------------------
# B1. Traced hyperparameters: one compilation for every value; vmap equals a loop.
# ----------------------------------------------------------------------------------------

RNG = np.random.default_rng(41)
XS = jnp.asarray(RNG.normal(scale=2.0, size=(8, 3)), jnp.float32)
TS = jnp.asarray(RNG.uniform(size=(8, 3)) < 0.3, jnp.float32)
XM = jnp.asarray(RNG.normal(scale=2.0, size=(8, 5)), jnp.float32)
YM = jnp.asarray(RNG.integers(0, 5, size=8), jnp.int32)


def _loss(kind, x, **kw):
    if kind == "sigmoid":
        return focal_jax.sigmoid_focal_loss(x, TS, **kw)
    return focal_jax.softmax_focal_loss(x, YM, **kw)


def _x(kind):
    return XS if kind == "sigmoid" else XM


def _held(v):
    """A hyperparameter as the float32 backend holds it, in float64."""
    return np.asarray(v, np.float32).astype(np.float64) if np.ndim(v) else float(np.float32(v))


def _expected(kind, x, **kw):
    """The float64 reference on the float32 inputs, with the contract's condition scales (``_harness``)."""
    kw = {k: _held(v) if k in ("gamma", "alpha", "label_smoothing", "weight") else v for k, v in kw.items()}
    per_class = tuple(k for k in ("alpha", "weight") if np.ndim(kw.get(k)) and kind == "sigmoid")
    labels = np.asarray(TS, np.float64) if kind == "sigmoid" else np.asarray(YM)
    return H.expected(kind, H.Inputs(np.asarray(x, np.float64), labels, kw, "float32", per_class))


def _check(kind, x, value, grad, what="", **kw):
    """``value`` and the logits gradient ``grad`` of a float32 call held to the precision contract."""
    _expected(kind, x, **kw).check(value, grad, "float32", what)


@pytest.mark.parametrize("option", ["gamma", "alpha", "label_smoothing"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_jit_with_a_traced_option_compiles_once(kind, option):
    if kind == "softmax" and option == "alpha":
        pytest.skip("the softmax loss has no alpha")
    traces = []

    @jax.jit
    def step(x, v):
        traces.append(1)
        return jax.value_and_grad(lambda z: _loss(kind, z, **{option: v}))(x)

    values = [0.0, 0.25, 1.0, 0.5] if option != "gamma" else [0.0, 0.5, 1.0, 2.0, 3.7]
    for v in values:
        got = step(_x(kind), jnp.asarray(v, jnp.float32))
        _check(kind, _x(kind), *got, f"{option}={v}", **{option: v})
    assert len(traces) == 1


@pytest.mark.parametrize("option", ["gamma", "label_smoothing"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_vmap_over_option_values_equals_separate_calls(kind, option):
    values = [0.0, 0.5, 1.0, 2.0, 3.5] if option == "gamma" else [0.0, 0.05, 0.1, 0.3, 1.0]
    one = jax.value_and_grad(lambda v, x: _loss(kind, x, **{option: v}), argnums=1)
    batched = jax.jit(jax.vmap(one, in_axes=(0, None)))(jnp.asarray(values, jnp.float32), _x(kind))
    separate = jax.jit(one)
    for i, v in enumerate(values):  # each against the reference: XLA may fuse the batched program differently
        _check(kind, _x(kind), *separate(jnp.asarray(v, jnp.float32), _x(kind)), f"{option}={v}", **{option: v})
        _check(kind, _x(kind), batched[0][i], batched[1][i], f"vmap {option}={v}", **{option: v})


# ----------------------------------------------------------------------------------------
# B2. gamma per class equals the per-class loop.
# ----------------------------------------------------------------------------------------

GAMMAS_C = np.array([0.0, 0.5, 2.0], np.float32)


@pytest.mark.parametrize("traced", [False, True], ids=["concrete", "traced"])
def test_sigmoid_gamma_per_class_equals_the_per_class_loop(traced):
    alpha = np.array([0.25, 0.5, 0.75], np.float32)

    def fn(x, g):
        return focal_jax.sigmoid_focal_loss(x, TS, gamma=g, alpha=alpha, reduction="none")

    call = jax.jit(fn) if traced else fn
    value = call(XS, GAMMAS_C)
    grad = jax.grad(lambda x: jnp.sum(call(x, GAMMAS_C)))(XS)
    loop_v, loop_g = np.zeros((8, 3)), np.zeros((8, 3))
    for c in range(3):
        per = lambda x, c=c: focal_jax.sigmoid_focal_loss(x, TS[:, c], gamma=float(GAMMAS_C[c]),  # noqa: E731
                                                           alpha=float(alpha[c]), reduction="none")
        loop_v[:, c], loop_g[:, c] = per(XS[:, c]), jax.grad(lambda x, per=per: jnp.sum(per(x)))(XS[:, c])
    want = _expected("sigmoid", XS, gamma=GAMMAS_C, alpha=alpha, reduction="none")
    want.check(value, grad, "float32", "per-class γ")
    want.check(loop_v, loop_g, "float32", "per-class loop")


GAMMAS_5 = np.array([0.0, 0.5, 1.0, 2.0, 3.5], np.float32)


@pytest.mark.parametrize("traced", [False, True], ids=["concrete", "traced"])
@pytest.mark.parametrize("labels", ["index", "probs"])
def test_softmax_gamma_per_class_equals_the_per_class_loop(labels, traced):
    w = jnp.asarray([1.0, 2.0, 0.5, 1.5, 1.0])
    q = jax.nn.softmax(jnp.asarray(np.random.default_rng(42).normal(size=(8, 5)), jnp.float32))
    y = YM if labels == "index" else q

    def fn(x, g):
        return focal_jax.softmax_focal_loss(x, y, gamma=g, weight=w, reduction="none")

    call = jax.jit(fn) if traced else fn
    value = call(XM, GAMMAS_5)
    grad = jax.grad(lambda x: jnp.sum(call(x, GAMMAS_5)))(XM)
    want_v, want_g = jnp.zeros(8), jnp.zeros((8, 5))
    for c in range(5):
        g = float(GAMMAS_5[c])
        if labels == "index":  # positions of class c take γ_c
            per = lambda x, g=g, c=c: jnp.where(YM == c, focal_jax.softmax_focal_loss(  # noqa: E731
                x, YM, gamma=g, weight=w, reduction="none"), 0.0)
        else:  # the loss is linear in q: class c's share of q takes γ_c
            per = lambda x, g=g, c=c: focal_jax.softmax_focal_loss(  # noqa: E731
                x, q * jax.nn.one_hot(c, 5), gamma=g, weight=w, reduction="none")
        want_v = want_v + per(XM)
        want_g = want_g + jax.grad(lambda x, per=per: jnp.sum(per(x)))(XM)
    held = H.Inputs(np.asarray(XM, np.float64), np.asarray(y, np.float64) if labels == "probs" else np.asarray(YM),
                    {"gamma": GAMMAS_5.astype(np.float64), "weight": np.asarray(w, np.float64), "reduction": "none"},
                    "float32")
    want = H.expected("softmax", held)
    want.check(value, grad, "float32", "per-class γ")
    want.check(want_v, want_g, "float32", "per-class loop")


# ----------------------------------------------------------------------------------------
# B3. A concrete whole-number gamma keeps the multiply-only path; a traced one is as safe.
# ----------------------------------------------------------------------------------------


def _primitives(jaxpr) -> set[str]:
    """Names of every primitive in a jaxpr, custom-derivative and nested calls included."""
    out = set()
    for eqn in jaxpr.eqns:
        out.add(eqn.primitive.name)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out |= _primitives(inner)
    return out


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_concrete_whole_gamma_keeps_the_fast_path(kind):
    def program(g):
        return jax.make_jaxpr(jax.value_and_grad(lambda x: _loss(kind, x, gamma=g)))(_x(kind))

    reference_program = program(2)
    for g in (2.0, np.float32(2.0), np.array(2.0), jnp.asarray(2.0)):
        assert str(program(g)) == str(reference_program), type(g)
    traced = jax.make_jaxpr(jax.value_and_grad(lambda x, g: _loss(kind, x, gamma=g)))(_x(kind), 2.0)
    assert str(traced) != str(reference_program)
    if kind == "sigmoid":  # log1p builds the cross-entropy; a log or pow would be the general path's
        assert not {"log", "pow"} & _primitives(reference_program.jaxpr)
        assert "log" in _primitives(traced.jaxpr)


SATURATED = np.array([-100.0, -50.0, -20.0, -1.0, 0.0, 1.0, 20.0, 50.0, 100.0], np.float32)


TRACED_GAMMAS = np.array([0.0, 0.25, 0.5, 1.0, 2.0, 2.5], np.float32)


@pytest.mark.parametrize("target", [0.0, 1.0, 0.3])
def test_traced_gamma_is_finite_at_saturated_logits(target):
    t = jnp.full(SATURATED.shape, target, jnp.float32)

    def everything(x, g):
        f = lambda z, gg: jnp.sum(focal_jax.sigmoid_focal_loss(z, t, gamma=gg, reduction="none"))  # noqa: E731
        return (f(x, g), jax.grad(f)(x, g), jax.hessian(f)(x, g), jax.grad(f, argnums=1)(x, g),
                jax.hessian(f, argnums=1)(x, g), jax.jacfwd(jax.grad(f), argnums=1)(x, g))

    outs = jax.jit(jax.vmap(everything, in_axes=(None, 0)))(jnp.asarray(SATURATED), jnp.asarray(TRACED_GAMMAS))
    for out in outs:
        assert np.isfinite(np.asarray(out)).all()
    for i, gamma in enumerate(TRACED_GAMMAS):
        ref_v, ref_g = reference.sigmoid_focal_loss(SATURATED, np.full(SATURATED.shape, target), gamma=gamma,
                                                    reduction="sum")
        _close(outs[0][i], ref_v, rtol=2e-5, atol=0)
        _close(outs[1][i], ref_g, rtol=2e-5, atol=1e-30)


@pytest.mark.parametrize("labels", ["index", "probs"])
def test_softmax_traced_gamma_is_finite_when_one_class_dominates(labels):
    x = np.zeros((3, 4), np.float32)
    x[0, 0], x[1, 2], x[2, :2] = 100.0, 100.0, 100.0
    y = jnp.asarray([0, 0, 1]) if labels == "index" else jnp.asarray(np.eye(4)[[0, 0, 1]] * 0.9 + 0.025, jnp.float32)

    def everything(xx, g):
        f = lambda z, gg: focal_jax.softmax_focal_loss(z, y, gamma=gg)  # noqa: E731
        return f(xx, g), jax.grad(f)(xx, g), jax.hessian(f)(xx, g), jax.grad(f, argnums=1)(xx, g)

    outs = jax.jit(jax.vmap(everything, in_axes=(None, 0)))(jnp.asarray(x), jnp.asarray(TRACED_GAMMAS))
    for out in outs:
        assert np.isfinite(np.asarray(out)).all()
    for i, gamma in enumerate(TRACED_GAMMAS):
        ref_v, _ = reference.softmax_focal_loss(x, np.asarray(y), gamma=gamma)
        _close(outs[0][i], ref_v, rtol=2e-5, atol=1e-30)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_traced_gamma_zero_gives_exactly_the_cross_entropy_gradient(kind):
    x = jnp.concatenate([_x(kind), jnp.full((1, _x(kind).shape[1]), 100.0)]).astype(jnp.float32)
    if kind == "sigmoid":
        t = jnp.concatenate([TS, jnp.ones((1, 3))])
        f = lambda z, g: focal_jax.sigmoid_focal_loss(z, t, gamma=g, reduction="sum")  # noqa: E731
    else:
        y = jnp.concatenate([YM, jnp.array([2])])
        f = lambda z, g: focal_jax.softmax_focal_loss(z, y, gamma=g, reduction="sum")  # noqa: E731
    traced = jax.jit(jax.grad(f))(x, jnp.asarray(0.0, jnp.float32))
    static = jax.jit(jax.grad(lambda z: f(z, 0.0)))(x)  # the multiply-only γ = 0 path: the cross-entropy's
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(static))
    assert np.isfinite(np.asarray(jax.grad(f, argnums=1)(x, jnp.asarray(0.0))))  # dℓ/dγ at 0^0 is finite


# ----------------------------------------------------------------------------------------
# B6. The transform table: jit, vmap, grad, jvp, hessian, checkpoint and scan with traced hyperparameters.
# ----------------------------------------------------------------------------------------


# The softmax class weights W + a V: a weight proportional to a would cancel out of the weighted mean (its
# sum divided by Σ w[y]), leaving dL/da identically 0 and nothing but rounding to compare.
W0 = np.array([1.0, 0.5, 1.5, 1.0, 2.0])
W1 = np.array([1.0, 0.0, 2.0, 0.0, 0.5])


def _hyper_loss(kind):
    if kind == "sigmoid":
        return lambda x, g, a, e: focal_jax.sigmoid_focal_loss(x, TS, gamma=g, alpha=a, label_smoothing=e)
    return lambda x, g, a, e: focal_jax.softmax_focal_loss(
        x, YM, gamma=g, label_smoothing=e, weight=jnp.asarray(W0, jnp.float32) + a * jnp.asarray(W1, jnp.float32))


def _hyper_kwargs(kind, g, a, e):
    if kind == "sigmoid":
        return {"gamma": g, "alpha": a, "label_smoothing": e}
    return {"gamma": g, "label_smoothing": e, "weight": W0 + a * W1}


def _hyper_terms(kind, x, g, a, e):
    """Per position, float64, for the float64 hyperparameters (γ, a, ε) = θ: the loss's numerator n_i, its
    share d_i of the mean's denominator, and the magnitudes of the terms of dn_i/dθ and dd_i/dθ, each
    dn_i/dθ's times the modulator's condition number (see ``_harness``)."""
    x = np.asarray(x, np.float64)
    kw = _hyper_kwargs(kind, g, a, e)
    if kind == "sigmoid":
        t = np.asarray(TS, np.float64)
        tp = t * (1.0 - e) + e / 2.0
        k, d_tp, at, m, ce, q = _sigmoid_t_terms(x, tp, a, g)
        dn = np.stack([at * m * ce * np.abs(np.log(q)), np.abs(2 * tp - 1) * m * ce, np.abs(0.5 - t) * d_tp])
        n = reference.sigmoid_focal_loss(x, t, reduction="none", **kw)[0]
        return n, np.ones(x.shape), k * dn, np.zeros((3,) + x.shape)
    y = np.asarray(YM)
    c = x.shape[-1]
    logp = x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
    log1mp = np.log1p(-np.exp(logp))
    f = np.exp(g * log1mp) * -logp  # (1-p_c)^γ (-log p_c)
    onehot = np.eye(c)[y]
    qc = (1.0 - e) * onehot + e / c
    w = kw["weight"]
    k = H.modulator_condition(np.full(x.shape, g), log1mp).max(-1)
    dn = np.stack([(w * qc * f * np.abs(log1mp)).sum(-1), (np.abs(W1) * qc * f).sum(-1),
                   (w * np.abs(1.0 / c - onehot) * f).sum(-1)])
    n = reference.softmax_focal_loss(x, y, reduction="none", **kw)[0]
    return n, w[y], k * dn, np.stack([np.zeros(y.shape), np.abs(W1[y]), np.zeros(y.shape)])


def _hyper_reference(kind, x, g, a, e):
    """The float64 reference for the float32 hyperparameters (γ, a, ε) = θ: the value and the logits gradient
    with the contract's scales (an ``Expected``), dL/dθ from central differences of the reference's mean in
    θ, and their scales, the terms of dL/dθ = Σ_i (dn_i/dθ - L dd_i/dθ) / D."""
    theta = np.array([_held(v) for v in (g, a, e)])
    want = _expected(kind, x, **_hyper_kwargs(kind, *theta))
    n, d, dn, dd = _hyper_terms(kind, x, *theta)
    big_d = d.sum()

    def mean(th):
        nn, dd_ = _hyper_terms(kind, x, *th)[:2]
        return nn.sum() / dd_.sum()

    def at(i, k, h):
        th = theta.copy()
        th[i] += k * h
        return mean(th)

    fd = np.zeros(3)
    for i in range(3):
        h = 1e-5 * max(1.0, abs(theta[i]))
        if theta[i] == 0:  # the edge of the domain (γ, ε >= 0): a forward difference of second order
            fd[i] = (-3 * at(i, 0, h) + 4 * at(i, 1, h) - at(i, 2, h)) / (2 * h)
        else:
            fd[i] = (at(i, 1, h) - at(i, -1, h)) / (2 * h)
    scale = (dn.reshape(3, -1).sum(1) + abs(n.sum() / big_d) * dd.reshape(3, -1).sum(1)) / big_d
    return want, fd, scale


def _hyper_check(kind, x, g, a, e, value, grads, what=""):
    """The value and the gradients for (x, γ, a, ε) (``grads``: the first 1 to 4 of them) of a float32 call
    held to the precision contract against ``_hyper_reference``."""
    want, fd, scale = _hyper_reference(kind, x, g, a, e)
    want.check(value, grads[0], "float32", what)
    for i, got in enumerate(grads[1:]):
        H.assert_close(got, fd[i], "float32", f"{what} dL/d{'γaε'[i]}", scale=scale[i])


HYPER = [(2.0, 0.25, 0.1), (0.5, 0.75, 0.0), (0.0, 0.5, 0.2)]


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_transform_jit_equals_eager(kind):
    f = _hyper_loss(kind)
    jitted = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
    for g, a, e in HYPER:
        eager = jax.value_and_grad(f, argnums=(0,))(_x(kind), g, a, e)
        got = jitted(_x(kind), *(jnp.asarray(v, jnp.float32) for v in (g, a, e)))
        _hyper_check(kind, _x(kind), g, a, e, *eager, what="eager")
        _hyper_check(kind, _x(kind), g, a, e, *got, what="jit")


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_transform_vmap_over_logits_and_hyperparameters(kind):
    f = _hyper_loss(kind)
    g, a, e = (jnp.asarray(v, jnp.float32) for v in zip(*HYPER, strict=True))
    xs = jnp.stack([_x(kind), _x(kind) * 0.5, -_x(kind)])
    values, grads = jax.vmap(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(xs, g, a, e)
    for i, (gi, ai, ei) in enumerate(HYPER):
        _hyper_check(kind, xs[i], gi, ai, ei, values[i], [d[i] for d in grads], what=f"vmap row {i}")


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_transform_jvp_equals_the_gradient_dot_the_tangent(kind):
    f = _hyper_loss(kind)
    rng = np.random.default_rng(43)
    primals = (_x(kind), jnp.asarray(1.5), jnp.asarray(0.3), jnp.asarray(0.1))
    tangents = (jnp.asarray(rng.normal(size=_x(kind).shape), jnp.float32), jnp.asarray(0.7), jnp.asarray(-0.4),
                jnp.asarray(0.2))
    value, directional = jax.jit(lambda p, t: jax.jvp(f, p, t))(primals, tangents)
    grads = jax.grad(f, argnums=(0, 1, 2, 3))(*primals)
    _hyper_check(kind, primals[0], 1.5, 0.3, 0.1, value, grads)
    # the directional derivative against the reference's, relative to the magnitudes of its terms
    want, fd, scale = _hyper_reference(kind, primals[0], 1.5, 0.3, 0.1)
    tx, th = np.asarray(tangents[0], np.float64), np.asarray(tangents[1:], np.float64)
    exact = np.sum(want.grad * tx) + fd @ th
    scale = np.sum(want.grad_scale * np.abs(tx)) + scale @ np.abs(th)
    H.assert_close(directional, exact, "float32", "directional derivative", scale=scale)
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_transform_hessian_matches_differences_of_the_reference_gradient(kind, x64):
    rng = np.random.default_rng(44)
    if kind == "sigmoid":
        x, t = rng.normal(scale=3.0, size=(5,)), rng.uniform(size=(5,))

        def ours(z, g):
            return focal_jax.sigmoid_focal_loss(z, t, gamma=g, alpha=0.3, reduction="sum")

        def ref_grad(z):
            return reference.sigmoid_focal_loss(z, t, gamma=1.5, alpha=0.3, reduction="sum")[1]
    else:
        x, y = rng.normal(scale=2.0, size=(2, 4)), np.array([1, 3])

        def ours(z, g):
            return focal_jax.softmax_focal_loss(z, y, gamma=g, label_smoothing=0.1, reduction="sum")

        def ref_grad(z):
            return reference.softmax_focal_loss(z, y, gamma=1.5, label_smoothing=0.1, reduction="sum")[1]
    hess = np.asarray(jax.jit(jax.hessian(ours))(jnp.asarray(x), jnp.asarray(1.5)))
    fd = np.stack([_fd(lambda z, i=i: ref_grad(z).ravel()[i], x) for i in range(x.size)]).reshape(hess.shape)
    np.testing.assert_allclose(hess, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_transform_checkpoint_equals_plain(kind):
    f = _hyper_loss(kind)
    args = (_x(kind), jnp.asarray(1.5), jnp.asarray(0.3), jnp.asarray(0.1))
    plain = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(*args)
    remat = jax.jit(jax.value_and_grad(jax.checkpoint(f), argnums=(0, 1, 2, 3)))(*args)
    # each against the reference: the two programs are fused differently, so they may differ by rounding
    _hyper_check(kind, args[0], 1.5, 0.3, 0.1, *plain, what="plain")
    _hyper_check(kind, args[0], 1.5, 0.3, 0.1, *remat, what="checkpoint")


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_transform_scan_over_a_gamma_schedule(kind):
    f = _hyper_loss(kind)
    schedule = [0.0, 0.5, 1.0, 2.0]

    def body(x, g):
        value, (dx, dg) = jax.value_and_grad(f, argnums=(0, 1))(x, g, 0.25, 0.05)
        return x - 0.1 * dx, (x, value, dx, dg)

    final, (xs, values, dxs, dgs) = jax.jit(lambda x: jax.lax.scan(body, x, jnp.asarray(schedule, jnp.float32)))(
        _x(kind))
    np.testing.assert_array_equal(np.asarray(xs[0]), np.asarray(_x(kind)))
    nxt = list(xs[1:]) + [final]
    for i, g in enumerate(schedule):  # each step at the point the scan reached, against the reference
        _hyper_check(kind, xs[i], g, 0.25, 0.05, values[i], (dxs[i], dgs[i]), what=f"step {i}")
        x64, dx64 = np.asarray(xs[i], np.float64), np.asarray(dxs[i], np.float64)
        H.assert_close(nxt[i], x64 - 0.1 * dx64, "float32", f"update {i}", scale=np.abs(x64) + 0.1 * np.abs(dx64))


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_jax_export_with_a_symbolic_batch_and_a_traced_gamma(kind):
    """``jax.export`` of a jitted loss with a symbolic batch size and γ as an argument: the exported program,
    called on a batch size it was not traced with, gives the float64 reference's loss."""
    from jax import export

    b = export.symbolic_shape("b")[0]
    rng = np.random.default_rng(3)
    if kind == "sigmoid":
        fn = jax.jit(lambda x, t, g: focal_jax.sigmoid_focal_loss(x, t, gamma=g, alpha=0.25))
        specs = (jax.ShapeDtypeStruct((b, 3), jnp.float32), jax.ShapeDtypeStruct((b, 3), jnp.float32))
        x = (rng.standard_normal((7, 3)) * 4).astype(np.float32)
        lab = rng.random((7, 3)).astype(np.float32)
        ref = reference.sigmoid_focal_loss(x.astype(np.float64), lab.astype(np.float64), gamma=1.5, alpha=0.25)[0]
    else:
        fn = jax.jit(lambda x, y, g: focal_jax.softmax_focal_loss(x, y, gamma=g))
        specs = (jax.ShapeDtypeStruct((b, 5), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32))
        x = (rng.standard_normal((7, 5)) * 4).astype(np.float32)
        lab = rng.integers(0, 5, 7).astype(np.int32)
        ref = reference.softmax_focal_loss(x.astype(np.float64), lab, gamma=1.5)[0]
    exported = export.export(fn)(*specs, jax.ShapeDtypeStruct((), jnp.float32))
    out = exported.call(jnp.asarray(x), jnp.asarray(lab), jnp.float32(1.5))
    _close(np.asarray(out), ref, rtol=2e-6)


@pytest.mark.parametrize("gamma", [0.5, 1.5, "traced"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_hessian_is_finite_where_one_minus_p_squared_underflows(gamma, dtype, request):
    """At a margin of 80 (float32) or 700 (float64), (1 - p_y)² underflows: the Hessian of the index-label
    kernel with a fractional γ stays finite for every label."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    big = 80.0 if dtype == "float32" else 700.0
    x = jnp.array([[big, -big, 0.0], [0.0, big, 3.0]], dtype=dtype)
    g = 0.75 if gamma == "traced" else gamma
    for lab in ([0, 1], [1, 0], [2, 2]):
        y = jnp.array(lab)
        if gamma == "traced":
            h = jax.jit(jax.hessian(lambda z, gg, y=y: focal_jax.softmax_focal_loss(z, y, gamma=gg)))(x, g)
        else:
            h = jax.hessian(lambda z, y=y: focal_jax.softmax_focal_loss(z, y, gamma=g))(x)
        assert bool(jnp.isfinite(h).all()), (lab, gamma, dtype)
