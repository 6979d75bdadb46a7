"""Mean-field Gaussian Bayesian layers whose noise eps can be sampled, fixed, or perturbed.

A Bayesian layer here is an ordinary `nn.Conv2d` / `nn.Linear` / `nn.BatchNorm2d` whose `weight` and `bias`
carry a `GaussianWeight` parametrization (torch.nn.utils.parametrize): the stored parameter becomes mu and
the layer sees w = mu + sigma * eps. One model definition therefore serves both the deterministic and the
Bayesian net, and a trained deterministic net becomes its Bayesian twin in place (Bayesian fine-tune).
"""

from asbatch.bayes.flat import FlatPosterior, flat_posterior
from asbatch.bayes.gaussian import GaussianWeight
from asbatch.bayes.noise import (
    BAYESIAN_LAYER_TYPES,
    bayesian_weights,
    frozen_bn_stats,
    get_noise,
    is_bayesian,
    kl_divergence,
    load_deterministic_state,
    make_bayesian,
    noise_mode,
    sample_noise,
    set_noise,
    set_noise_mode,
)

__all__ = [
    "BAYESIAN_LAYER_TYPES",
    "FlatPosterior",
    "GaussianWeight",
    "bayesian_weights",
    "flat_posterior",
    "frozen_bn_stats",
    "get_noise",
    "is_bayesian",
    "kl_divergence",
    "load_deterministic_state",
    "make_bayesian",
    "noise_mode",
    "sample_noise",
    "set_noise",
    "set_noise_mode",
]
