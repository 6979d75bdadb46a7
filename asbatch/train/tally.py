"""What the steps of a training loop add up on the device between host reads: sums and per-step finiteness.

A step of asbatch's loop reads nothing from the device (on a GPU a read waits for every queued kernel): the
trainer adds each step's loss, correct counts and skipped fp16 steps here, and writes whether its loss was
finite into a window; it reads them at poll points only (`Trainer.poll`, `Trainer.collect`).
"""

from __future__ import annotations

import torch


class DeviceTally:
    """What the steps since the last host read add up, on the device: loss sum, correct predictions of the
    prediction and adversarial passes, skipped fp16 steps, and one finiteness flag per step."""

    LOSS, CORRECT, CORRECT_ADV, SKIPPED = range(4)

    def __init__(self, device: torch.device, window: int):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.finite = torch.ones(window, dtype=torch.bool, device=device)
        self.pending = 0  # steps since the last poll (their flags are finite[:pending])

    def add_step(self, loss: torch.Tensor, correct: torch.Tensor, correct_adv: torch.Tensor | None,
                 force_bad: bool = False) -> None:
        self.sums[self.LOSS].add_(loss)
        self.sums[self.CORRECT].add_(correct)
        if correct_adv is not None:
            self.sums[self.CORRECT_ADV].add_(correct_adv)
        flag = self.finite[self.pending]
        if force_bad:  # fault injection (ASBATCH_FAULT=nan:...): this rank's loss counts as non-finite
            flag.fill_(False)
        else:
            flag.copy_(torch.isfinite(loss))
        self.pending += 1

    def first_bad(self, first_step: int) -> torch.Tensor:
        """On the device: the global step of the first non-finite loss since the last poll, 0 if none
        (`first_step` is the global step, from 1, of the first pending step)."""
        bad = ~self.finite[:self.pending]
        return torch.where(bad.any(), bad.int().argmax() + first_step, 0)

    def take(self) -> list[float]:
        """Read and reset the sums (one host read)."""
        values = self.sums.tolist()
        self.sums.zero_()
        return values
