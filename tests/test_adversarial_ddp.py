"""AS under a real 2-process gloo DDP group: inner passes on the unwrapped module, one all-reduce per step."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tests_support import conv_bnn_and_batch
from torch.nn.parallel import DistributedDataParallel as DDP

from asbatch.adversarial import as_step


def _rank_grads(rank: int, x, y, ddp_init: str | None, out: str) -> None:
    net, _, _ = conv_bnn_and_batch()
    model, inner, no_sync = net, None, None
    if ddp_init is not None:
        dist.init_process_group("gloo", init_method=ddp_init, rank=rank, world_size=2)
        model = DDP(net)
        inner, no_sync = net, model.no_sync
    kwargs = {"no_sync": no_sync} if no_sync else {}
    as_step(model, x, y, lam=0.8, steps=5, alpha=0.02, kl_weight=1e-3, inner_model=inner,
            generator=torch.Generator().manual_seed(100 + rank), **kwargs)
    torch.save([p.grad for p in net.parameters()], f"{out}.{rank}")
    if ddp_init is not None:
        dist.barrier()  # no rank tears gloo down while the other still uses the pair (an abort in C++)
        dist.destroy_process_group()


def _worker(rank: int, init: str, out: str) -> None:
    _, x, y = conv_bnn_and_batch()
    half = slice(rank * 4, rank * 4 + 4)
    _rank_grads(rank, x[half], y[half], init, out)
    # what this test checks is saved: leave without the interpreter's teardown, where gloo's threads now and
    # then abort the process ("terminate called without an active exception") after the work is done
    os._exit(0)


def test_ddp_as_step_averages_per_rank_gradients_and_keeps_ranks_identical(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path}/init", str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = [torch.load(tmp_path / f"ddp.{r}") for r in range(2)]

    _, x, y = conv_bnn_and_batch()
    for rank in range(2):  # the same per-rank step, alone
        half = slice(rank * 4, rank * 4 + 4)
        _rank_grads(rank, x[half], y[half], None, str(tmp_path / "single"))
    single = [torch.load(tmp_path / f"single.{r}") for r in range(2)]

    for g0, g1, s0, s1 in zip(ddp[0], ddp[1], single[0], single[1], strict=True):
        assert torch.equal(g0, g1), "ranks must hold identical gradients after the step"
        assert torch.allclose(g0, (s0 + s1) / 2, atol=1e-6), "DDP gradient = mean of per-rank gradients"
