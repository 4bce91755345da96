"""CUDA graphs of the decode step: captured once per key (cache length, sampling, ...), then replayed.

A decode step has fixed shapes [B, 1] and attends over the first L slots, L rounded up to the
engine's kv_block, so one graph per L serves every step of that length. Capture is an optimisation:
when it fails, `fallback` may change how the step runs and ask for another try (the engine first
drops its second stream), and after that the step runs eagerly, with a warning.
"""
from __future__ import annotations

import warnings
from typing import Callable, Hashable

import torch

from ple_fast.engine.cache import DecodeState


class DecodeGraphs:
    def __init__(self):
        self.enabled = True
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self._pool = None

    def clear(self) -> None:
        """Forget every graph (the buffers or weights they read have moved)."""
        self._graphs.clear()
        self._pool = None

    def run(self, key: Hashable, step: Callable[[], None], state: DecodeState,
            fallback: Callable[[Exception], bool]) -> None:
        """One step: the graph of `key` replayed (captured first if new), else `step` eagerly."""
        graph = self._graphs.get(key) if self.enabled else None
        if graph is None and self.enabled:
            graph = self._capture(key, step, state, fallback)
        if graph is not None:
            graph.replay()
        else:
            step()

    def _capture(self, key, step, state: DecodeState, fallback) -> torch.cuda.CUDAGraph | None:
        saved = state.snapshot()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):        # warm-up: lazy inits (cuBLAS, compiles) stay out of the graph
                step()
            torch.cuda.current_stream().wait_stream(side)
            state.restore(saved)                 # the warm-up's K/V writes are the same ones the real step makes
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                step()
        except Exception as err:                 # noqa: BLE001 - capture is an optimisation
            torch.cuda.synchronize()
            state.restore(saved)
            if fallback(err):
                return self._capture(key, step, state, fallback)
            warnings.warn(f"rollout engine: CUDA graph capture failed ({err!r}); decoding eagerly")
            self.enabled = False
            return None
        self._graphs[key] = graph
        return graph
