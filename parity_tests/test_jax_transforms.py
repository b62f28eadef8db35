"""focal_jax under every JAX transform, with traced hyperparameters, and gradients for every floating input.

Gradients are checked against central finite differences of the float64 reference value
(``focal_spec.reference``), computed here in float64 with a relative step of 1e-6, and against JAX's own
finite differences (``jax.test_util.check_grads``, orders 1 and 2) under a scoped x64.
"""

from __future__ import annotations

import numpy as np
import pytest

from focal_spec import reference

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
import focal_jax  # noqa: E402

F32 = {"rtol": 2e-5, "atol": 1e-6}


def _close(actual, expected, **tol):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), **(tol or F32))


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


@pytest.mark.parametrize("targets", ["soft", "hard"])
@pytest.mark.parametrize("alpha", ["scalar", "per_class"])
def test_sigmoid_equals_optax_sigmoid_focal_loss(targets, alpha):
    import inspect

    import optax

    assert {"alpha", "gamma"} <= set(inspect.signature(optax.sigmoid_focal_loss).parameters)
    rng = np.random.default_rng(31)
    x = jnp.asarray(rng.normal(scale=3.0, size=(6, 4)), jnp.float32)
    t = rng.uniform(size=(6, 4)) if targets == "soft" else (rng.uniform(size=(6, 4)) < 0.4)
    t = jnp.asarray(t, jnp.float32)
    a = jnp.asarray(0.3 if alpha == "scalar" else rng.uniform(0.1, 0.9, size=4), jnp.float32)
    r = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)

    def ours(xx, tt, aa, gg):
        return focal_jax.sigmoid_focal_loss(xx, tt, alpha=aa, gamma=gg, reduction="none")

    def theirs(xx, tt, aa, gg):
        return optax.sigmoid_focal_loss(xx, tt, alpha=aa, gamma=gg)

    for fn in (ours, theirs):
        fn.value = jax.jit(fn)
        fn.grad = jax.jit(jax.grad(lambda xx, tt, aa, gg, fn=fn: jnp.sum(r * fn(xx, tt, aa, gg)), argnums=(0, 1)))
    for g in (0.0, 0.5, 2.0, 3.5):
        gg = jnp.asarray(g, jnp.float32)
        _close(ours.value(x, t, a, gg), theirs.value(x, t, a, gg))
        (mine_x, mine_t), (other_x, other_t) = ours.grad(x, t, a, gg), theirs.grad(x, t, a, gg)
        _close(mine_x, other_x, rtol=2e-5, atol=2e-6)
        if targets == "soft":  # see the next test for labels of exactly 0 or 1
            _close(mine_t, other_t, rtol=2e-5, atol=2e-6)


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


def _reference(kind, x, **kw):
    x = np.asarray(x, np.float64)
    if kind == "sigmoid":
        return reference.sigmoid_focal_loss(x, np.asarray(TS, np.float64), **kw)
    return reference.softmax_focal_loss(x, np.asarray(YM), **kw)


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
        want = _reference(kind, _x(kind), **{option: v})
        _close(got[0], want[0])
        _close(got[1], want[1])
    assert len(traces) == 1


@pytest.mark.parametrize("option", ["gamma", "label_smoothing"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_vmap_over_option_values_equals_separate_calls(kind, option):
    values = [0.0, 0.5, 1.0, 2.0, 3.5] if option == "gamma" else [0.0, 0.05, 0.1, 0.3, 1.0]
    one = jax.value_and_grad(lambda v, x: _loss(kind, x, **{option: v}), argnums=1)
    batched = jax.jit(jax.vmap(one, in_axes=(0, None)))(jnp.asarray(values, jnp.float32), _x(kind))
    separate = jax.jit(one)
    for i, v in enumerate(values):
        value, grad = separate(jnp.asarray(v, jnp.float32), _x(kind))
        _close(batched[0][i], value)
        _close(batched[1][i], grad)
        want = _reference(kind, _x(kind), **{option: v})
        _close(value, want[0])
        _close(grad, want[1])


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
    for c in range(3):
        per = lambda x, c=c: focal_jax.sigmoid_focal_loss(x, TS[:, c], gamma=float(GAMMAS_C[c]),  # noqa: E731
                                                           alpha=float(alpha[c]), reduction="none")
        _close(value[:, c], per(XS[:, c]))
        _close(grad[:, c], jax.grad(lambda x, per=per: jnp.sum(per(x)))(XS[:, c]))


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
    _close(value, want_v)
    _close(grad, want_g)
    ref = reference.softmax_focal_loss(np.asarray(XM, np.float64), np.asarray(y, np.float64) if labels == "probs"
                                       else np.asarray(YM), gamma=GAMMAS_5, weight=np.asarray(w), reduction="none")
    _close(value, ref[0])


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


def _hyper_loss(kind):
    if kind == "sigmoid":
        return lambda x, g, a, e: focal_jax.sigmoid_focal_loss(x, TS, gamma=g, alpha=a, label_smoothing=e)
    return lambda x, g, a, e: focal_jax.softmax_focal_loss(x, YM, gamma=g, label_smoothing=e,
                                                           weight=jnp.full((5,), a))


HYPER = [(2.0, 0.25, 0.1), (0.5, 0.75, 0.0), (0.0, 0.5, 0.2)]


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_transform_jit_equals_eager(kind):
    f = _hyper_loss(kind)
    jitted = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
    for g, a, e in HYPER:
        eager = jax.value_and_grad(f, argnums=(0,))(_x(kind), g, a, e)
        got = jitted(_x(kind), *(jnp.asarray(v, jnp.float32) for v in (g, a, e)))
        _close(got[0], eager[0])
        _close(got[1][0], eager[1][0])


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_transform_vmap_over_logits_and_hyperparameters(kind):
    f = _hyper_loss(kind)
    g, a, e = (jnp.asarray(v, jnp.float32) for v in zip(*HYPER, strict=True))
    xs = jnp.stack([_x(kind), _x(kind) * 0.5, -_x(kind)])
    values = jax.vmap(f)(xs, g, a, e)
    for i, (gi, ai, ei) in enumerate(HYPER):
        _close(values[i], f(xs[i], gi, ai, ei))


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_transform_jvp_equals_the_gradient_dot_the_tangent(kind):
    f = _hyper_loss(kind)
    rng = np.random.default_rng(43)
    primals = (_x(kind), jnp.asarray(1.5), jnp.asarray(0.3), jnp.asarray(0.1))
    tangents = (jnp.asarray(rng.normal(size=_x(kind).shape), jnp.float32), jnp.asarray(0.7), jnp.asarray(-0.4),
                jnp.asarray(0.2))
    value, directional = jax.jit(lambda p, t: jax.jvp(f, p, t))(primals, tangents)
    grads = jax.grad(f, argnums=(0, 1, 2, 3))(*primals)
    _close(value, f(*primals))
    _close(directional, sum(jnp.sum(gr * tg) for gr, tg in zip(grads, tangents, strict=True)), rtol=1e-5, atol=1e-6)


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
    _close(remat[0], plain[0])
    for a, b in zip(remat[1], plain[1], strict=True):
        _close(a, b)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_transform_scan_over_a_gamma_schedule(kind):
    f = _hyper_loss(kind)
    schedule = jnp.asarray([0.0, 0.5, 1.0, 2.0], jnp.float32)

    def body(x, g):
        value, (dx, dg) = jax.value_and_grad(f, argnums=(0, 1))(x, g, 0.25, 0.05)
        return x - 0.1 * dx, (value, dg)

    final, (values, dgs) = jax.jit(lambda x: jax.lax.scan(body, x, schedule))(_x(kind))
    x = _x(kind)
    for i, g in enumerate([0.0, 0.5, 1.0, 2.0]):
        value, (dx, dg) = jax.value_and_grad(f, argnums=(0, 1))(x, g, 0.25, 0.05)
        _close(values[i], value)
        _close(dgs[i], dg)
        x = x - 0.1 * dx
    _close(final, x)


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
