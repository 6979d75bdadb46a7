"""Rows 10-12: what one optimizer step asks of the host: aten ops (a GPU's kernel launches), host reads of
device values (a GPU's syncs), and host CPU time at a tiny batch and width (the launch-bound floor).

Counted over the real training loop: a `Trainer` (asbatch.train.trainer) runs whole epochs of a Bayesian
ResNet20 (width 16, as on CIFAR; the op count does not depend on width or image size) on the bundled digits,
CPU, one thread. A `TorchDispatchMode` counts every aten op that is not a pure view (each is a kernel launch
on a GPU; the backward's ops included), a `TorchFunctionMode` counts item / tolist / bool / int / float / cpu /
numpy on tensors (each is a device-to-host read that waits for the GPU). Per step = over an epoch of
`STEPS` steps, divided by `STEPS`: the loop's per-epoch reads (the epoch's loss sum) are spread over them,
and host reads are also given per epoch. The final evaluation and the epoch-end metrics are not counted.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from asbatch.opcount import HostReadCounter, OpCounter
from benchmarks.common import Row

STEPS = 8  # optimizer steps per counted epoch
BATCH = 64

# aten ops per optimizer step (optimizer included) before the flat posterior, measured by this file on the
# code of commit 15e4833 (the issue counted 6,484 / 2,744 / 668 with its own counter)
GOALS = {"as": 1100, "plain": 300, "deterministic": 200}


def _config(kind: str, precision: str, batch: int = BATCH, variant: str = "paper", width: int = 16,
            channels_last: bool = False):
    from asbatch.config import RunConfig

    lam = {"as": 0.8, "plain": 0.0, "deterministic": 0.0}[kind]
    speed = {"speed": {"channels_last": True}} if channels_last else {}  # so that older trees run this file too
    return RunConfig.model_validate({
        "sweep": "bench", "cpu": True, "precision": precision, "checkpoint_every": 10**9,
        "data": {"name": "digits", "batch_size": batch, "train_subset": batch * STEPS, "test_subset": 64},
        "model": {"name": "resnet20", "width": width, "bayesian": kind != "deterministic"},
        "schedule": {"name": "cosine", "epochs": 3},
        "adversarial": {"lam": lam, "steps": 5, "alpha": 0.02, "variant": variant}, **speed})


def _trainer(config, root: Path):
    from asbatch.rundir import RunDir
    from asbatch.train.trainer import Trainer

    trainer = Trainer(config, RunDir(root / config.run_id))
    trainer.run_epoch(None, None)  # warm-up: optimizer state, allocator
    trainer.prog.epoch += 1
    trainer.prog.step_in_epoch = 0
    return trainer


def count_step(kind: str, precision: str = "no", variant: str = "paper",
               channels_last: bool = False) -> tuple[float, float, OpCounter]:
    """(aten ops per step, host reads per epoch of STEPS steps, the op counter) of one counted epoch."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(_config(kind, precision, variant=variant, channels_last=channels_last), Path(tmp))
        ops, reads = OpCounter(), HostReadCounter()
        with reads, ops:
            trainer.run_epoch(None, None)
        return ops.total / STEPS, reads.total, ops


def host_time_per_step(kind: str, rounds: int, width: int = 16) -> float:
    """Median process CPU time of one epoch / STEPS at batch 2 (the host's work per step, not the math's)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(_config(kind, "no", batch=2, width=width), Path(tmp))
        times = []
        for _ in range(rounds):
            trainer.prog.epoch += 1
            trainer.prog.step_in_epoch = 0
            start = time.process_time()
            trainer.run_epoch(None, None)
            times.append((time.process_time() - start) / STEPS)
        return sorted(times)[len(times) // 2]


def top_ops(counter: OpCounter, n: int = 6) -> str:
    return ", ".join(f"{name} {count / STEPS:.0f}" for name, count in counter.ops.most_common(n))


def run(quick: bool = False) -> list[Row]:
    rows = []
    for precision in ("no", "bf16"):
        label = "fp32" if precision == "no" else precision
        for kind in ("as", "plain", "deterministic"):
            per_step, reads, counter = count_step(kind, precision)
            goal = GOALS[kind]
            rows.append(Row(f"10. aten ops per {kind} step, {label}", per_step, "ops", f"<= {goal}",
                            per_step <= goal, f"optimizer included; most frequent: {top_ops(counter)}",
                            extra={"reads": reads}))
    per_step, _, counter = count_step("as", variant="reference")
    rows.append(Row("10. aten ops per AS step, reference variant, fp32", per_step, "ops", "- (info)", None,
                    f"optimizer included; most frequent: {top_ops(counter)}"))
    per_step, _, counter = count_step("as", "bf16", channels_last=True)
    rows.append(Row("10. aten ops per AS step, bf16, speed.channels_last", per_step, "ops", f"<= {GOALS['as']}",
                    per_step <= GOALS["as"], f"the NHWC flat layout adds no copy; most frequent: {top_ops(counter)}"))
    for kind, precision in (("as", "no"), ("as", "fp16")):
        _, reads, _ = count_step(kind, precision)
        label = "fp32" if precision == "no" else precision
        rows.append(Row(f"11. host reads per {STEPS}-step epoch, AS, {label}", reads, "reads",
                        "<= 2 (the epoch-end poll and tally; 0 in the steps)", reads <= 2,
                        "item / tolist / bool / int / float / cpu / numpy on tensors inside Trainer.run_epoch "
                        "(speed.poll_every 50 > steps: no poll inside the epoch)"))
    rounds = 3 if quick else 7
    times = {(kind, width): host_time_per_step(kind, rounds, width) for kind in ("as", "deterministic")
             for width in (2, 16)}
    for width in (2, 16):
        ratio = times["as", width] / times["deterministic", width]
        rows.append(Row(f"12. host CPU time per AS step, batch 2, width {width}", times["as", width] * 1e3, "ms",
                        "- (info)", None,
                        f"process CPU time of an epoch / steps (one thread); a deterministic step: "
                        f"{times['deterministic', width] * 1e3:.1f} ms, so the AS step costs {ratio:.1f}x (N + 1 = 6 "
                        f"passes); at batch 2 (and width 2) the math is small, so this is mostly the host's work "
                        f"per step: what a GPU would wait for"))
    return rows
