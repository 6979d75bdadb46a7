"""Row 3: S-sample Monte-Carlo evaluation, per weight sample, against one deterministic forward pass.

`predict` draws each weight sample once and holds it for the whole test set (under parametrize.cached(),
so w = mu + sigma * eps is computed once per sample, not once per batch). Its cost per sample should
therefore be one forward pass of the plain net plus small per-sample work (drawing eps, softmax, entropy).
Test set: 1000 CIFAR-shaped synthetic images in 10 batches of 100, so that the caching matters.
"""

from __future__ import annotations

import torch

from asbatch.data import DeviceLoader, synthetic
from asbatch.evaluate import predict
from asbatch.models import build_model
from benchmarks.common import Row, interleaved

GOAL = 1.1
TEST_IMAGES = 1000
TEST_BATCH = 100


def run(quick: bool = False) -> Row:
    samples = 2 if quick else 3
    data = synthetic("test", image_shape=(3, 32, 32), n_test=TEST_IMAGES)
    batches = list(DeviceLoader(data, TEST_BATCH, train=False, augment=False, seed=0, device="cpu"))
    torch.manual_seed(0)
    bayes = build_model("resnet20", 10, bayesian=True)
    torch.manual_seed(0)
    plain = build_model("resnet20", 10, bayesian=False).eval()

    def bayesian_predict() -> None:
        predict(bayes, batches, num_samples=samples, seed=0)

    @torch.no_grad()
    def deterministic_pass() -> None:
        for x, _ in batches:
            plain(x)

    times = interleaved({"predict": bayesian_predict, "forward": deterministic_pass}, rounds=2 if quick else 5)
    times.per_unit("predict", samples)
    ratio = times.ratio("predict", "forward")
    note = (f"predict with S={samples} on {TEST_IMAGES} images in batches of {TEST_BATCH}: "
            f"{times.median('predict') * 1e3:.0f} ms per sample; "
            f"deterministic ResNet20 forward (eval, no_grad): {times.median('forward') * 1e3:.0f} ms; "
            f"{times.describe('predict', 'forward')}")
    return Row("3. predict per weight sample / deterministic pass", ratio, "x", f"<= {GOAL}x", ratio <= GOAL, note)
