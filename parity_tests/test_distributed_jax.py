"""JAX beyond one device: sharded jit equals unsharded, and ``axis_name=`` gives the exact global mean.

The checks run in a subprocess started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
so that the 8 CPU devices never leak into the other tests. The subprocess computes every check once
and prints one JSON object; each test below asserts one of its entries, so a failure names the check.
"""

from __future__ import annotations

import pytest

from parity_tests import _harness as H

SCRIPT = r'''
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import focal_jax

jax.config.update("jax_enable_x64", True)
N_DEV = len(jax.devices())
mesh = Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(0)
PER, C = 6, 5  # positions per device, classes
N = N_DEV * PER

x = rng.normal(scale=3.0, size=(N, C))
labels = rng.integers(0, C, size=N)
# Deliberately unequal numbers of ignored positions per device: device k ignores min(k, 5) of its 6
# positions, and their logits are garbage (NaN).
ignored = np.zeros(N, bool)
for k in range(N_DEV):
    ignored[k * PER:k * PER + min(k, PER - 1)] = True
labels = np.where(ignored, -100, labels)
x = np.where(ignored[:, None], np.nan, x)
targets = (rng.uniform(size=(N, C)) < 0.3).astype(np.float64)
mask = ~np.repeat(ignored[:, None], C, axis=1)  # the same unequal counts for the sigmoid loss
weight = rng.uniform(0.5, 2.0, size=C)

X, Y, T, M, W = (jnp.asarray(a) for a in (x, labels, targets, mask, weight))
results = {"devices": N_DEV}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def softmax(z, y, **kw):
    return focal_jax.softmax_focal_loss(z, y, gamma=0.5, weight=W, **kw)


def sigmoid(z, t, m, **kw):
    return focal_jax.sigmoid_focal_loss(z, t, gamma=2.0, alpha=0.25, where=m, **kw)


def retina(z, t, m, **kw):
    total = focal_jax.sigmoid_focal_loss(z, t, where=m, reduction="sum", **kw)
    return total / focal_jax.positive_normalizer(t, where=m, **kw)


# Single-device references: the global mean and its gradient.
ref = {
    "softmax": jax.value_and_grad(softmax)(X, Y),
    "sigmoid": jax.value_and_grad(sigmoid)(X, T, M),
    "retina": jax.value_and_grad(retina)(X, T, M),
}
ref_norm = focal_jax.positive_normalizer(T, where=M)

# (a) Plain jit with the inputs sharded over the mesh: the same values and gradients, by construction.
rows = NamedSharding(mesh, P("data"))
Xs, Ys, Ts, Ms = (jax.device_put(a, rows) for a in (X, Y, T, M))
assert len(Xs.sharding.device_set) == N_DEV
for name, fn, args in (("softmax", softmax, (Xs, Ys)), ("sigmoid", sigmoid, (Xs, Ts, Ms)),
                       ("retina", retina, (Xs, Ts, Ms))):
    v, g = jax.jit(jax.value_and_grad(fn))(*args)
    results[f"sharded_jit/{name}/value"] = rel(v, ref[name][0])
    results[f"sharded_jit/{name}/grad"] = rel(g, ref[name][1])
results["sharded_jit/positive_normalizer"] = rel(jax.jit(
    lambda t, m: focal_jax.positive_normalizer(t, where=m))(Ts, Ms), ref_norm)


# (b) shard_map: each device sees only its 6 positions. With axis_name the numerator and the
# denominator are psum-ed, so the loss is the global mean; without it, the average of the
# per-device means (what gradient averaging gives) is not.
def mapped(fn, n_args, **kw):
    body = lambda *a: fn(*a, **kw)
    return jax.shard_map(body, mesh=mesh, in_specs=(P("data"),) * n_args, out_specs=P())


def per_device_means(fn, n_args):
    body = lambda *a: jax.lax.pmean(fn(*a), "data")
    return jax.shard_map(body, mesh=mesh, in_specs=(P("data"),) * n_args, out_specs=P())


for name, fn, args in (("softmax", softmax, (X, Y)), ("sigmoid", sigmoid, (X, T, M)), ("retina", retina, (X, T, M))):
    v, g = jax.jit(jax.value_and_grad(mapped(fn, len(args), axis_name="data")))(*args)
    results[f"shard_map/{name}/value"] = rel(v, ref[name][0])
    results[f"shard_map/{name}/grad"] = rel(g, ref[name][1])
    # The gradient taken inside the map, per device, is the device's block of the global gradient.
    inner = jax.shard_map(lambda *a: jax.grad(lambda z: fn(z, *a[1:], axis_name="data"))(a[0]), mesh=mesh,
                          in_specs=(P("data"),) * len(args), out_specs=P("data"))
    results[f"shard_map/{name}/grad_inside"] = rel(jax.jit(inner)(*args), ref[name][1])
    v0, g0 = jax.jit(jax.value_and_grad(per_device_means(fn, len(args))))(*args)
    results[f"no_axis_name/{name}/value"] = rel(v0, ref[name][0])
    results[f"no_axis_name/{name}/grad"] = rel(g0, ref[name][1])

norm = jax.shard_map(lambda t, m: focal_jax.positive_normalizer(t, where=m, axis_name="data"), mesh=mesh,
                     in_specs=(P("data"), P("data")), out_specs=P())
results["shard_map/positive_normalizer"] = rel(jax.jit(norm)(T, M), ref_norm)
local = jax.shard_map(lambda t, m: jax.lax.pmean(focal_jax.positive_normalizer(t, where=m), "data"), mesh=mesh,
                      in_specs=(P("data"), P("data")), out_specs=P())
results["no_axis_name/positive_normalizer"] = rel(jax.jit(local)(T, M), ref_norm)
print(json.dumps(results))
'''

TOL = 1e-12  # float64: only the order of the sums differs
LOSSES = ["softmax", "sigmoid", "retina"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, float]:
    out = H.run_on_host_devices(SCRIPT, tmp_path_factory.mktemp("distributed") / "distributed_checks.py")
    return out


@pytest.mark.parametrize("what", ["value", "grad"])
@pytest.mark.parametrize("loss", LOSSES)
def test_sharded_jit_equals_unsharded(results, loss, what):
    assert results[f"sharded_jit/{loss}/{what}"] <= TOL


def test_sharded_jit_positive_normalizer(results):
    assert results["sharded_jit/positive_normalizer"] <= TOL


@pytest.mark.parametrize("what", ["value", "grad", "grad_inside"])
@pytest.mark.parametrize("loss", LOSSES)
def test_shard_map_with_axis_name_is_the_global_mean(results, loss, what):
    assert results[f"shard_map/{loss}/{what}"] <= TOL


@pytest.mark.parametrize("what", ["value", "grad"])
@pytest.mark.parametrize("loss", LOSSES)
def test_shard_map_without_axis_name_differs(results, loss, what):
    # averaging per-device means weights each device equally, whatever it counted
    assert results[f"no_axis_name/{loss}/{what}"] > 1e-3


def test_positive_normalizer_with_axis_name(results):
    assert results["shard_map/positive_normalizer"] <= TOL
    assert results["no_axis_name/positive_normalizer"] > 1e-3
