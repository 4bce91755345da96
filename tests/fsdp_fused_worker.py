"""One rank of test_distributed's FSDP2 check of the one-node fused training layer (run by torchrun).

Every rank runs the same packed dual batch through an FSDP2-sharded tiny model (ple_fast.distributed's
shard_model) and through an unsharded copy, both with the fused layers on the `triton` tree attention,
takes an SGD step on each and runs the batch again. The sharded run must take the one-node path
(_PackedTrainingLayer) on the weights FSDP2 gathered, and give the copy's log-probs and gradients:
FSDP2 averages the ranks' gradients, which are the same here.

    torchrun --nproc_per_node 2 tests/fsdp_fused_worker.py FAMILY [FAMILY ...]
"""
from __future__ import annotations

import copy
import os
import random
import sys
import warnings

if not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"     # before anything imports the kernels (CPU: the interpreter)

import torch                                 # noqa: E402
import torch.distributed as dist             # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_dual_forward                     # noqa: E402
import ple_fast.fused_layers as fused_layers  # noqa: E402
from ple_fast.distributed import reshard, shard_model  # noqa: E402
from ple_fast.forward import dual_response_rows  # noqa: E402
from ple_fast.plan import forward_plan  # noqa: E402


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def step(model, pairs, weights):
    """Log-probs and full gradients of sum_i w_i logp_i, then an SGD step on them; the plan resolved for
    the (sharded or plain) model, as the trainer's is."""
    model.zero_grad(set_to_none=True)       # before the forward, as the trainer's steps leave it
    plan = forward_plan(model, layout="packed", attention="triton", layers="fused")
    rows = dual_response_rows(model, plan, *pairs)
    logps, _ = test_dual_forward.logps_and_grads(model, rows, weights)
    grads = {n: full(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.5)
    return logps, grads


def check(family: str, calls: list) -> str:
    torch.manual_seed(0)
    sharded = test_dual_forward.tiny_model(family, layers=2)
    single = copy.deepcopy(sharded)
    shard_model(sharded)
    pairs = test_dual_forward.random_pairs(random.Random(11), 3)
    weights = torch.randn(6, generator=torch.Generator().manual_seed(11))
    calls.clear()
    for _ in range(2):                  # the second pass runs on the weights the SGD step updated
        got_logps, got_grads = step(sharded, pairs, weights)
        reshard(sharded)
        want_logps, want_grads = step(single, pairs, weights)
        assert not torch.isnan(got_logps).any()
        assert torch.equal(got_logps, want_logps), (got_logps, want_logps)
        assert got_grads.keys() == want_grads.keys() and got_grads, (got_grads.keys(), want_grads.keys())
        for name, want in want_grads.items():
            torch.testing.assert_close(got_grads[name], want, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
    want_calls = 2 * 2 * len(single.model.layers)           # 2 passes x (sharded, single) x layers
    assert len(calls) == want_calls, f"{family}: the one-node layer ran {len(calls)} times, want {want_calls}"
    return f"ok {family}: {len(got_grads)} gradients, one-node layer ran {len(calls)} times"


def main() -> None:
    # FSDP2 warns when a layer returns a view (an in-place op on it would drop the pre-backward hook)
    warnings.filterwarnings("error", message=".*returned a view tensor.*")
    dist.init_process_group("gloo")
    calls = []
    forward = fused_layers._PackedTrainingLayer.forward

    def counted(ctx, *args):
        calls.append(1)
        return forward(ctx, *args)

    fused_layers._PackedTrainingLayer.forward = staticmethod(counted)
    for family in sys.argv[1:]:
        line = check(family, calls)
        if dist.get_rank() == 0:
            print(line, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
