"""What a run is built from: the Accelerator, precision, model (with its init), optimizer, schedule, RNG state.

Precision is asbatch's, not Accelerate's: Accelerate's mixed precision is process-wide state that cannot
change between the runs `asbatch run SPEC` trains in one process (only a private reset could), and it
silently trains fp16 in fp32 on CPU. So every run creates a plain `Accelerator(mixed_precision="no")`
(distribution, DDP, collectives; creating it again with the same arguments is supported), and the model's
forward runs under `torch.autocast` here, with a `torch.amp.GradScaler` for fp16.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from asbatch.bayes import load_deterministic_state
from asbatch.config import RunConfig
from asbatch.models import build_model
from asbatch.rundir import SweepDir, resolve_init_from

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cuda_index(visible: int, local_rank: int) -> int | None:
    """The CUDA device (index among the visible ones) this process trains on: None when none is visible (CPU);
    0 when the site binds one GPU per task (CUDA_VISIBLE_DEVICES holds one device, whatever LOCAL_RANK is);
    else LOCAL_RANK, which must be one of the visible devices."""
    if visible <= 0:
        return None
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise RuntimeError(f"LOCAL_RANK {local_rank} but only {visible} GPUs are visible to this task; ask Slurm for "
                           "one GPU per task or for gpus_per_node = tasks per node")
    return local_rank


def bind_device() -> None:
    """Point Accelerate (which takes cuda:LOCAL_RANK) at the device `cuda_index` chooses, before the first
    Accelerator of the process is created."""
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        index = cuda_index(torch.cuda.device_count(), int(os.environ["LOCAL_RANK"]))
        os.environ["LOCAL_RANK"] = str(index)


def apply_determinism(config: RunConfig) -> None:
    """`deterministic: true`: deterministic cuDNN / cuBLAS kernels and torch.use_deterministic_algorithms (an op
    without a deterministic kernel raises). Off: cudnn.benchmark lets cuDNN pick the fastest kernels. CPU
    kernels are deterministic either way. Process-wide settings, so each run sets them."""
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(config.deterministic)
    torch.backends.cudnn.deterministic = config.deterministic
    torch.backends.cudnn.benchmark = not config.deterministic and torch.cuda.is_available()


def make_accelerator(config: RunConfig) -> Accelerator:
    """A plain Accelerator for this run. `cpu=True` on CPU-only hosts makes torchrun / srun give a real gloo
    group (without it each process would train alone)."""
    cpu = config.cpu or not torch.cuda.is_available()
    apply_determinism(config)
    if not cpu:
        bind_device()
    try:
        return Accelerator(cpu=cpu, mixed_precision="no")
    except ValueError as err:  # the process already runs on a GPU and this run asks for the CPU
        raise RuntimeError(f"cpu: {config.cpu}: runs trained in one process must agree on `cpu` ({err})") from None


def autocast_dtype(config: RunConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the run's precision (None: fp32). fp16 and bf16 run as asked on CPU too (CPU
    autocast and `GradScaler("cpu")`), so the fp16 path GPU users rely on is the one tested here."""
    return AUTOCAST_DTYPES.get(config.precision)


_FULL_PRECISION = contextvars.ContextVar("asbatch_full_precision", default=False)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Forwards wrapped by `autocast_forward` run in fp32 inside this context (the AS inner passes under
    `adversarial.inner_precision: fp32`)."""
    token = _FULL_PRECISION.set(True)
    try:
        yield
    finally:
        _FULL_PRECISION.reset(token)


def autocast_forward(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """Run the model's forward under autocast and return fp32 outputs (as Accelerate's prepare() does), so
    every pass (training, AS inner passes, evaluation) shares it and the backward runs outside autocast.
    Inside `full_precision()` the forward runs in fp32."""
    if dtype is None:
        return model
    forward = model.forward

    @functools.wraps(forward)
    def forward_in_autocast(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=not _FULL_PRECISION.get()):
            out = forward(*args, **kwargs)
        return out.float()

    model.forward = forward_in_autocast
    return model


def make_scaler(config: RunConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """A grad scaler for fp16 training (None otherwise: fp32 and bf16 need none)."""
    if autocast_dtype(config, device) is not torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def lr_factor(config: RunConfig, epoch: float) -> float:
    """LR multiplier at a (fractional) epoch: linear warmup, then multistep / cosine / constant."""
    s = config.schedule
    warm = min(1.0, epoch / s.warmup_epochs) if s.warmup_epochs > 0 else 1.0
    if s.name == "multistep":
        decay = s.gamma ** sum(1 for m in s.milestones if math.floor(epoch) >= m)
    elif s.name == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * min(epoch, s.epochs) / s.epochs))
    else:
        decay = 1.0
    return warm * decay


def make_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    """Adam or SGD, fused (one kernel for all parameters, and no host read of found_inf under a GradScaler)
    where torch has a fused kernel for the parameters' device, foreach otherwise."""
    o = config.optim
    params = list(params)
    if o.name == "sgd":
        kwargs, cls = {"momentum": o.momentum, "nesterov": o.nesterov}, torch.optim.SGD
    else:
        kwargs, cls = {}, torch.optim.Adam
    fused_ok = all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params)
    speed = {"fused": True} if fused_ok else {"foreach": True}
    return cls(params, lr=o.lr, weight_decay=o.weight_decay, **kwargs, **speed)


_FUSED_DEVICES = ("cuda", "cpu", "xpu", "mps")  # where torch 2.x has fused Adam / SGD kernels


def init_weights_file(config: RunConfig, sweep_dir: SweepDir) -> Path:
    """The file `model.init_from` names (a run of the sweep, a run dir or a file); missing -> clear error."""
    path = resolve_init_from(config.model.init_from, sweep_dir)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from={config.model.init_from!r}: no trained model at {path} "
                                "(has the upstream run finished?)")
    return path


def build(config: RunConfig, num_classes: int, in_channels: int, sweep_dir: SweepDir) -> nn.Module:
    """The run's model, mu initialised from `model.init_from` when set (Bayesian fine-tune)."""
    m = config.model
    model = build_model(m.name, num_classes, in_channels=in_channels, bayesian=m.bayesian, width=m.width,
                        init_sigma=m.init_sigma, prior_sigma=m.prior_sigma, init_log_sigma=m.init_log_sigma,
                        mu_init=m.mu_init, bn_weight_init=m.bn_weight_init,
                        channels_last=config.speed.channels_last)
    if m.init_from:
        path = init_weights_file(config, sweep_dir)
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            if m.bayesian:
                load_deterministic_state(model, state)
            else:
                model.load_state_dict(state)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"model.init_from={m.init_from!r} ({path}) does not fit {m.name}: {err}") from None
    return model


def code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def rng_state(eps_gen: torch.Generator) -> dict[str, Any]:
    """What this rank's training draws from: the CPU default generator and its own eps generator, with the
    eps generator's device. The CUDA default generators are never drawn from, so they are not saved (a
    task that sees fewer GPUs than the one that saved must still resume)."""
    return {"torch": torch.get_rng_state(), "eps": eps_gen.get_state(), "eps_device": eps_gen.device.type}


def set_rng_state(state: dict[str, Any], eps_gen: torch.Generator) -> bool:
    """Restore a rank's RNG state; False (with a warning, the eps generator keeping its fresh seed) when the
    eps state was saved on another kind of device, so it cannot be restored here."""
    torch.set_rng_state(state["torch"])
    saved_on = state.get("eps_device") or ("cpu" if state["eps"].numel() == torch.get_rng_state().numel() else "cuda")
    if saved_on != eps_gen.device.type:
        warnings.warn(f"the AS noise generator was saved on {saved_on} and resumes on {eps_gen.device.type}: "
                      "it is re-seeded, so this run is no longer bitwise identical to an uninterrupted one",
                      stacklevel=2)
        return False
    eps_gen.set_state(state["eps"])
    return True
