"""One run while it trains: Accelerator, data, model, optimizer, schedule, generators and progress.

The data order, augmentation and AS noise come from generators seeded by (seed, epoch) or (seed, rank)
whose state is checkpointed, so a run killed at any point and restarted ends bitwise identical (CPU, fp32)
to an uninterrupted one.

A step reads nothing from the device (on a GPU each read would wait for the queued kernels): the loss sum,
correct counts and skipped fp16 steps add up in a device tally, and each step's loss finiteness is written
to a device window. Every `speed.poll_every` steps, before every checkpoint and at the epoch end, one read
(`poll`) checks the window (a NaN never reaches a checkpoint; the message names the first bad step) and,
with several ranks, agrees on stopping in the same all-reduce.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from asbatch.adversarial import AscentMemory, as_step, reference_as_step
from asbatch.bayes import noise_mode, sample_noise
from asbatch.config import DataConfig, RunConfig
from asbatch.data import DeviceLoader, loader_for
from asbatch.evaluate import evaluate
from asbatch.fsutil import atomic_write_bytes
from asbatch.names import EPOCH_SAMPLE_STREAM, derived_seed
from asbatch.rundir import RunDir, SweepDir
from asbatch.runshape import epoch_test_acc
from asbatch.train import checkpoint, legacy
from asbatch.train.faults import kill_point, nan_loss
from asbatch.train.setup import (
    autocast_dtype,
    autocast_forward,
    build,
    code_version,
    full_precision,
    lr_factor,
    make_accelerator,
    make_optimizer,
    make_scaler,
    rng_state,
    set_rng_state,
)
from asbatch.train.tally import DeviceTally


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stops and its last good checkpoint is kept."""


class CheckpointMismatchError(RuntimeError):
    """The run's newest checkpoint holds states this run's model / optimizer cannot take (copied in by hand)."""


class TrainingInterrupted(Exception):
    """`should_stop` asked to stop (preemption, time limit): every rank saved a checkpoint at `step`."""

    def __init__(self, step: int):
        super().__init__(f"stopped at global step {step} after saving a checkpoint; rerun to resume")
        self.step = step
        self.where = f"global step {step}"  # `train` says it in epochs and steps


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
    epoch_time_s: float = 0.0  # seconds spent on the current epoch, over all segments
    skipped_steps: int = 0      # fp16: optimizer steps the grad scaler skipped (inf / NaN gradients)
    epoch_correct_adv: int = 0  # correct predictions of the adversarial pass (lambda > 0)


@torch.no_grad()
def test_accuracy(model: nn.Module, loader: DeviceLoader) -> float:
    """Accuracy over the loader, counted on the device: one host read at the end, not one per batch."""
    correct, total = None, 0
    was_training = model.training
    model.eval()
    for x, y in loader:
        hits = (model(x).argmax(1) == y).sum()
        correct = hits if correct is None else correct + hits
        total += len(y)
    model.train(was_training)
    return int(correct) / total


def epoch_test_metrics(model: nn.Module, loader: DeviceLoader, bayesian: bool, epoch: int) -> dict[str, float]:
    """Test accuracy with the mean weights and with one weight sample (seeded by the epoch)."""
    if not bayesian:
        return {"test_acc": test_accuracy(model, loader)}
    with noise_mode(model, "mean"):
        mean_acc = test_accuracy(model, loader)
    with noise_mode(model, "fixed"):
        device = next(model.parameters()).device  # drawn where the model is: no host-to-device copy
        sample_noise(model, torch.Generator(device=device).manual_seed(derived_seed(0, EPOCH_SAMPLE_STREAM + epoch)))
        sample_acc = test_accuracy(model, loader)
    return {"test_acc_mean": mean_acc, "test_acc_sample": sample_acc}


def compiled(model: nn.Module, inner: nn.Module) -> tuple[nn.Module, nn.Module]:
    """`torch.compile` of the training model (DDP-wrapped or not) and of the unwrapped one the AS inner passes
    use (one compiled module when they are the same). Dynamo traces the flat posterior's hooks too, so each kind
    of pass (prediction, inner, adversarial) becomes one graph, compiled in the first steps and reused after."""
    torch._dynamo.reset()  # graphs of an earlier run in this process (`asbatch run` trains several) fill the cache
    outer = torch.compile(model)
    return outer, outer if inner is model else torch.compile(inner)


def ranks_in_sync(accelerator, model: nn.Module) -> bool:
    """Do all ranks hold the same parameters? (A cheap end-of-run check that DDP kept them together.)"""
    with torch.no_grad():
        digest = torch.stack([p.double().sum() for p in model.parameters()]).unsqueeze(0)
    gathered = accelerator.gather(digest.to(accelerator.device))
    return bool((gathered == gathered[0]).all())


class Trainer:
    """What one run holds while it trains; `train` drives it epoch by epoch."""

    def __init__(self, config: RunConfig, run_dir: RunDir):
        self.config, self.run_dir = config, run_dir
        self.accelerator = acc = make_accelerator(config)
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        if acc.is_main_process:
            run_dir.write_config(config.to_dict())
        acc.wait_for_everyone()
        nhwc = config.speed.channels_last
        self.train_loader = loader_for(config.data, "train", seed=config.seed, device=self.device,
                                       rank=self.rank, world_size=self.world, channels_last=nhwc)
        self.test_loader = loader_for(config.data, "test", seed=0, device=self.device, channels_last=nhwc)
        self.ood_loader = self._ood_loader()
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        torch.manual_seed(config.seed)  # same init on every rank
        sweep_dir = SweepDir.at(run_dir.path.parent.parent, config.sweep)
        model = build(config, self.train_loader.num_classes, self.train_loader.image_shape[0], sweep_dir)
        model = autocast_forward(model.to(self.device), self.device, autocast_dtype(config, self.device))
        self.optimizer = make_optimizer(config, model.parameters())
        self.scaler = make_scaler(config, self.device)
        dtype = autocast_dtype(config, self.device)
        self.precision_ran = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(config, step / self.steps_per_epoch))
        self.model = acc.prepare(model)
        self.inner = acc.unwrap_model(self.model)  # for the AS inner passes, evaluation and checkpoints
        # what the training step calls: the same modules, compiled with `speed.compile` (evaluation stays eager)
        self.step_model, self.step_inner = compiled(self.model, self.inner) if config.speed.compile else (
            self.model, self.inner)
        adv = config.adversarial
        self.kl_weight = adv.kl_weight if adv.kl_weight is not None else 1.0 / (100 * self.train_loader.num_examples)
        self.eps_gen = torch.Generator(device=self.device).manual_seed(derived_seed(config.seed, self.rank))
        # the reference variant's run-long eps-gradient accumulator: per rank, saved with the rank's state
        reference = config.model.bayesian and adv.variant == "reference"
        self.memory = AscentMemory.zeros_for(self.inner) if reference else None
        run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
        self.prog = Progress()
        self.poll_every = config.speed.poll_every
        self.tally = DeviceTally(self.device, self.poll_every)
        self._one = torch.ones((), device=self.device)  # scaler.scale(one): the fp16 scale, without a host read

    def _ood_loader(self) -> DeviceLoader | None:
        """The final evaluation's OOD test set, loaded before training on every rank (so a missing one fails
        every rank at the start, not rank 0 after the last epoch), held on the device by rank 0 only."""
        if self.config.eval.ood is None:
            return None
        data = DataConfig(name=self.config.eval.ood, root=self.config.data.root,
                          test_batch_size=self.config.data.test_batch_size)
        loader = loader_for(data, "test", seed=0, device=self.device if self.is_main else "cpu",
                            channels_last=self.config.speed.channels_last)
        loader.mean, loader.std = self.test_loader.mean, self.test_loader.std  # normalised as the model's inputs
        return loader if self.is_main else None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def has_adversarial_pass(self) -> bool:
        return self.config.model.bayesian and self.config.adversarial.lam > 0

    def resume(self) -> None:
        """Continue from the newest valid checkpoint, if any."""
        resumed = checkpoint.load_latest(self.run_dir.checkpoints, self.rank)
        if resumed is None:
            return
        ckpt, shared, rank_state = resumed
        try:
            self._load_states(shared, rank_state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:  # another model, optimizer, variant...
            reason = " ".join(str(err).split())
            raise CheckpointMismatchError(
                f"{ckpt}: this checkpoint does not fit the run's config, so it was not written by this run "
                f"({type(err).__name__}: {reason[:300]}); move the run's checkpoints away to train it afresh"
            ) from err

    def _load_states(self, shared: dict[str, Any], rank_state: dict[str, Any] | None) -> None:
        self.inner.load_state_dict(shared["model"])
        optimizer_state, notes = legacy.optimizer_state_for(self.inner, self.optimizer, shared)
        for why in [*notes, *legacy.speed_changes(self.config, shared)]:
            warnings.warn(why, stacklevel=2)
        self.optimizer.load_state_dict(optimizer_state)
        legacy.match_param_strides(self.optimizer)
        self.scheduler.load_state_dict(shared["scheduler"])
        if self.scaler is not None and shared.get("scaler"):
            self.scaler.load_state_dict(shared["scaler"])
        self.prog = Progress(**shared["progress"])
        if rank_state is not None:
            set_rng_state(rank_state, self.eps_gen)
            if self.memory is not None:
                self.memory.load_state_dict(rank_state["ascent_memory"])

    def save_checkpoint(self) -> None:
        """Collective: rank 0 saves the shared state, every rank its RNG states. The steps since the last poll
        are checked first (a non-finite loss raises: it never reaches a checkpoint) and their tally read."""
        self.poll(False)
        self.collect()
        shared = None
        if self.is_main:
            shared = {"model": self.inner.state_dict(), "optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict(), "progress": asdict(self.prog),
                      "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                      **legacy.checkpoint_record(self.config)}
        rank_state = rng_state(self.eps_gen)
        if self.memory is not None:
            rank_state["ascent_memory"] = self.memory.state_dict()
        checkpoint.save(self.run_dir.checkpoints, self.prog.global_step, shared, rank_state, self.rank,
                        self.world, self.accelerator.wait_for_everyone, self.config.keep_checkpoints)

    def _backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(self.scaler.scale(loss) if self.scaler is not None else loss)

    def agree(self, stop: bool, first_bad: torch.Tensor | None = None) -> tuple[bool, dict[int, int]]:
        """One read (with several ranks, in one all-reduce): does any rank want to stop, and which ranks saw a
        non-finite loss, at which global step ({rank: step}). Every rank gets the same answer, so all stop
        together (no rank waits in a collective for a dead one)."""
        if self.world == 1:
            step = int(first_bad) if first_bad is not None else 0
            return stop, {self.rank: step} if step else {}
        flags = torch.zeros(self.world + 1, device=self.device, dtype=torch.float64)
        flags[0] = float(stop)
        if first_bad is not None:
            flags[1 + self.rank] = first_bad
        flags = self.accelerator.reduce(flags, reduction="sum").tolist()
        return flags[0] > 0, {r: int(flags[1 + r]) for r in range(self.world) if flags[1 + r] > 0}

    def poll(self, stop: bool) -> bool:
        """Collective: check the losses of the steps since the last poll (NonFiniteLossError naming the first
        bad one) and agree on stopping; returns whether any rank asked to stop."""
        tally = self.tally
        if tally.pending == 0:
            return self.agree(stop)[0] if stop or self.world > 1 else False
        first_bad = tally.first_bad(self.prog.global_step - tally.pending + 1)
        tally.finite.fill_(True)
        tally.pending = 0
        stop, bad = self.agree(stop, first_bad)
        if bad:
            raise NonFiniteLossError(self._non_finite_message(bad))
        return stop

    def collect(self) -> None:
        """Move the device tally of the current epoch into the (checkpointed) progress: one host read."""
        loss, correct, correct_adv, skipped = self.tally.take()
        prog = self.prog
        prog.epoch_loss_sum += loss
        prog.epoch_correct += round(correct)
        prog.epoch_correct_adv += round(correct_adv)
        prog.skipped_steps += round(skipped)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One optimizer step; returns (loss, logits of a posterior sample, logits of the adversarial pass or
        None), detached. The forward runs under autocast (see `autocast_forward`); the backward passes inside
        the AS step run outside it, as they should. Reads nothing from the device: the loss's finiteness is
        checked at the next `poll`, before any checkpoint."""
        acc, adv = self.accelerator, self.config.adversarial
        adv_logits = None
        scale = self.scaler.scale(self._one) if self.scaler is not None else None  # a copy of the current scale
        if self.config.model.bayesian:
            fp32_inner = adv.inner_precision == "fp32" and autocast_dtype(self.config, self.device) is not None
            kwargs = {"lam": adv.lam, "steps": adv.steps, "alpha": adv.alpha, "kl_weight": self.kl_weight,
                      "inner_model": self.step_inner, "backward": self._backward,
                      "loss_scale": scale if scale is not None else 1.0,
                      "no_sync": lambda: acc.no_sync(self.model), "generator": self.eps_gen,
                      "inner_context": full_precision if fp32_inner else None}
            if self.memory is not None:
                out = reference_as_step(self.step_model, x, y, memory=self.memory, **kwargs)
            else:
                out = as_step(self.step_model, x, y, **kwargs)
            loss, logits, adv_logits = out.total, out.pred_logits, out.adv_logits
        else:
            logits = self.step_model(x)
            loss = F.cross_entropy(logits, y)
            self._backward(loss)
        if self.config.optim.grad_clip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient is inf / NaN; the scale then drops
            self.scaler.update()
            self.tally.sums[DeviceTally.SKIPPED].add_(self.scaler.scale(self._one) < scale)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the schedule follows the data position, skipped fp16 steps included
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"), UserWarning)
            self.scheduler.step()
        correct_adv = None if adv_logits is None else (adv_logits.argmax(1) == y).sum()
        self.tally.add_step(loss.detach(), (logits.argmax(1) == y).sum(), correct_adv,
                            force_bad=nan_loss(self.prog.global_step + 1, self.rank))
        return loss.detach(), logits.detach(), adv_logits

    def _non_finite_message(self, bad: dict[int, int]) -> str:
        last = checkpoint.latest_step(self.run_dir.checkpoints)
        kept = (f"the last good checkpoint (step {last}) in {self.run_dir.checkpoints} is kept" if last is not None
                else "no checkpoint was written before it")
        ranks = sorted(bad)
        where = "" if self.world == 1 else f" on rank {', '.join(map(str, ranks))} of {self.world}"
        epoch = self.prog.epoch + 1  # polls happen inside the epoch, so the bad step is in this one
        return f"loss is nan or inf{where} at global step {min(bad.values())} (epoch {epoch}); {kept}"

    def run_epoch(self, should_stop: Callable[[], bool] | None, bar) -> tuple[float, float]:
        """Train the rest of the current epoch (checkpointing every `checkpoint_every` steps); returns this
        rank's summed epoch loss and the seconds spent on the whole epoch (over all segments). Raises
        TrainingInterrupted after a checkpoint if asked to stop: at once with one rank, at the next poll
        (within `speed.poll_every` steps) with several."""
        prog, started = self.prog, time.time()

        def clock() -> None:  # move the time since `started` into the progress (checkpointed) counters
            nonlocal started
            now = time.time()
            prog.train_time_s += now - started
            prog.epoch_time_s += now - started
            started = now

        def checkpoint_mid_epoch() -> None:
            clock()
            self.save_checkpoint()

        self.model.train()
        if self.config.optim.reset_each_epoch and prog.step_in_epoch == 0:
            self.optimizer.state.clear()  # as a new optimizer (the reference re-creates Adam every epoch)
        for x, y in self.train_loader.epoch(prog.epoch, prog.step_in_epoch):
            self.step(x, y)
            prog.epoch_seen += len(y)
            prog.step_in_epoch += 1
            prog.global_step += 1
            if bar is not None:
                bar.update(1)
            kill_point("step", prog.global_step)
            want_stop = should_stop is not None and should_stop()
            checkpoint_due = (prog.global_step % self.config.checkpoint_every == 0
                              and prog.step_in_epoch < self.steps_per_epoch)
            if self.tally.pending >= self.poll_every or checkpoint_due or (want_stop and self.world == 1):
                if self.poll(want_stop):
                    checkpoint_mid_epoch()
                    raise TrainingInterrupted(prog.global_step)
                if checkpoint_due:
                    checkpoint_mid_epoch()
        self.poll(False)
        self.collect()
        clock()
        return prog.epoch_loss_sum, prog.epoch_time_s

    def epoch_metrics(self, loss_sum: float, epoch_time: float) -> dict[str, Any] | None:
        """The epoch's metrics row on rank 0 (None elsewhere; a collective, all ranks call it)."""
        prog = self.prog
        # every rank saw its own shard: sum loss, correct and seen over ranks (a collective on all ranks)
        totals = torch.tensor([loss_sum, prog.epoch_correct, prog.epoch_seen, prog.epoch_correct_adv],
                              device=self.device, dtype=torch.float64)
        loss_total, correct_total, seen_total, correct_adv = self.accelerator.reduce(totals, reduction="sum").tolist()
        row = None
        if self.is_main:
            row = {"epoch": prog.epoch, "global_step": prog.global_step,
                   "train_loss": loss_total / (self.steps_per_epoch * self.world),
                   "train_acc": correct_total / seen_total,
                   **({"train_acc_adv": correct_adv / seen_total} if self.has_adversarial_pass else {}),
                   "lr": self.scheduler.get_last_lr()[0],
                   "images_per_s": seen_total / epoch_time if epoch_time > 0 else 0.0,
                   "step_time_s": epoch_time / self.steps_per_epoch,
                   **epoch_test_metrics(self.inner, self.test_loader, self.config.model.bayesian, prog.epoch)}
            prog.best_test_acc = max(prog.best_test_acc, epoch_test_acc(row) or 0.0)
        return row

    def finish_epoch(self) -> None:
        """Mark the epoch done and checkpoint. Call it after the epoch's metrics are written: a run killed
        right after this checkpoint never re-runs the epoch, so its row must already be on disk."""
        prog = self.prog
        prog.epoch += 1
        prog.step_in_epoch = prog.epoch_correct = prog.epoch_seen = prog.epoch_correct_adv = 0
        prog.epoch_loss_sum = prog.epoch_time_s = 0.0
        self.save_checkpoint()
        kill_point("epoch", prog.epoch)

    def stop_if_asked(self, should_stop: Callable[[], bool] | None) -> None:
        """After an epoch-end checkpoint: stop there if any rank was asked to (collective)."""
        if should_stop is not None and self.agree(should_stop())[0]:
            raise TrainingInterrupted(self.prog.global_step)

    def results(self, wall_start: float, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Rank 0: the final S-sample evaluation, the final weights, and the results dict (collective: all
        ranks call it). The evaluation stops at the next batch when asked to; the epoch-end checkpoint is
        already written, so the resumed run redoes only the evaluation."""
        in_sync = ranks_in_sync(self.accelerator, self.inner)
        if not self.is_main:
            return {}

        def interrupt_if_asked() -> None:
            if should_stop is not None and should_stop():
                raise TrainingInterrupted(self.prog.global_step)

        config, ev = self.config, self.config.eval
        evaluation = evaluate(self.inner, self.test_loader, ev.num_samples, seed=ev.seed,
                              ood_batches=self.ood_loader, score=ev.score, on_batch=interrupt_if_asked)
        atomic_write_bytes(self.run_dir.model_file, lambda f: torch.save(self.inner.state_dict(), f))
        prog = self.prog
        return {
            "run_id": config.run_id, "sweep": config.sweep, "stage": config.stage,
            "config": config.to_dict(), "code_version": code_version(),
            "evaluation": evaluation,
            "train": {"epochs": prog.epoch, "global_steps": prog.global_step, "best_test_acc": prog.best_test_acc,
                      "kl_weight": self.kl_weight, "world_size": self.world, "ranks_in_sync": in_sync,
                      "precision": self.precision_ran, "device": self.device.type,
                      "compiled": self.config.speed.compile, "channels_last": self.config.speed.channels_last,
                      "skipped_steps": prog.skipped_steps},
            # timing differs between an interrupted and an uninterrupted run; everything else must not
            "timing": {"train_time_s": prog.train_time_s, "wall_time_s_this_segment": time.time() - wall_start},
        }
