"""The fast rollout engine: static KV cache, packed prefill, on-device sampling, CUDA-graph decode steps.

    cache.py           StaticKVCache (slot == position) and the DecodeState a step updates in place
    attention.py       the attention core swapped into the HF model while the engine runs
    prefill.py         the packed prefill: every prompt padding-free, the principle once
    sampling.py        torch sampling (top-k / top-p) and its oracles; the fused sampler is a kernel
    graphs.py          CUDA graphs of the decode step, one per cache length
    rollout_engine.py  RolloutEngine, which composes them; EngineOptions (ple_fast.plan) say how
"""
from ple_fast.engine.attention import ENGINE_ATTENTION
from ple_fast.engine.cache import DecodeState, StaticKVCache
from ple_fast.engine.rollout_engine import RolloutEngine, RolloutStats, cut_at_eos
from ple_fast.engine.sampling import candidate_probs, noise_width, reference_candidate_probs, sample_tokens

__all__ = ["ENGINE_ATTENTION", "DecodeState", "RolloutEngine", "RolloutStats", "StaticKVCache", "candidate_probs",
           "cut_at_eos", "noise_width", "reference_candidate_probs", "sample_tokens"]
