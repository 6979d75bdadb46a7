"""Small models and batches shared by tests (importable by spawned worker processes)."""

from __future__ import annotations

import torch
from torch import nn

from asbatch.bayes import make_bayesian


def conv_bnn_and_batch(n: int = 8):
    """A tiny Bayesian conv net with BatchNorm, and a fixed batch of 2x4x4 inputs with 3 classes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 3))
    make_bayesian(net, init_sigma=0.1).train()
    g = torch.Generator().manual_seed(1)
    return net, torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def tiny_digits_config(sweep: str, **over):
    """A one-epoch Bayesian MLP on 320 digits (a few seconds): for tests that need real finished runs."""
    from asbatch.config import RunConfig

    base = {"sweep": sweep, "data": {"name": "digits", "batch_size": 64, "test_batch_size": 360, "train_subset": 320},
            "model": {"name": "mlp", "init_sigma": 0.01}, "optim": {"lr": 0.003},
            "schedule": {"name": "cosine", "epochs": 1}, "eval": {"num_samples": 3}}
    base.update(over)
    return RunConfig.model_validate(base)
