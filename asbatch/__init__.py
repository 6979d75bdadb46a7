"""asbatch: train Bayesian neural networks with Adversarial Sampling at cluster scale."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("asbatch")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
