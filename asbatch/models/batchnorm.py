"""BatchNorm2d for asbatch's models: nn.BatchNorm2d's numbers and state_dict, with fewer ops per forward.

Why: on a GPU a small network's step is bound by how many kernels the host launches (the GPU road), and
nn.BatchNorm2d adds two per layer per training forward that do no normalising:
  - each layer bumps its own `num_batches_tracked` (one `add_` each; 19 per ResNet20 pass). Here the model
    bumps all its layers' counters in one `_foreach_add_` before its forward (`count_batches_together`);
  - on CPU, F.batch_norm runs `native_batch_norm` and also allocates an unused reserve tensor each call.
    Calling `native_batch_norm` directly gives the same numbers without it. CUDA keeps F.batch_norm (cuDNN,
    which has no such tensor).
A layer whose counter the model does not bump (built outside `count_batches_together`, or with momentum None,
whose running average reads the counter) behaves exactly as nn.BatchNorm2d.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_LAYERS = "_batch_counted_layers"  # model.__dict__: the layers whose counters the model bumps


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose batch counter the model bumps together with its siblings' (see the module doc)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.momentum is None or not self.__dict__.get("_counted_by_model", False):
            return super().forward(input)
        self._check_input_dim(input)
        # as nn.BatchNorm2d with momentum set, less the counter's add_ (the model's pre-hook did it)
        training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        if input.device.type != "cpu":
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, training,
                                self.momentum, self.eps)
        if training:
            F._verify_batch_size(input.size())
        return torch.native_batch_norm(input, self.weight, self.bias, running_mean, running_var, training,
                                       self.momentum, self.eps)[0]


def count_batches_together(model: nn.Module) -> nn.Module:
    """Bump the batch counters of `model`'s BatchNorm2d layers in one op per training forward (in place)."""
    layers = [m for m in model.modules() if isinstance(m, BatchNorm2d) and m.num_batches_tracked is not None]
    if layers:
        for layer in layers:
            layer.__dict__["_counted_by_model"] = True
        model.__dict__[_LAYERS] = layers
        model.register_forward_pre_hook(_count_batch)
    return model


@torch.compiler.disable  # one op either way; compiled, it would be a graph of its own, guarded on every flag
def _count_batch(model: nn.Module, args: Any) -> None:
    """Forward pre-hook: +1 on the counter of every layer that will update its running statistics."""
    counters = [m.num_batches_tracked for m in model.__dict__[_LAYERS]
                if m.training and m.track_running_stats and m.momentum is not None]
    if counters:
        torch._foreach_add_(counters, 1)
