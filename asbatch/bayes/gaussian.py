"""One mean-field Gaussian weight: w = mu + sigma * eps, sigma = exp(log_sigma)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

NoiseMode = Literal["sample", "fixed", "mean"]
NOISE_MODES: tuple[str, ...] = ("sample", "fixed", "mean")


class GaussianWeight(nn.Module):
    """Parametrization mapping the stored mean mu to a weight sample mu + exp(log_sigma) * eps.

    sigma = exp(log_sigma), as in the reference code (AISIGSJTU/AS, after adv-bnn): unconstrained, and an
    init of log(0.15) equals the prior scale, so the KL starts from the mean term only. `init_log_sigma`,
    when given, is written into log_sigma as is (the reference writes 0.15 there: sigma = exp(0.15) ~ 1.16)
    and overrides `init_sigma`. Noise modes:
      - "sample": fresh eps ~ N(0, 1) on every access (plain BNN training),
      - "fixed":  the tensor in `self.eps` (set it; it may require grad, which AS uses),
      - "mean":   eps = 0, the weight is mu.
    eps is a plain attribute, not a buffer: it never enters state_dict and DDP never broadcasts it.

    In a model built by `make_bayesian` the layer's tensors live in the model's `FlatPosterior`
    (asbatch.bayes.flat): log_sigma and eps are views of its flat buffers, and during a model forward
    `current` holds this layer's slice of the w computed once for all layers.
    """

    def __init__(self, mu: torch.Tensor, init_sigma: float = 0.15, prior_sigma: float = 0.15,
                 init_log_sigma: float | None = None):
        super().__init__()
        if init_sigma <= 0 or prior_sigma <= 0:
            raise ValueError(f"init_sigma and prior_sigma must be > 0, got {init_sigma}, {prior_sigma}")
        log_sigma = math.log(init_sigma) if init_log_sigma is None else float(init_log_sigma)
        if not math.isfinite(log_sigma):
            raise ValueError(f"init_log_sigma must be finite, got {init_log_sigma}")
        self.log_sigma = nn.Parameter(torch.full_like(mu, log_sigma, dtype=torch.float32))
        self.prior_sigma = float(prior_sigma)
        self.mode: NoiseMode = "sample"
        self.eps: torch.Tensor | None = None
        self.current: torch.Tensor | None = None  # set by the model's FlatPosterior for one forward

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def forward(self, mu: torch.Tensor) -> torch.Tensor:
        if self.current is not None:
            return self.current
        if self.mode == "mean":
            return mu
        if self.mode == "sample":
            eps = torch.randn_like(mu)
        else:
            if self.eps is None:
                raise RuntimeError("noise mode is 'fixed' but no eps was set (use asbatch.bayes.set_noise)")
            eps = self.eps
        return mu + self.sigma * eps

    def kl(self, mu: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, sigma^2) || N(0, sigma_0^2)) summed over elements:
        log(sigma_0 / sigma) + (sigma^2 + mu^2) / (2 sigma_0^2) - 1/2.
        Computed in at least fp32: half-precision mu is promoted, float64 mu keeps float64."""
        var0 = self.prior_sigma**2
        mu = mu.to(torch.promote_types(mu.dtype, torch.float32))
        log_sigma = self.log_sigma.to(torch.promote_types(self.log_sigma.dtype, mu.dtype))
        per_element = math.log(self.prior_sigma) - log_sigma + (log_sigma.exp() ** 2 + mu**2) / (2 * var0) - 0.5
        return per_element.sum()

    def extra_repr(self) -> str:
        return f"prior_sigma={self.prior_sigma}, mode={self.mode}"
