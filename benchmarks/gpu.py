"""`python -m benchmarks --gpu`: a short GPU smoke test and the GPU timing rows, printed as one table.

Meant for the first machine with a GPU (< 10 min on one H100). Smoke rows (pass / fail):
  G1  fp32, bf16 and fp16 AS steps of a Bayesian ResNet20 under DDP with one rank (NCCL): finite losses, the
      fp16 grad scaler's skipped steps, eps inside the N * alpha ball;
  G2  `train()` on the GPU, stopped mid-run and resumed, with `deterministic: true`: bitwise equal to an
      uninterrupted run (and the final S-sample evaluation ran on the GPU);
Timing rows (info): G3 the AS step / plain step ratio per precision; G4 the S-sample evaluation's
throughput; G5 AS training images/s (bf16, batch 128, fused Adam, no host read in the timed steps) of
ResNet20, ResNet56 and VGG16, eager, `torch.compile`d and eager with `speed.channels_last`. Without a
visible GPU every row is SKIP with the reason.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ALPHA, KL_WEIGHT, LAM, STEPS, Row, bayesian_resnet20, cifar_batch, skipped

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank_group() -> None:
    """A real NCCL process group of one rank, so DDP wraps the model as on a cluster."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)


def _as_steps(precision: str, steps: int) -> tuple[bool, str, float]:
    """`steps` AS training steps under DDP(1 rank) at one precision: (ok, note, seconds per step)."""
    from asbatch.adversarial import as_step
    from asbatch.bayes import get_noise
    from asbatch.train.setup import autocast_forward

    device = torch.device("cuda", 0)
    dtype = PRECISIONS[precision]
    model = autocast_forward(bayesian_resnet20().to(device), device, dtype)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
    x, y = (t.to(device) for t in cifar_batch())
    gen = torch.Generator(device=device).manual_seed(0)
    losses, skipped_steps, worst = [], 0, 0.0
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        scale = scaler.get_scale() if scaler is not None else 1.0
        backward = (lambda loss: scaler.scale(loss).backward()) if scaler is not None else torch.Tensor.backward
        out = as_step(ddp, x, y, lam=LAM, steps=STEPS, alpha=ALPHA, kl_weight=KL_WEIGHT, inner_model=model,
                      backward=backward, no_sync=ddp.no_sync, loss_scale=scale, generator=gen)
        eps_n = [e.detach().clone() for e in get_noise(model)]
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
            skipped_steps += int(scaler.get_scale() < scale)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.total))
        worst = max(worst, max(float(e.abs().max()) for e in eps_n))
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / steps
    ok = all(torch.isfinite(torch.tensor(losses)).tolist())
    note = (f"{precision}: losses {losses[0]:.3f} -> {losses[-1]:.3f}, {skipped_steps} skipped step(s), "
            f"max |eps_N| {worst:.2f}, {per_step * 1e3:.0f} ms per step")
    return ok, note, per_step


def _plain_step_time(steps: int) -> float:
    from asbatch.adversarial import as_step

    device = torch.device("cuda", 0)
    model = bayesian_resnet20().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = (t.to(device) for t in cifar_batch())
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        as_step(model, x, y, lam=0.0, steps=STEPS, alpha=ALPHA, kl_weight=KL_WEIGHT)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def images_per_s(name: str, compile_model: bool, steps: int, device: torch.device,
                 width: int | None = None, channels_last: bool = False) -> tuple[float, float]:
    """(AS training images/s, seconds of the untimed warm-up, which compiles) of a Bayesian `name` under bf16
    autocast, as the trainer runs it: fused Adam, eps from a device generator, nothing read from the device
    between the first and the last timed step; `channels_last` as `speed.channels_last` sets it."""
    from asbatch.adversarial import as_step
    from asbatch.models import build_model
    from asbatch.train.setup import autocast_forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(name, 10, bayesian=True, width=width, channels_last=channels_last).to(device).train()
    model = autocast_forward(model, device, torch.bfloat16)
    step_model = torch.compile(model) if compile_model else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    x, y = cifar_batch(128)
    x, y = x.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format), y.to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        as_step(step_model, x, y, lam=LAM, steps=STEPS, alpha=ALPHA, kl_weight=KL_WEIGHT, inner_model=step_model,
                generator=gen)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * 128 / (time.perf_counter() - start), warmup


def _resume_is_exact(tmp: Path) -> tuple[bool, str]:
    """`train()` on the GPU, deterministic: stopped after 7 steps and resumed vs uninterrupted."""
    from asbatch.config import RunConfig
    from asbatch.train import TrainingInterrupted, train

    base = {"sweep": "gpu", "deterministic": True, "precision": "bf16", "checkpoint_every": 5,
            "data": {"name": "synthetic", "batch_size": 100}, "model": {"name": "resnet20", "width": 8},
            "schedule": {"name": "cosine", "epochs": 2}, "adversarial": {"lam": 0.8}, "eval": {"num_samples": 4}}
    config = RunConfig.model_validate(base)
    reference = train(config, tmp / "reference")
    polls = []
    with contextlib.suppress(TrainingInterrupted):
        train(config, tmp / "resumed", should_stop=lambda: polls.append(1) or len(polls) >= 7)
    resumed = train(config, tmp / "resumed")
    a = torch.load(tmp / "reference" / "model.pt", weights_only=True)
    b = torch.load(tmp / "resumed" / "model.pt", weights_only=True)
    same = all(torch.equal(a[k], b[k]) for k in a) and resumed["evaluation"] == reference["evaluation"]
    note = (f"device {resumed['train']['device']}, precision {resumed['train']['precision']}, ensembled accuracy "
            f"{resumed['evaluation']['ensemble_accuracy']:.3f}; parameters and evaluation "
            f"{'bitwise equal' if same else 'DIFFER'} after a stop at step 7 and a resume")
    return same, note


def _evaluation_rate() -> tuple[float, str]:
    from asbatch.data import DeviceLoader, synthetic
    from asbatch.evaluate import predict

    device = torch.device("cuda", 0)
    data = synthetic("test", image_shape=(3, 32, 32), n_test=10_000)
    loader = DeviceLoader(data, 1000, train=False, augment=False, seed=0, device=device)
    model = bayesian_resnet20().to(device)
    predict(model, loader, 1)  # warm up
    torch.cuda.synchronize()
    start = time.perf_counter()
    predict(model, loader, 20)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return 20 * 10_000 / seconds, f"20 weight samples over 10,000 CIFAR-shaped images in {seconds:.2f} s"


def run(quick: bool = False) -> list[Row]:
    if not torch.cuda.is_available():
        return [skipped(f"G{i}. {name}", "-", "no CUDA device visible") for i, name in
                enumerate(("AS steps under DDP", "resume on the GPU", "AS / plain step", "S-sample evaluation",
                           "AS training images/s, eager, compiled and channels_last"), 1)]
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _one_rank_group()
    steps = 5 if quick else 20
    rows = []
    times = {}
    for precision in PRECISIONS:
        ok, note, times[precision] = _as_steps(precision, steps)
        rows.append(Row(f"G1. AS steps under DDP (1 rank), {precision}", times[precision] * 1e3, "ms", "finite",
                        ok, note))
    torch.distributed.destroy_process_group()  # train() below sets up its own (single-process) Accelerator
    with tempfile.TemporaryDirectory(prefix="asbatch-gpu-") as tmp:
        same, note = _resume_is_exact(Path(tmp))
    rows.append(Row("G2. stop + resume on the GPU, deterministic", None, "", "bitwise", same, note))
    plain = _plain_step_time(steps)
    for precision, seconds in times.items():
        rows.append(Row(f"G3. AS step / plain step, {precision}", seconds / plain, "x", "-", None,
                        f"plain fp32 step {plain * 1e3:.0f} ms"))
    rate, note = _evaluation_rate()
    rows.append(Row("G4. S-sample evaluation", rate, "images/s", "-", None, note))
    device = torch.device("cuda", 0)
    for name in ("resnet20", "resnet56", "vgg16"):
        eager, _ = images_per_s(name, False, steps, device)
        compiled, compile_s = images_per_s(name, True, steps, device)
        nhwc, _ = images_per_s(name, False, steps, device, channels_last=True)
        rows.append(Row(f"G5. AS training images/s, {name}, bf16: compiled / eager", compiled / eager, "x", "-", None,
                        f"eager {eager:,.0f} img/s, compiled {compiled:,.0f} img/s (compiling: {compile_s:.0f} s); "
                        f"batch 128, N = {STEPS}"))
        rows.append(Row(f"G5. AS training images/s, {name}, bf16: channels_last / NCHW (eager)", nhwc / eager, "x",
                        "-", None, f"NCHW {eager:,.0f} img/s, channels_last {nhwc:,.0f} img/s; batch 128, N = {STEPS}"))
    return rows
