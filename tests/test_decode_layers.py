"""Fused decode layers (ple_fast.decode_layers) and their glue kernels against the HF modules' own
arithmetic. CPU runs the kernels under TRITON_INTERPRET=1; the suite's `-m gpu` compiles them."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ple_fast.decode_layers import decode_hidden, unsupported_reason
from ple_fast.engine import RolloutEngine
from ple_fast.kernels.rms_norm import add_rms_norm, add_rms_norm_reference
from ple_fast.kernels.swiglu import silu_mul, silu_mul_reference
from ple_fast.rollout import generate, generate_dual
from test_rollout import NO_EOS, random_tokens, tiny_model

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> bool:
    """Elementwise |a - e| <= ulps units in the last place of e's dtype (relative); NaN fails."""
    assert actual.dtype == expected.dtype and not torch.isnan(actual).any()
    eps = torch.finfo(expected.dtype).eps
    a, e = actual.double(), expected.double()
    return bool(((a - e).abs() <= ulps * eps * e.abs() + torch.finfo(expected.dtype).tiny).all())


def glue_ulps(dtype: torch.dtype) -> int:
    """How far a fused glue kernel may land from HF's op sequence: one unit for bf16 / fp16 (the same
    fp32 math, rounded at the same points; a sum order may move one rounding), a few for fp32, whose
    rsqrt and exp round differently from torch's."""
    return 4 if dtype == torch.float32 else 1


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(actual).any()
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


# --------------------------------------------------------------------------------- the kernels

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(5, 80), (1, 64), (3, 2048), (4, 3000), (0, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_rounds_like_the_hf_modules(dtype, rows, hidden, with_residual):
    """The sum equals torch's add to the bit; the normed output is HF's op sequence within
    `glue_ulps`, and near fp64 math."""
    g = torch.Generator().manual_seed(rows * 7 + hidden)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype).to(DEVICE)
    residual = torch.randn(rows, hidden, generator=g).to(dtype).to(DEVICE) if with_residual else None
    weight = (1 + torch.randn(hidden, generator=g) * 0.1).to(dtype).to(DEVICE)
    out, summed = add_rms_norm(x, weight, 1e-6, residual)
    want_out, want_sum = add_rms_norm_reference(x, weight, 1e-6, residual)
    assert out.dtype == want_out.dtype == dtype and out.shape == x.shape
    assert torch.equal(summed, want_sum)
    assert within_ulps(out, want_out, glue_ulps(dtype))
    if rows:
        exact = want_sum.double() * torch.rsqrt(want_sum.double().pow(2).mean(-1, keepdim=True) + 1e-6)
        assert rel_err(out, exact * weight.double()) < 4 * torch.finfo(dtype).eps


def test_add_rms_norm_promotes_like_the_weight_multiply():
    """fp32 weights over bf16 activations give fp32 output, as `weight * normed.to(bf16)` does."""
    x = torch.randn(3, 48).to(torch.bfloat16).to(DEVICE)
    weight = torch.randn(48).to(DEVICE)
    out, _ = add_rms_norm(x, weight, 1e-5)
    want, _ = add_rms_norm_reference(x, weight, 1e-5)
    assert out.dtype == torch.float32
    assert within_ulps(out, want, glue_ulps(torch.float32))
    with pytest.raises(ValueError, match="do not match"):
        add_rms_norm(x, weight[:40], 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1500), (1, 8), (7, 256), (0, 16)])
def test_silu_mul_rounds_like_the_hf_mlp(dtype, shape):
    g = torch.Generator().manual_seed(shape[1])
    gate = (torch.randn(shape, generator=g) * 4).to(dtype).to(DEVICE)
    up = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    got = silu_mul(gate, up)
    assert got.dtype == dtype and got.shape == gate.shape
    assert within_ulps(got, silu_mul_reference(gate, up), glue_ulps(dtype))
    with pytest.raises(ValueError, match="differ"):
        silu_mul(gate, up.float() if dtype != torch.float32 else up.half())


# ---------------------------------------------------------------------------- the decode step

# Qwen2 with sliding layers after the first full one; a GELU Llama (its MLP glue stays in torch)
FAMILIES = [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 5}), ("qwen3", {}),
            ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
            ("llama", {"hidden_act": "gelu"})]


def family_model(family: str, extra: dict, dtype: torch.dtype = torch.float32):
    if family == "qwen3":
        import transformers

        config = transformers.Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          max_position_embeddings=256, initializer_range=0.3, pad_token_id=0,
                                          eos_token_id=2, bos_token_id=None, tie_word_embeddings=False, **extra)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = transformers.Qwen3ForCausalLM(config)
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    else:
        model = tiny_model(family, seed=4, **extra)
    return model.to(dtype).to(DEVICE)


def prepared_step(model, prompts, principle, prefixed, **engine_kw):
    """An engine after prefill and its first token: the state one decode step starts from (its
    output buffer sized for 2 tokens)."""
    engine = RolloutEngine(model, decode_attention="triton", cuda_graphs=False, **engine_kw)
    engine.generate(prompts, max_new_tokens=2, eos_token_ids=[NO_EOS], prefix=principle, prefixed=prefixed)
    engine.generate(prompts, max_new_tokens=1, eos_token_ids=[NO_EOS], prefix=principle, prefixed=prefixed)
    return engine


@pytest.mark.parametrize("family,extra", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_decode_step_equals_the_stock_layers(family, extra, dtype):
    """From the same cache and tokens, the fused step's final hidden states and the K/V it writes match
    the stock HF layers (with the same decode attention kernel): fp32 to 1e-5; bf16, where every glue
    op rounds as HF's does, to a few bf16 units of the final states."""
    model = family_model(family, extra, dtype).eval()
    assert unsupported_reason(model) is None
    prompts = random_tokens([3, 9, 1, 6], seed=61)
    principle = random_tokens([4], seed=62)[0]
    prefixed = [True, False, False, True]
    engine = prepared_step(model, prompts, principle, prefixed, fused_layers=False)
    st, cache = engine.state, engine.cache
    batch = len(prompts)
    kv_length = cache.capacity
    saved = (cache.keys.clone(), cache.values.clone())
    with engine._engine_mode():
        stock = engine._hidden(st.tokens.view(batch, 1), st.positions.view(batch, 1), slice(0, batch), kv_length)[:, -1]
        stock_cache = (cache.keys.clone(), cache.values.clone())
        cache.keys.copy_(saved[0])
        cache.values.copy_(saved[1])
        fused = decode_hidden(model, cache.keys, cache.values, st.tokens, st.positions, kv_length)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert fused.shape == stock.shape and fused.dtype == stock.dtype
    assert rel_err(fused, stock) < tolerance
    rows = torch.arange(batch, device=DEVICE)
    for got, want in zip((cache.keys, cache.values), stock_cache):
        assert rel_err(got[:, rows, :, st.positions], want[:, rows, :, st.positions]) < tolerance
        untouched = torch.ones(cache.capacity, dtype=torch.bool, device=DEVICE).repeat(batch, 1)
        untouched[rows, st.positions] = False
        assert torch.equal(got.transpose(2, 3)[:, untouched], want.transpose(2, 3)[:, untouched])


@pytest.mark.parametrize("family,extra", FAMILIES)
def test_fused_engine_equals_hf_generate(family, extra):
    """Greedy dual generation with the fused layers is token for token HF generate, run separately on
    the queries and on principle + queries (one prompt per call where a window would meet padding)."""
    model = family_model(family, extra)
    queries = random_tokens([3, 9, 1, 6], seed=71)
    principle = random_tokens([4], seed=72)[0]
    engine = RolloutEngine(model, decode_attention="triton")
    assert engine.fused_layers
    got = engine.generate(queries + queries, max_new_tokens=10, eos_token_ids=[NO_EOS], prefix=principle,
                          prefixed=[False] * 4 + [True] * 4)
    full = queries + [principle + q for q in queries]
    if extra.get("sliding_window"):
        want = [generate(model, [p], max_new_tokens=10, eos_token_id=NO_EOS)[0] for p in full]
    else:
        want = generate(model, full, max_new_tokens=10, eos_token_id=NO_EOS)
    assert got == want


def test_peft_lora_layers_run_inside_the_fused_step():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama").to(DEVICE)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "down_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, lora)
    queries = random_tokens([3, 6, 2], seed=13)
    principle = [7, 8, 9]
    engine = RolloutEngine(wrapped, decode_attention="triton")
    assert engine.fused_layers
    got = engine.generate(queries, max_new_tokens=8, eos_token_ids=[NO_EOS], prefix=principle,
                          prefixed=[True, False, True])
    full = [principle + queries[0], queries[1], principle + queries[2]]
    assert got == generate(wrapped, full, max_new_tokens=8, eos_token_id=NO_EOS)


class _CountOps(TorchDispatchMode):
    """aten ops that launch a kernel on a GPU (views and allocations do not), and Triton launches
    (the host functions below, whose insides the interpreter would otherwise show as aten ops)."""
    FREE = {"view", "_unsafe_view", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select", "t",
            "reshape", "permute", "alias", "detach", "as_strided", "empty", "empty_like", "empty_strided"}
    LAUNCHERS = [("ple_fast.kernels.rms_norm", "add_rms_norm"), ("ple_fast.kernels.swiglu", "silu_mul"),
                 ("ple_fast.kernels.decode_attention", "decode_attention")]

    def __init__(self, monkeypatch):
        super().__init__()
        self.aten = self.triton = self.paused = 0
        for module, name in self.LAUNCHERS:
            monkeypatch.setattr(f"{module}.{name}", self._launcher(getattr(__import__(module, fromlist=[name]), name)))

    def _launcher(self, fn):
        def launch(*args, **kwargs):
            self.triton += 1
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1
        return launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.overloadpacket.__name__ not in self.FREE:
            self.aten += 1
        return func(*args, **(kwargs or {}))


def test_fused_step_leaves_only_the_projections_to_torch(monkeypatch):
    """Per layer, the fused step's torch ops are its 7 projections and its glue is 4 Triton kernels
    (+1 for the final norm); the stock step spends ~30 more torch ops per layer on norms, rotary,
    SwiGLU and residual adds."""
    model = family_model("llama", {}).eval()
    layers = model.config.num_hidden_layers
    prompts = random_tokens([3, 5], seed=81)
    counts = {}
    for fused in (True, False):
        engine = prepared_step(model, prompts, [], [False, False], fused_layers=fused)
        with engine._engine_mode(), _CountOps(monkeypatch) as ops:
            engine._decode_step(engine.cache.capacity, (0.0, 0, 1.0, False), *engine._constants(0, (NO_EOS,)))
        counts[fused] = (ops.aten, ops.triton)
    per_step = 20       # embedding, rotary tables, the head, argmax and the step's bookkeeping
    assert counts[True][1] == 4 * layers + 1
    assert counts[True][0] <= 7 * layers + per_step
    assert counts[False][1] == layers                  # the decode attention kernel only
    assert counts[False][0] - counts[True][0] >= 25 * layers


def test_option_resolution_and_errors():
    model = family_model("llama", {})
    assert RolloutEngine(model, decode_attention="triton").fused_layers
    assert not RolloutEngine(model, decode_attention="sdpa").fused_layers
    assert not RolloutEngine(model, decode_attention="triton", compile_decode=True).fused_layers
    assert not RolloutEngine(model, decode_attention="triton", fused_layers=False).fused_layers
    with pytest.raises(ValueError, match="decode_attention='triton'"):
        RolloutEngine(model, decode_attention="sdpa", fused_layers=True)
    with pytest.raises(ValueError, match="choose one"):
        RolloutEngine(model, decode_attention="triton", compile_decode=True, fused_layers=True)
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2))
    assert "model_type 'gpt2'" in unsupported_reason(gpt2)
    assert not RolloutEngine(gpt2, decode_attention="triton").fused_layers
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        RolloutEngine(gpt2, decode_attention="triton", fused_layers=True)
