"""`train(config, run_dir) -> results`: one run, start to finish, resuming from its newest checkpoint.

One Accelerator carries distribution (DDP over processes and nodes; gloo on CPU via `cpu=True`), mixed
precision and the grad scaler. The data order, augmentation and AS noise come from generators seeded by
(seed, epoch) or (seed, rank) whose state is checkpointed, so a run killed at any point and restarted ends
bitwise identical (CPU, fp32) to an uninterrupted one.
"""

from __future__ import annotations

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
from asbatch.fsutil import atomic_write_bytes, atomic_write_json
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
            atomic_write_bytes(path, lambda f: f.write("".join(k + "\n" for k in keep).encode()))

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


class Trainer:
    """What one run holds while it trains: the Accelerator, data, model, optimizer, schedule, generators and
    progress. `train` drives it epoch by epoch."""

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config, self.run_dir = config, run_dir
        self.accelerator = acc = fresh_accelerator(config)
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        if acc.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        acc.wait_for_everyone()
        self.train_loader = loader_for(config.data, "train", seed=config.seed, device=self.device,
                                       rank=self.rank, world_size=self.world)
        self.test_loader = loader_for(config.data, "test", seed=0, device=self.device)
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        torch.manual_seed(config.seed)  # same init on every rank
        model = build(config, self.train_loader.num_classes, self.train_loader.image_shape[0], run_dir)
        optimizer = make_optimizer(config, model.to(self.device).parameters())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(config, step / self.steps_per_epoch))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.inner = acc.unwrap_model(self.model)  # for the AS inner passes, evaluation and checkpoints
        adv = config.adversarial
        self.kl_weight = adv.kl_weight if adv.kl_weight is not None else 1.0 / (100 * self.train_loader.num_examples)
        self.eps_gen = torch.Generator(device=self.device).manual_seed(config.seed * 1_000_003 + self.rank)
        self.ckpt_root = run_dir / "checkpoints"
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        self.prog = Progress()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def resume(self) -> None:
        """Continue from the newest valid checkpoint, if any."""
        resumed = checkpoint.load_latest(self.ckpt_root, self.rank)
        if resumed is None:
            return
        shared, rank_state = resumed
        self.inner.load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        self.scheduler.load_state_dict(shared["scheduler"])
        if self.accelerator.scaler is not None and shared.get("scaler"):
            self.accelerator.scaler.load_state_dict(shared["scaler"])
        self.prog = Progress(**shared["progress"])
        if rank_state is not None:
            set_rng_state(rank_state, self.eps_gen)
        self.accelerator.print(f"resumed {self.run_dir.name} at epoch {self.prog.epoch} "
                               f"step {self.prog.step_in_epoch}")

    def save_checkpoint(self) -> None:
        """Collective: rank 0 saves the shared state, every rank its RNG states."""
        shared = None
        if self.is_main:
            scaler = self.accelerator.scaler
            shared = {"model": self.inner.state_dict(), "optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict(), "progress": asdict(self.prog),
                      "scaler": scaler.state_dict() if scaler is not None else None}
        checkpoint.save(self.ckpt_root, self.prog.global_step, shared, rng_state(self.eps_gen), self.rank,
                        self.world, self.accelerator.wait_for_everyone, self.config.keep_checkpoints)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss, logits), detached.

        prepare() made the model's forward run under autocast (inner shares it), so there is no autocast
        context here: the backward passes inside as_step run outside autocast, as they should.
        """
        acc, adv = self.accelerator, self.config.adversarial
        if self.config.model.bayesian:
            scale = acc.scaler.get_scale() if acc.scaler is not None else 1.0
            out = as_step(self.model, x, y, lam=adv.lam, steps=adv.steps, alpha=adv.alpha,
                          kl_weight=self.kl_weight, inner_model=self.inner, backward=acc.backward,
                          no_sync=lambda: acc.no_sync(self.model), loss_scale=scale, generator=self.eps_gen)
            loss, logits = out.total, out.logits
        else:
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            acc.backward(loss)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss.item()} at global step {self.prog.global_step} (epoch "
                                     f"{self.prog.epoch}); the last good checkpoint in {self.ckpt_root} is kept")
        if self.config.optim.grad_clip:
            acc.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.detach(), logits.detach()

    def run_epoch(self, should_stop: Callable[[], bool] | None, bar) -> tuple[float, float]:
        """Train the rest of the current epoch (checkpointing every `checkpoint_every` steps); returns this
        rank's summed epoch loss and the seconds this segment spent on the epoch. Raises
        TrainingInterrupted after a checkpoint if asked to stop."""
        prog, started = self.prog, time.time()
        loss_sum = torch.tensor(prog.epoch_loss_sum, device=self.device)

        def checkpoint_mid_epoch() -> None:
            nonlocal started
            prog.epoch_loss_sum = loss_sum.item()
            prog.train_time_s += time.time() - started
            started = time.time()
            self.save_checkpoint()

        self.model.train()
        for x, y in self.train_loader.epoch(prog.epoch, prog.step_in_epoch):
            loss, logits = self.step(x, y)
            loss_sum += loss
            prog.epoch_correct += int((logits.argmax(1) == y).sum())
            prog.epoch_seen += len(y)
            prog.step_in_epoch += 1
            prog.global_step += 1
            if bar is not None:
                bar.update(1)
            checkpoint.fault_point("step", prog.global_step)
            if should_stop is not None and stop_agreed(self.accelerator, should_stop()):
                checkpoint_mid_epoch()
                raise TrainingInterrupted(prog.global_step)
            if prog.global_step % self.config.checkpoint_every == 0 and prog.step_in_epoch < self.steps_per_epoch:
                checkpoint_mid_epoch()
        epoch_time = time.time() - started
        prog.train_time_s += epoch_time
        return loss_sum.item(), epoch_time

    def epoch_metrics(self, loss_sum: float, epoch_time: float) -> dict[str, Any] | None:
        """The epoch's metrics row on rank 0 (None elsewhere; a collective, all ranks call it)."""
        prog = self.prog
        # every rank saw its own shard: sum loss, correct and seen over ranks (a collective on all ranks)
        totals = torch.tensor([loss_sum, prog.epoch_correct, prog.epoch_seen], device=self.device,
                              dtype=torch.float64)
        loss_total, correct_total, seen_total = self.accelerator.reduce(totals, reduction="sum").tolist()
        row = None
        if self.is_main:
            row = {"epoch": prog.epoch, "global_step": prog.global_step,
                   "train_loss": loss_total / (self.steps_per_epoch * self.world),
                   "train_acc": correct_total / seen_total, "lr": self.scheduler.get_last_lr()[0],
                   "images_per_s": seen_total / epoch_time if epoch_time > 0 else 0.0,
                   "step_time_s": epoch_time / self.steps_per_epoch,
                   **epoch_test_metrics(self.inner, self.test_loader, self.config.model.bayesian, prog.epoch)}
            prog.best_test_acc = max(prog.best_test_acc, row.get("test_acc_mean", row.get("test_acc", 0.0)))
        return row

    def finish_epoch(self) -> None:
        """Mark the epoch done and checkpoint. Call it after the epoch's metrics are written: a run killed
        right after this checkpoint never re-runs the epoch, so its row must already be on disk."""
        prog = self.prog
        prog.epoch += 1
        prog.step_in_epoch = prog.epoch_correct = prog.epoch_seen = 0
        prog.epoch_loss_sum = 0.0
        self.save_checkpoint()
        checkpoint.fault_point("epoch", prog.epoch)

    def results(self, wall_start: float) -> dict[str, Any]:
        """Rank 0: the final S-sample evaluation, model.pt, and the results dict (collective: all call it)."""
        in_sync = ranks_in_sync(self.accelerator, self.inner)
        if not self.is_main:
            return {}
        config, ev = self.config, self.config.eval
        ood_loader = None
        if ev.ood is not None:
            ood_data = DataConfig(name=ev.ood, root=config.data.root, test_batch_size=config.data.test_batch_size)
            ood_loader = loader_for(ood_data, "test", seed=0, device=self.device)
        evaluation = evaluate(self.inner, self.test_loader, ev.num_samples, seed=ev.seed, ood_batches=ood_loader,
                              score=ev.score)
        atomic_write_bytes(self.run_dir / "model.pt", lambda f: torch.save(self.inner.state_dict(), f))
        prog = self.prog
        return {
            "run_id": config.run_id, "sweep": config.sweep, "stage": config.stage,
            "config": config.to_dict(), "code_version": code_version(),
            "evaluation": evaluation,
            "train": {"epochs": prog.epoch, "global_steps": prog.global_step, "best_test_acc": prog.best_test_acc,
                      "kl_weight": self.kl_weight, "world_size": self.world, "ranks_in_sync": in_sync},
            # timing differs between an interrupted and an uninterrupted run; everything else must not
            "timing": {"train_time_s": prog.train_time_s, "wall_time_s_this_segment": time.time() - wall_start},
        }


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
    trainer = Trainer(config, run_dir)
    trainer.resume()
    prog, main = trainer.prog, trainer.is_main
    metrics = MetricsLog(run_dir / "metrics.jsonl", prog.epoch) if main else None
    bar = None
    if progress_bar and main:
        from tqdm import tqdm

        bar = tqdm(total=config.schedule.epochs * trainer.steps_per_epoch, initial=prog.global_step,
                   desc=run_dir.name, unit="step", leave=False, disable=None)  # no bar off a terminal
    # the W&B run is closed (as failed) if anything below raises, so a requeued segment can continue it
    with Tracker(config, run_dir, enabled=main) as tracker:
        while trainer.prog.epoch < config.schedule.epochs:
            row = trainer.epoch_metrics(*trainer.run_epoch(should_stop, bar))
            if row is not None:
                metrics.append(row)
                tracker.log_epoch(row, step=row["global_step"])
            trainer.finish_epoch()
        if bar is not None:
            bar.close()
        results = trainer.results(wall_start)
        if main:
            atomic_write_json(results_path, results)
            tracker.finish(results)
    trainer.accelerator.wait_for_everyone()
    return results if main else json.loads(results_path.read_text())
