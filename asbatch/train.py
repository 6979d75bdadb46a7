"""`train(config, run_dir) -> results`: one run, start to finish, resuming from its newest checkpoint.

One Accelerator carries distribution (DDP over processes and nodes; gloo on CPU via `cpu=True`), mixed
precision and the grad scaler. The data order, augmentation and AS noise come from generators seeded by
(seed, epoch) or (seed, rank) whose state is checkpointed, so a run killed at any point and restarted ends
bitwise identical (CPU, fp32) to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from asbatch import checkpoint
from asbatch.adversarial import as_step
from asbatch.bayes import load_deterministic_state, noise_mode, sample_noise
from asbatch.config import DataConfig, RunConfig
from asbatch.data import DeviceLoader, loader_for
from asbatch.evaluate import evaluate
from asbatch.models import build_model
from asbatch.spec import resolve_run_ref
from asbatch.tracking import Tracker


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stops and its last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """`should_stop` asked to stop (preemption, time limit): every rank saved a checkpoint at `step`."""

    def __init__(self, step: int):
        super().__init__(f"stopped at global step {step} after saving a checkpoint; rerun to resume")
        self.step = step


@dataclass
class Progress:
    epoch: int = 0          # epoch to run next
    step_in_epoch: int = 0  # step of that epoch to run next
    global_step: int = 0
    train_time_s: float = 0.0
    best_test_acc: float = 0.0
    # running sums of the current epoch, so a mid-epoch resume reports the same epoch averages
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_seen: int = 0


# ----------------------------------------------------------------------------------------- pieces


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
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


def resolve_init_from(value: str, run_dir: Path, sweep: str) -> Path:
    """`run:<id>` -> that run of the sweep; a run dir -> its model.pt; a file as is. Missing -> clear error."""
    path = resolve_run_ref(value, run_dir.parent.parent, sweep)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from={value!r}: no trained model at {path} "
                                "(has the upstream run finished?)")
    return path


def build(config: RunConfig, num_classes: int, in_channels: int, run_dir: Path) -> nn.Module:
    m = config.model
    model = build_model(m.name, num_classes, in_channels=in_channels, bayesian=m.bayesian, width=m.width,
                        init_sigma=m.init_sigma, prior_sigma=m.prior_sigma)
    if m.init_from:
        path = resolve_init_from(m.init_from, run_dir, config.sweep)
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
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


@torch.no_grad()
def test_accuracy(model: nn.Module, loader: DeviceLoader) -> float:
    correct = total = 0
    was_training = model.training
    model.eval()
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / total


def epoch_test_metrics(model: nn.Module, loader: DeviceLoader, bayesian: bool, epoch: int) -> dict[str, float]:
    """Test accuracy with the mean weights and with one weight sample (seeded by the epoch)."""
    if not bayesian:
        return {"test_acc": test_accuracy(model, loader)}
    with noise_mode(model, "mean"):
        mean_acc = test_accuracy(model, loader)
    with noise_mode(model, "fixed"):
        sample_noise(model, torch.Generator().manual_seed(10_000 + epoch))
        sample_acc = test_accuracy(model, loader)
    return {"test_acc_mean": mean_acc, "test_acc_sample": sample_acc}


def rng_state(eps_gen: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "eps": eps_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], eps_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    eps_gen.set_state(state["eps"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """`metrics.jsonl`, one line per epoch; on resume the lines of epochs to be re-run are dropped."""

    def __init__(self, path: Path, resume_epoch: int):
        self.path = path
        if path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["epoch"] < resume_epoch]
            checkpoint.atomic_write_bytes(path, lambda f: f.write("".join(k + "\n" for k in keep).encode()))

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def fresh_accelerator(config: RunConfig) -> Accelerator:
    """An Accelerator for this run. Several runs may train one after another in one process (`asbatch run`
    on a spec), with different precisions: forget the previous run's precision state, but keep the
    process-level state (the distributed group). `cpu=True` on CPU-only hosts makes torchrun / srun give a
    real gloo group (without it each process would train alone)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(cpu=config.cpu or not torch.cuda.is_available(), mixed_precision=config.precision)


def stop_agreed(accelerator: Accelerator, local_flag: bool) -> bool:
    """True on every rank if any rank wants to stop (signals reach ranks at slightly different times)."""
    if accelerator.num_processes == 1:
        return local_flag
    flag = torch.tensor([1.0 if local_flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def ranks_in_sync(accelerator: Accelerator, model: nn.Module) -> bool:
    """Do all ranks hold the same parameters? (A cheap end-of-run check that DDP kept them together.)"""
    with torch.no_grad():
        digest = torch.stack([p.double().sum() for p in model.parameters()]).unsqueeze(0)
    gathered = accelerator.gather(digest.to(accelerator.device))
    return bool((gathered == gathered[0]).all())


# ----------------------------------------------------------------------------------------- the loop


def train(
    config: RunConfig,
    run_dir: str | Path,
    progress_bar: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns the results dict also written to results.json.

    `should_stop` (e.g. "a USR2 arrived") is polled after every optimizer step; the ranks agree on it
    (an all-reduce), all save a checkpoint at that same step, and `TrainingInterrupted` is raised.
    """
    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    if results_path.exists():  # finished: never re-run
        return json.loads(results_path.read_text())
    wall_start = time.time()

    accelerator = fresh_accelerator(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()

    train_loader = loader_for(config.data, "train", seed=config.seed, device=device, rank=rank, world_size=world)
    test_loader = loader_for(config.data, "test", seed=0, device=device)
    torch.manual_seed(config.seed)  # same init on every rank
    model = build(config, train_loader.num_classes, train_loader.image_shape[0], run_dir).to(device)
    optimizer = make_optimizer(config, model.parameters())
    steps_per_epoch = train_loader.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s / steps_per_epoch))
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    bayesian = config.model.bayesian
    adv = config.adversarial
    kl_weight = adv.kl_weight if adv.kl_weight is not None else 1.0 / (100 * train_loader.num_examples)
    eps_gen = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + rank)

    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    prog = Progress()
    resumed = checkpoint.load_latest(ckpt_root, rank)
    if resumed is not None:
        shared, rank_state = resumed
        inner.load_state_dict(shared["model"])
        optimizer.load_state_dict(shared["optimizer"])
        scheduler.load_state_dict(shared["scheduler"])
        if accelerator.scaler is not None and shared.get("scaler"):
            accelerator.scaler.load_state_dict(shared["scaler"])
        prog = Progress(**shared["progress"])
        if rank_state is not None:
            set_rng_state(rank_state, eps_gen)
        accelerator.print(f"resumed {run_dir.name} at epoch {prog.epoch} step {prog.step_in_epoch}")
    metrics = MetricsLog(run_dir / "metrics.jsonl", prog.epoch) if accelerator.is_main_process else None
    # the W&B run is closed (as failed) if anything below raises, so a requeued segment can continue it
    with Tracker(config, run_dir, enabled=accelerator.is_main_process) as tracker:
        def save_checkpoint() -> None:
            shared = None
            if accelerator.is_main_process:
                shared = {"model": inner.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "progress": asdict(prog),
                          "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
            checkpoint.save(ckpt_root, prog.global_step, shared, rng_state(eps_gen), rank, world,
                            accelerator.wait_for_everyone, config.keep_checkpoints)

        bar = None
        if progress_bar and accelerator.is_main_process:
            from tqdm import tqdm
            bar = tqdm(total=config.schedule.epochs * steps_per_epoch, initial=prog.global_step,
                       desc=run_dir.name, unit="step", leave=False, disable=None)  # no bar off a terminal

        while prog.epoch < config.schedule.epochs:
            epoch_start = time.time()
            model.train()
            loss_sum = torch.tensor(prog.epoch_loss_sum, device=device)
            # prepare() made the model's forward run under autocast (inner shares it), so no context here:
            # the backward passes inside as_step run outside autocast, as they should
            for x, y in train_loader.epoch(prog.epoch, prog.step_in_epoch):
                if bayesian:
                    scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
                    out = as_step(model, x, y, lam=adv.lam, steps=adv.steps, alpha=adv.alpha, kl_weight=kl_weight,
                                  inner_model=inner, backward=accelerator.backward,
                                  no_sync=lambda: accelerator.no_sync(model), loss_scale=scale, generator=eps_gen)
                    loss, logits = out.total, out.logits
                else:
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    accelerator.backward(loss)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"loss is {loss.item()} at global step {prog.global_step} (epoch "
                                             f"{prog.epoch}); the last good checkpoint in {ckpt_root} is kept")
                if config.optim.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                loss_sum += loss.detach()
                prog.epoch_correct += int((logits.argmax(1) == y).sum())
                prog.epoch_seen += len(y)
                prog.step_in_epoch += 1
                prog.global_step += 1
                if bar is not None:
                    bar.update(1)
                checkpoint.fault_point("step", prog.global_step)
                if should_stop is not None and stop_agreed(accelerator, should_stop()):
                    prog.epoch_loss_sum = loss_sum.item()
                    prog.train_time_s += time.time() - epoch_start
                    save_checkpoint()
                    raise TrainingInterrupted(prog.global_step)
                if prog.global_step % config.checkpoint_every == 0 and prog.step_in_epoch < steps_per_epoch:
                    prog.epoch_loss_sum = loss_sum.item()
                    prog.train_time_s += time.time() - epoch_start
                    epoch_start = time.time()
                    save_checkpoint()
            epoch_time = time.time() - epoch_start
            prog.train_time_s += epoch_time
            # every rank saw its own shard: sum loss, correct and seen over ranks (a collective on all ranks)
            totals = torch.tensor([loss_sum.item(), prog.epoch_correct, prog.epoch_seen], device=device,
                                  dtype=torch.float64)
            loss_total, correct_total, seen_total = accelerator.reduce(totals, reduction="sum").tolist()
            if accelerator.is_main_process:
                row = {"epoch": prog.epoch, "global_step": prog.global_step,
                       "train_loss": loss_total / (steps_per_epoch * world), "train_acc": correct_total / seen_total,
                       "lr": scheduler.get_last_lr()[0],
                       "images_per_s": seen_total / epoch_time if epoch_time > 0 else 0.0,
                       "step_time_s": epoch_time / steps_per_epoch,
                       **epoch_test_metrics(inner, test_loader, bayesian, prog.epoch)}
                prog.best_test_acc = max(prog.best_test_acc, row.get("test_acc_mean", row.get("test_acc", 0.0)))
                metrics.append(row)
                tracker.log_epoch(row, step=prog.global_step)
            prog.epoch += 1
            prog.step_in_epoch = prog.epoch_correct = prog.epoch_seen = 0
            prog.epoch_loss_sum = 0.0
            save_checkpoint()
            checkpoint.fault_point("epoch", prog.epoch)
        if bar is not None:
            bar.close()

        in_sync = ranks_in_sync(accelerator, inner)
        results: dict[str, Any] = {}
        if accelerator.is_main_process:
            ev = config.eval
            ood_loader = None
            if ev.ood is not None:
                ood_data = DataConfig(name=ev.ood, root=config.data.root, test_batch_size=config.data.test_batch_size)
                ood_loader = loader_for(ood_data, "test", seed=0, device=device)
            evaluation = evaluate(inner, test_loader, ev.num_samples, seed=ev.seed, ood_batches=ood_loader,
                                  score=ev.score)
            checkpoint.atomic_write_bytes(run_dir / "model.pt", lambda f: torch.save(inner.state_dict(), f))
            results = {
                "run_id": config.run_id, "sweep": config.sweep, "stage": config.stage,
                "config": config.to_dict(), "code_version": code_version(),
                "evaluation": evaluation,
                "train": {"epochs": prog.epoch, "global_steps": prog.global_step,
                          "best_test_acc": prog.best_test_acc, "kl_weight": kl_weight, "world_size": world,
                          "ranks_in_sync": in_sync},
                # timing differs between an interrupted and an uninterrupted run; everything else must not
                "timing": {"train_time_s": prog.train_time_s, "wall_time_s_this_segment": time.time() - wall_start},
            }
            checkpoint.atomic_write_json(results_path, results)
            tracker.finish(results)
        accelerator.wait_for_everyone()
        return results if accelerator.is_main_process else json.loads(results_path.read_text())
