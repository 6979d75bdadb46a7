"""Counting what code asks of the host: aten ops (a GPU's kernel launches) and reads of device values (syncs).

On a CPU these are what a GPU would pay per launch and per sync, so a step's launch and sync budget can be
measured and kept (tests, benchmarks) on a machine without one.

    with HostReadCounter() as reads, OpCounter() as ops:
        step()
    ops.total, ops.ops.most_common(5), reads.total
"""

from __future__ import annotations

import collections

from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# tensor methods that copy a device value to the host (each waits for the device's queue to drain)
HOST_READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"})


class OpCounter(TorchDispatchMode):
    """Counts aten ops that are not pure views, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class HostReadCounter(TorchFunctionMode):
    """Counts the tensor methods that copy a device value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.reads.values())
