"""A dispatch mode that records where a step reads device data on the host, shared by the tests of the
fused training step and of the trainer's micro-batches."""
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """The ops that read device data on the host (on a GPU, each waits for the queue to drain) and the
    model's embedding ops (where a forward starts), in order, each with the number of ops dispatched
    before it."""
    READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "allclose"}

    def __init__(self):
        super().__init__()
        self.events, self.ops = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.READS or name == "embedding":
            self.events.append((name, self.ops))
        self.ops += 1
        return func(*args, **(kwargs or {}))

    @property
    def reads(self) -> list[tuple[str, int]]:
        return [(name, at) for name, at in self.events if name != "embedding"]

    @property
    def forward_starts(self) -> int:
        """Ops dispatched before the first embedding."""
        return next(at for name, at in self.events if name == "embedding")
