"""torch.distributed: ``process_group=`` makes DDP's averaged gradients those of the global-batch mean.

Two processes (gloo, loopback, CPU) each hold half of a batch, with deliberately unequal numbers of
ignored or masked positions. A small model is wrapped in DistributedDataParallel; after backward its
parameter gradients must equal those of the same model trained in one process on the whole batch.
Without ``process_group`` each rank normalizes by its own count, and the gradients differ.
All runs happen in one spawn (a module fixture); the tests below only read its results.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from parity_tests import _harness as H

torch = pytest.importorskip("torch")

WORLD = 2
ROWS = 8  # rows per rank
CASES = ("sigmoid-where", "softmax-ignore", "softmax-ignore-weight", "sigmoid-sum-over-positives")


def _data():
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
    return feats, targets, labels, mask


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(5, 3)


def _loss(case, logits, targets, labels, mask, group):
    import focal_torch

    if case == "sigmoid-where":
        return focal_torch.sigmoid_focal_loss(logits, targets, alpha=0.25, where=mask, process_group=group)
    if case == "softmax-ignore":
        return focal_torch.softmax_focal_loss(logits, labels, gamma=2.0, process_group=group)
    if case == "softmax-ignore-weight":
        weight = torch.tensor([0.5, 2.0, 1.0])
        return focal_torch.softmax_focal_loss(logits, labels, gamma=1.5, weight=weight, process_group=group)
    # RetinaNet normalization: the sum of the loss over the global number of positives.
    total = focal_torch.sigmoid_focal_loss(logits, targets, where=mask, reduction="sum")
    return total / focal_torch.positive_normalizer(targets, where=mask, process_group=group)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        feats, targets, labels, mask = _data()
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        results = {}
        for case in CASES:
            for use_group in (True, False):
                model = _model()
                ddp = DistributedDataParallel(model)
                loss = _loss(case, ddp(feats[rows]), targets[rows], labels[rows], mask[rows],
                             dist.group.WORLD if use_group else None)
                loss.backward()
                value = loss.detach().clone()
                dist.all_reduce(value)  # the mean over ranks of what each returned
                results[f"{case}-{use_group}"] = ([p.grad.clone() for p in model.parameters()], value / WORLD)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    feats, targets, labels, mask = _data()
    single = {}
    for case in CASES:
        model = _model()
        loss = _loss(case, model(feats), targets, labels, mask, None)
        loss.backward()
        single[case] = ([p.grad.clone() for p in model.parameters()], loss.detach())
    return ranks, single


def _grads(grads):
    return np.concatenate([g.numpy().ravel() for g in grads])


@pytest.mark.parametrize("case", CASES)
def test_ddp_gradients_equal_the_single_process_global_mean(runs, case):
    ranks, single = runs
    for rank in range(WORLD):
        H.assert_close(_grads(ranks[rank][f"{case}-True"][0]), _grads(single[case][0]), "float32", f"rank {rank}")


@pytest.mark.parametrize("case", CASES)
def test_ddp_returned_values_average_to_the_global_mean(runs, case):
    ranks, single = runs
    H.assert_close(ranks[0][f"{case}-True"][1], single[case][1], "float32")


@pytest.mark.parametrize("case", CASES)
def test_without_process_group_the_gradients_differ(runs, case):
    ranks, single = runs
    diff = np.abs(_grads(ranks[0][f"{case}-False"][0]) - _grads(single[case][0])).max()
    assert diff > 1e-3, diff
