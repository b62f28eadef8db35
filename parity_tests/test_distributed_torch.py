"""torch.distributed: ``process_group=`` makes DDP's averaged gradients those of the global-batch mean.

Two processes (gloo, CPU) each hold half of a batch, with deliberately unequal numbers of ignored or
masked positions. A small model is wrapped in DistributedDataParallel; after backward its parameter
gradients must equal those of the same model trained in one process on the whole batch. Without
``process_group`` each rank normalizes by its own count, and the gradients differ. RetinaNet's
``positive_normalizer`` is checked the same way, also with fewer positives than ranks (one positive in
the global batch, and none). All runs happen in one spawn (a module fixture); the tests below only read
its results.

The focal family (``asymmetric_loss``, ``quality_focal_loss``, ``varifocal_loss``), ``normalized=True``
and the softmax are also run on ranks of unequal sizes (3 and 7 rows, unequal masks and ignored labels),
without DDP: each rank's returned value and its gradient with respect to its own logits are compared with
one process over the concatenated batch. With ``reduction="mean"`` the mean over ranks of the returned
values is the global mean, and each rank's gradient over the world size (DDP's average) is the global
mean's gradient of its rows; ``normalized=True`` with ``"sum"`` sums to the global value, each rank's
gradient being the global one. A local count in place of the all-reduced one, or a world size left out,
moves both by about a factor 2. These run in float64, held to float64's rtol.

Teardown is ordered so that no rank can abort at exit: the ranks rendezvous through a file store (no TCP
port to pick, race for or reuse), every DDP wrapper (which holds the process group through its reducer)
is released and collected inside the run, a barrier makes sure that every rank has finished every
collective, and only then is the process group destroyed, while the interpreter is still fully alive.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from parity_tests import _harness as H

torch = pytest.importorskip("torch")

WORLD = 2
ROWS = 8  # rows per rank
CASES = ("sigmoid-where", "softmax-ignore", "softmax-ignore-weight", "sigmoid-sum-over-positives",
         "sigmoid-sum-over-one-positive", "sigmoid-sum-over-no-positive", "sigmoid-normalized-where")


def _data() -> dict[str, torch.Tensor]:
    """The global batch. Rank 0 ignores or masks few positions, rank 1 many."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(WORLD * ROWS, 5, generator=g)
    targets = (torch.rand(WORLD * ROWS, 3, generator=g) < 0.3).float()
    labels = torch.randint(0, 3, (WORLD * ROWS,), generator=g)
    labels[[1]] = -100  # rank 0: one ignored row
    labels[[8, 9, 11, 12, 14]] = -100  # rank 1: five
    mask = torch.ones(WORLD * ROWS, 3, dtype=torch.bool)
    mask[0, 0] = False  # rank 0: one masked element
    mask[8:15, :2] = False  # rank 1: fourteen
    targets[~mask] = float("nan")  # masked targets are never read
    one = torch.zeros(WORLD * ROWS, 3)
    one[2, 1] = 1.0  # a single positive in the global batch, on rank 0: fewer positives than ranks
    return {"feats": feats, "targets": targets, "labels": labels, "mask": mask, "one": one,
            "none": torch.zeros(WORLD * ROWS, 3)}


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(5, 3)


def _loss(case, logits, d, group):
    """The loss of ``case``, and the normalizer it divides by (None for a mean)."""
    import focal_torch

    if case == "sigmoid-where":
        return focal_torch.sigmoid_focal_loss(logits, d["targets"], alpha=0.25, where=d["mask"],
                                              process_group=group), None
    if case == "sigmoid-normalized-where":  # Σm over every rank's counted elements, differentiated
        return focal_torch.sigmoid_focal_loss(logits, d["targets"], gamma=1.5, where=d["mask"], normalized=True,
                                              process_group=group), None
    if case == "softmax-ignore":
        return focal_torch.softmax_focal_loss(logits, d["labels"], gamma=2.0, process_group=group), None
    if case == "softmax-ignore-weight":
        weight = torch.tensor([0.5, 2.0, 1.0])
        return focal_torch.softmax_focal_loss(logits, d["labels"], gamma=1.5, weight=weight,
                                              process_group=group), None
    # RetinaNet normalization: the sum of the loss over the global number of positives.
    if case == "sigmoid-sum-over-positives":
        t, where = d["targets"], d["mask"]
    else:
        t, where = d["one" if case == "sigmoid-sum-over-one-positive" else "none"], None
    total = focal_torch.sigmoid_focal_loss(logits, t, where=where, reduction="sum")
    norm = focal_torch.positive_normalizer(t, where=where, process_group=group)
    return total / norm, norm


def _run_cases(rank: int) -> dict:
    """Every case with and without the process group. The DDP wrappers live only in this frame."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    local = {k: v[rows] for k, v in _data().items()}
    results = {}
    for case in CASES:
        for use_group in (True, False):
            model = _model()
            ddp = DistributedDataParallel(model)
            loss, norm = _loss(case, ddp(local["feats"]), local, dist.group.WORLD if use_group else None)
            loss.backward()
            value = loss.detach().clone()
            dist.all_reduce(value)  # the mean over ranks of what each returned
            results[f"{case}-{use_group}"] = ([p.grad.clone() for p in model.parameters()], value / WORLD,
                                              None if norm is None else norm.clone())
            del ddp, model, loss
    start = sum(FAMILY_ROWS[:rank])
    part = {k: (v if k == "weight" else v[start:start + FAMILY_ROWS[rank]]) for k, v in _family_data().items()}
    results["family"] = {case: _family_value_and_grad(case, part, dist.group.WORLD) for case in FAMILY_CASES}
    return results


FAMILY_ROWS = (3, 7)  # rows per rank: unequal
FAMILY_CASES = {
    # name: (loss, options, reduction: "mean" (the returned values are averaged) or "sum" (summed))
    "asymmetric-where": ("asymmetric", dict(where=True, gamma_neg=4.0, clip=0.05), "mean"),
    "asymmetric-weight-smoothing": ("asymmetric", dict(weight=True, label_smoothing=0.1), "mean"),
    "quality-focal-where": ("quality_focal", dict(where=True, beta=2.0), "mean"),
    "quality-focal": ("quality_focal", dict(beta=1.5), "mean"),
    "varifocal-where-weight": ("varifocal", dict(where=True, weight=True), "mean"),
    "varifocal": ("varifocal", dict(), "mean"),
    "sigmoid-normalized-mean": ("sigmoid", dict(where=True, normalized=True, gamma=1.5), "mean"),
    "sigmoid-normalized-sum": ("sigmoid", dict(where=True, normalized=True, gamma=2.0), "sum"),
    "sigmoid-where": ("sigmoid", dict(where=True, gamma=2.0, alpha=0.25), "mean"),
    "softmax-ignore-weight": ("softmax", dict(weight=True, gamma=2.0), "mean"),
}


def _family_data() -> dict[str, torch.Tensor]:
    """The global batch of the unequal ranks: rank 0 (rows 0-2) masks or ignores little, rank 1 (rows 3-9)
    much."""
    g = torch.Generator().manual_seed(3)
    n = sum(FAMILY_ROWS)
    logits = torch.randn(n, 4, generator=g, dtype=torch.float64) * 3
    hard = (torch.rand(n, 4, generator=g) < 0.3).double()
    score = torch.where(hard > 0, torch.rand(n, 4, generator=g, dtype=torch.float64), 0.0)  # IoU-like
    labels = torch.randint(0, 4, (n,), generator=g)
    labels[[1, 3, 4, 6, 8]] = -100
    mask = torch.ones(n, 4, dtype=torch.bool)
    mask[0, 0] = False
    mask[3:9, 1:] = False
    return {"logits": logits, "hard": hard, "score": score, "labels": labels, "mask": mask,
            "weight": torch.tensor([0.5, 2.0, 1.0, 1.5], dtype=torch.float64)}


def _family_value_and_grad(case: str, d: dict, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of ``case`` on ``d`` and its gradient with respect to ``d``'s logits."""
    import focal_torch

    loss, opts, reduction = FAMILY_CASES[case]
    kw = {k: v for k, v in opts.items() if k not in ("where", "weight")}
    kw["reduction"] = reduction
    if opts.get("weight"):
        kw["weight"] = d["weight"]
    x = d["logits"].clone().requires_grad_()
    if loss == "softmax":
        out = focal_torch.softmax_focal_loss(x, d["labels"], process_group=group, **kw)
    else:
        target = d["score"] if loss in ("quality_focal", "varifocal") else d["hard"]
        if opts.get("where"):
            kw["where"] = d["mask"]
            target = torch.where(d["mask"], target, float("nan"))  # masked targets are never read
        fn = {"asymmetric": focal_torch.asymmetric_loss, "quality_focal": focal_torch.quality_focal_loss,
              "varifocal": focal_torch.varifocal_loss, "sigmoid": focal_torch.sigmoid_focal_loss}[loss]
        out = fn(x, target, process_group=group, **kw)
    out.backward()
    return out.detach(), x.grad


def _worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = _run_cases(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        gc.collect()  # the reducers of the DDP wrappers hold the process group: release them first
        dist.barrier()  # no rank tears down while another is still inside a collective
    finally:
        dist.destroy_process_group()


def spawn(out_dir: str) -> None:
    """One run of both ranks, writing ``rank{r}.pt`` under ``out_dir``."""
    import torch.multiprocessing as mp

    store = os.path.join(out_dir, "store")
    mp.spawn(_worker, args=(store, out_dir), nprocs=WORLD, join=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn(str(out))
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    d = _data()
    single = {}
    for case in CASES:
        model = _model()
        logits = model(d["feats"])
        logits.retain_grad()
        loss, norm = _loss(case, logits, d, None)
        loss.backward()
        # the parameter gradients are sums over rows of terms of both signs: their condition scale is the
        # sum of the terms' magnitudes, Σ_i |dL/dlogit_i| |feature_i| (weight) and Σ_i |dL/dlogit_i| (bias)
        g = logits.grad.abs().double()
        scale = np.concatenate([(g.T @ d["feats"].abs().double()).numpy().ravel(), g.sum(0).numpy()])
        single[case] = ([p.grad.clone() for p in model.parameters()], loss.detach(), norm, scale)
    return ranks, single


def _grads(grads):
    return np.concatenate([g.numpy().ravel() for g in grads])


@pytest.mark.parametrize("case", CASES)
def test_ddp_gradients_equal_the_single_process_global_mean(runs, case):
    ranks, single = runs
    for rank in range(WORLD):
        H.assert_close(_grads(ranks[rank][f"{case}-True"][0]), _grads(single[case][0]), "float32", f"rank {rank}",
                       scale=single[case][3])


@pytest.mark.parametrize("case", CASES)
def test_ddp_returned_values_average_to_the_global_mean(runs, case):
    ranks, single = runs
    for rank in range(WORLD):
        H.assert_close(ranks[rank][f"{case}-True"][1], single[case][1], "float32", f"rank {rank}")


@pytest.mark.parametrize("case", [c for c in CASES if "sum-over" in c])
def test_ddp_positive_normalizer_is_the_global_count_over_the_world_size(runs, case):
    """Each rank's normalizer is max(global positives, 1) / world size, also with fewer positives than
    ranks: one positive (global count 1) and none (count 0, clamped to 1)."""
    ranks, single = runs
    expected = {"sigmoid-sum-over-one-positive": 1.0, "sigmoid-sum-over-no-positive": 1.0}.get(case)
    if expected is not None:
        assert float(single[case][2]) == expected
    for rank in range(WORLD):
        assert float(ranks[rank][f"{case}-True"][2]) * WORLD == float(single[case][2]), rank


@pytest.mark.parametrize("case", CASES)
def test_without_process_group_the_gradients_differ(runs, case):
    ranks, single = runs
    diff = np.abs(_grads(ranks[0][f"{case}-False"][0]) - _grads(single[case][0])).max()
    assert diff > 1e-3, diff


@pytest.fixture(scope="module")
def family_runs(runs):
    """Each rank's (value, gradient) per family case, and the single process's over the concatenated batch."""
    ranks, _ = runs
    whole = {case: _family_value_and_grad(case, _family_data(), None) for case in FAMILY_CASES}
    return [r["family"] for r in ranks], whole


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_unequal_ranks_returned_values_combine_to_the_global_value(family_runs, case):
    ranks, whole = family_runs
    values = [float(ranks[r][case][0]) for r in range(WORLD)]
    combined = sum(values) / (WORLD if FAMILY_CASES[case][2] == "mean" else 1)
    H.assert_close(combined, float(whole[case][0]), "float64", f"{case} value")


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_unequal_ranks_gradient_is_the_global_gradient_of_their_rows(family_runs, case):
    ranks, whole = family_runs
    averaged = FAMILY_CASES[case][2] == "mean"  # DDP divides the summed gradients by the world size
    for r in range(WORLD):
        start = sum(FAMILY_ROWS[:r])
        expected = whole[case][1][start:start + FAMILY_ROWS[r]]
        assert torch.count_nonzero(expected) > 0
        H.assert_close(ranks[r][case][1].numpy() / (WORLD if averaged else 1), expected.numpy(), "float64",
                       f"{case} rank {r} gradient")
