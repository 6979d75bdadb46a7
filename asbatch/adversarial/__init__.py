"""Adversarial Sampling (Zhang et al., AAAI 2022): perturb the weight noise eps by sign-gradient ascent.

Two variants of the training step (`adversarial.variant` in a run's config):
  - `paper` (`as_step`): the paper's equations, each ascent step on the current gradient;
  - `reference` (`reference_as_step`): what the reference code AISIGSJTU/AS does, run-long accumulated
    eps gradients (`AscentMemory`) and all; see `asbatch.adversarial.reference` for its rules.
"""

from asbatch.adversarial.paper import StepLosses, adversarial_noise, as_step, ascend
from asbatch.adversarial.reference import AscentMemory, reference_as_step

VARIANTS: tuple[str, ...] = ("paper", "reference")

__all__ = ["VARIANTS", "AscentMemory", "StepLosses", "adversarial_noise", "as_step", "ascend", "reference_as_step"]
