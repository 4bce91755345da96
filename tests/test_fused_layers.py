"""Fused layers (ple_fast.fused_layers: the decode step and the training forward) and their glue
kernels against the HF modules' own arithmetic and autograd. CPU runs the kernels under
TRITON_INTERPRET=1; the suite's `-m gpu` compiles them."""
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ple_fast.fused_layers import decode_hidden, position_independent_rotary, rotary_tables, unsupported_reason
from ple_fast.engine import RolloutEngine
from ple_fast.forward import dual_response_rows
from ple_fast.models import head_dim
from ple_fast.plan import ForwardPlan, engine_options, forward_plan
from ple_fast.kernels.decode_attention import CANDIDATE_TILES
from ple_fast.kernels.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm
from ple_fast.kernels.rotary import rotary, rotary_reference
from ple_fast.kernels.swiglu import silu_mul, silu_mul_reference
from ple_fast.rollout import generate
from test_rollout import NO_EOS, random_tokens, tiny_model
import test_dual_forward
from host_reads import HostReads
from test_decode_attention import hf_rotary_rows

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# fp32 model forwards against other forwards: 1e-5 on the CPU; a GPU's attention kernels sum in other
# orders for packed and padded layouts (and may use TF32), as the other GPU tests allow for
FP32_FORWARD_TOL = 1e-5 if DEVICE == "cpu" else 2e-3


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
    """max |a - e| / max |e| in fp64, on the CPU (the fp64 oracles run there; a GPU result comes over)."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
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


def fp64_grads(fn, *inputs: torch.Tensor, grad_out) -> list[torch.Tensor]:
    """Gradients of <fn(inputs), grad_out> wrt inputs, in fp64 (the oracle)."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.double().cpu() for g in grad_out])
    return [t.grad for t in leaves]


def grad_tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


@pytest.mark.parametrize("x_dtype,res_dtype,w_dtype", [(torch.float32, torch.float32, torch.float32),
                                                       (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                                       (torch.bfloat16, torch.float32, torch.float32),
                                                       (torch.float16, None, torch.float16)])
@pytest.mark.parametrize("rows,hidden", [(300, 80), (1, 64), (7, 3000)])
def test_add_rms_norm_backward_matches_fp64_autograd(x_dtype, res_dtype, w_dtype, rows, hidden):
    """dx, d residual and dW (fp32 partial sums over rows, several programs at 300 rows) against fp64
    autograd of the HF op sequence; bf16 branch + fp32 stream is the autocast layout."""
    g = torch.Generator().manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, generator=g).to(x_dtype).to(DEVICE).requires_grad_()
    residual = (torch.randn(rows, hidden, generator=g).to(res_dtype).to(DEVICE).requires_grad_()
                if res_dtype else None)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(w_dtype).to(DEVICE).requires_grad_()
    d_out = torch.randn(rows, hidden, generator=g)
    d_sum = torch.randn(rows, hidden, generator=g)
    out, summed = add_rms_norm(x, weight, 1e-6, residual)
    assert summed.dtype == (x_dtype if res_dtype is None else torch.promote_types(x_dtype, res_dtype))
    if residual is None:
        out.backward(d_out.to(out.dtype).to(DEVICE))
        inputs, grads = (x, weight), (d_out,)
        fn = lambda a, w: add_rms_norm_reference(a, w, 1e-6)[0]
    else:
        torch.autograd.backward((out, summed), (d_out.to(out.dtype).to(DEVICE), d_sum.to(summed.dtype).to(DEVICE)))
        inputs, grads = (x, weight, residual), (d_out, d_sum)
        fn = lambda a, w, r: add_rms_norm_reference(a, w, 1e-6, r)
    want = fp64_grads(fn, *inputs, grad_out=grads)
    for got, exact in zip(inputs, want):
        assert got.grad.dtype == got.dtype
        assert rel_err(got.grad, exact) < grad_tolerance(got.dtype)
    plain = rms_norm(x.detach(), weight.detach(), 1e-6)
    assert torch.equal(plain, add_rms_norm(x.detach(), weight.detach(), 1e-6)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1500), (1, 8)])
def test_silu_mul_backward_matches_fp64_autograd(dtype, shape):
    g = torch.Generator().manual_seed(shape[1] + 1)
    gate = (torch.randn(shape, generator=g) * 4).to(dtype).to(DEVICE).requires_grad_()
    up = torch.randn(shape, generator=g).to(dtype).to(DEVICE).requires_grad_()
    d_out = torch.randn(shape, generator=g)
    silu_mul(gate, up).backward(d_out.to(dtype).to(DEVICE))
    want = fp64_grads(silu_mul_reference, gate, up, grad_out=(d_out,))
    for got, exact in zip((gate, up), want):
        assert rel_err(got.grad, exact) < grad_tolerance(dtype)


@pytest.mark.parametrize("tokens,q_heads,kv_heads,dim,dtype,table_dtype", [
    (5, 4, 2, 16, torch.float32, torch.float32), (1, 8, 8, 64, torch.bfloat16, torch.bfloat16),
    (9, 12, 4, 80, torch.float16, torch.float16), (6, 4, 1, 32, torch.bfloat16, torch.float32)])
def test_rotary_forward_rounds_like_hf_and_backward_matches_fp64(tokens, q_heads, kv_heads, dim, dtype, table_dtype):
    """Forward: HF's apply_rotary_pos_emb op sequence within glue_ulps, output dtype promote(x, cos)
    (fp32 tables over bf16 projections: the autocast layout). Backward: fp64 autograd."""
    g = torch.Generator().manual_seed(tokens * dim)
    q = torch.randn(tokens, q_heads, dim, generator=g).to(dtype).to(DEVICE).requires_grad_()
    k = torch.randn(tokens, kv_heads, dim, generator=g).to(dtype).to(DEVICE).requires_grad_()
    positions = torch.randint(0, 500, (tokens,), generator=g)
    cos, sin = (t[:, 0] for t in hf_rotary_rows(positions, dim, table_dtype))      # [N, D]
    q_out, k_out = rotary(q, k, cos, sin)
    out_dtype = torch.promote_types(dtype, table_dtype)
    for got, x in ((q_out, q), (k_out, k)):
        assert got.dtype == out_dtype and got.shape == x.shape
        want = rotary_reference(x.detach(), cos[:, None], sin[:, None])
        assert within_ulps(got, want, glue_ulps(out_dtype))
    d_q, d_k = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)
    torch.autograd.backward((q_out, k_out), (d_q.to(out_dtype).to(DEVICE), d_k.to(out_dtype).to(DEVICE)))
    fn = lambda a, b: (rotary_reference(a, cos[:, None].double().cpu(), sin[:, None].double().cpu()),
                       rotary_reference(b, cos[:, None].double().cpu(), sin[:, None].double().cpu()))
    want_q, want_k = fp64_grads(fn, q, k, grad_out=(d_q, d_k))
    assert q.grad.dtype == dtype and rel_err(q.grad, want_q) < grad_tolerance(dtype)
    assert rel_err(k.grad, want_k) < grad_tolerance(dtype)
    with pytest.raises(ValueError, match="rotary"):
        rotary(q.detach()[:, :, :dim - 1], k.detach()[:, :, :dim - 1], cos[:, :dim - 1], sin[:, :dim - 1])


# ------------------------------------------------------------------------- the training forward

FUSED_TRITON = ForwardPlan("packed", "triton", "fused", "torch")     # the CUDA default's scoring forward


@pytest.mark.parametrize("autocast", [False, True])
def test_shared_input_projections_equal_the_modules(autocast):
    """project() (one autograd node for q / k / v or gate / up): outputs and the gradients of x, the
    weights and the biases equal the modules' own forward and autograd; under bf16 autocast (fp32
    parameters) to bf16 accuracy, in the parameters' dtypes. A frozen weight gets no gradient, an
    unused output adds nothing, and modules that are not plain nn.Linear are called as they are."""
    from ple_fast.fused_layers import project

    g = torch.Generator().manual_seed(3)
    modules = [torch.nn.Linear(24, n, bias=bias).to(DEVICE) for n, bias in ((16, True), (8, False), (8, True))]
    modules[1].weight.requires_grad_(False)
    x = torch.randn(7, 24, generator=g).to(DEVICE)
    grads = [torch.randn(7, m.out_features, generator=g).to(DEVICE) for m in modules]
    results = []
    for fused in (True, False):
        for m in modules:
            m.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            outs = project(leaf, tuple(modules)) if fused else tuple(m(leaf) for m in modules)
        assert all(o.dtype == (torch.bfloat16 if autocast else torch.float32) for o in outs)
        torch.autograd.backward([outs[0], outs[1]], [grads[0].to(outs[0].dtype), grads[1].to(outs[1].dtype)])
        results.append((outs, leaf.grad, [(m.weight.grad, m.bias.grad if m.bias is not None else None)
                                          for m in modules]))
    (got_outs, got_dx, got_params), (want_outs, want_dx, want_params) = results
    tol = 2e-2 if autocast else 1e-6
    for got, want in zip(got_outs, want_outs):
        assert rel_err(got, want) < tol
    assert got_dx.dtype == torch.float32 and rel_err(got_dx, want_dx) < tol
    for (got_w, got_b), (want_w, want_b), m in zip(got_params, want_params, modules):
        for got, want in ((got_w, want_w), (got_b, want_b)):
            assert (got is None) == (want is None)
            if got is not None:
                assert got.dtype == torch.float32 and rel_err(got, want) < tol
    assert modules[1].weight.grad is None and modules[2].weight.grad is None     # frozen; output unused
    hooked = torch.nn.Linear(24, 4).to(DEVICE)
    seen = []
    hooked.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    project(x.clone().requires_grad_(), (modules[0], hooked))
    assert seen == [torch.Size([7, 4])]



@pytest.mark.parametrize("family,backend", [("llama", "sdpa"), ("qwen2", "sdpa"), ("mistral", "sdpa"),
                                            ("qwen3", "sdpa"), ("llama", "triton"), ("qwen2", "triton")])
def test_fused_training_layers_match_padded_hf_forwards(family, backend):
    """dual_forward(layers="fused"): log-probs and every parameter's gradient equal separate padded HF
    forwards (fp32, 1e-5 on CPU) over random pairs with 1-token and empty responses; Qwen2 / Qwen3 mix full
    and sliding-window layers, Mistral slides everywhere. The layers get their own forward back."""
    model = test_dual_forward.tiny_model(family).to(DEVICE)
    rng = random.Random(11)
    for trial in range(3):
        test_dual_forward.check_against_padded(model, test_dual_forward.random_pairs(rng, [1, 3, 5][trial]),
                                               backend, seed=trial, layers="fused", tol=FP32_FORWARD_TOL)
    assert not any("forward" in vars(module) for module in [*model.model.layers, model.model.norm])


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_fused_training_layers_under_bf16_autocast(backend):
    """fp32 weights under bf16 autocast (the trainer's CUDA setting): the fp32 residual stream, bf16
    projections and fp32 rotary tables promote as in HF's layers; log-probs and gradients agree with
    the stock layers to bf16 accuracy. With `triton` (the CUDA default) the fused layers run as one
    node each, and the attention gets bf16 q / k / v as SDPA would (its backward once failed on the
    fp32 q / k the rotary promotes to)."""
    model = test_dual_forward.tiny_model("llama", hidden=64).to(DEVICE)
    queries, originals, principled = test_dual_forward.random_pairs(random.Random(5), 4)
    weights = torch.randn(8, generator=torch.Generator().manual_seed(5))
    device_type = "cuda" if DEVICE == "cuda" else "cpu"
    results = []
    for layers in ("fused", "stock"):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            rows = dual_response_rows(model, ForwardPlan("packed", backend, layers, "torch"), queries, originals,
                                      principled)
        results.append(test_dual_forward.logps_and_grads(model, rows, weights))
    (got_logps, got_grads), (want_logps, want_grads) = results
    assert rel_err(got_logps, want_logps) < 2e-2
    assert got_grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        assert rel_err(got_grads[name], want) < 5e-2, name


def test_fused_layers_in_a_padded_forward_equal_the_stock_layers():
    """The fused layers under HF's own padded forward (batch > 1, one rotary table for every row, HF's
    SDPA with its padding mask): log-probs and gradients of the stock layers (fp32, 1e-5 on CPU)."""
    from ple_fast.fused_layers import fused_decoder_layers

    model = test_dual_forward.tiny_model("qwen3").to(DEVICE)
    prompts, responses = test_dual_forward.as_separate(*test_dual_forward.random_pairs(random.Random(3), 3))
    weights = torch.randn(len(prompts), generator=torch.Generator().manual_seed(3))
    with fused_decoder_layers(model):
        rows = test_dual_forward.padded_response_rows(model, prompts, responses)
    got_logps, got_grads = test_dual_forward.logps_and_grads(model, rows, weights)
    want_logps, want_grads = test_dual_forward.logps_and_grads(
        model, test_dual_forward.padded_response_rows(model, prompts, responses), weights)
    test_dual_forward.assert_rel_close(got_logps, want_logps, "log-probs", tol=FP32_FORWARD_TOL)
    for name, want in want_grads.items():
        test_dual_forward.assert_rel_close(got_grads[name], want, name, tol=FP32_FORWARD_TOL,
                                           floor=1e-4 * want.abs().max().item())


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_fused_layers_fill_a_cache_they_are_given():
    """A forward that asks HF for a KV cache (not a training forward, but the layers' contract) gets
    it filled as the stock layers fill it, and the same hidden states."""
    from transformers import DynamicCache

    from ple_fast.fused_layers import fused_decoder_layers

    model = test_dual_forward.tiny_model("mistral").to(DEVICE).eval()
    ids = torch.tensor([[1, 5, 9, 4, 7]], device=DEVICE)
    caches = [DynamicCache(config=model.config), DynamicCache(config=model.config)]
    want = model.model(input_ids=ids, past_key_values=caches[0], use_cache=True).last_hidden_state
    with fused_decoder_layers(model):
        got = model.model(input_ids=ids, past_key_values=caches[1], use_cache=True).last_hidden_state
    assert rel_err(got, want) < FP32_FORWARD_TOL
    assert caches[1].get_seq_length() == caches[0].get_seq_length() == 5


def test_fused_training_layers_refuse_what_they_do_not_cover():
    from ple_fast.fused_layers import fused_decoder_layers
    from ple_fast.forward import dual_forward
    from ple_fast.layout import pack_dual
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        with fused_decoder_layers(gpt2):
            pass
    with pytest.raises(ValueError, match="layers=fused: model_type 'gpt2'"):
        forward_plan(gpt2, attention="sdpa", layers="fused")
    model = test_dual_forward.tiny_model("llama")
    with pytest.raises(ValueError, match="layers=fused: runs in packed forwards"):
        forward_plan(model, layout="padded", layers="fused")
    batch = pack_dual([[1, 2]], [[3]], [[4]])
    with pytest.raises(ValueError, match=r"dual_forward: layers='fused\+compiled'"):
        dual_forward(model, batch, "sdpa", layers="fused+compiled")


# ---------------------------------------------------------------------------- the decode step

# rotary types whose frequencies do not follow the batch (a table of positions serves the step)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
YARN_ROPE = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)
# Qwen2 with sliding layers after the first full one; a GELU Llama (its MLP glue stays in torch)
FAMILIES = [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 5}), ("qwen3", {"head_dim": 16}),
            ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
            ("llama", {"hidden_act": "gelu"})]


def family_model(family: str, extra: dict, dtype: torch.dtype = torch.float32):
    return tiny_model(family, seed=4, **extra).to(dtype).to(DEVICE)


def prepared_step(model, prompts, principle, prefixed, **engine_kw):
    """An engine after prefill and its first token: the state one decode step starts from (its
    output buffer sized for 2 tokens). engine_kw: more engine_options."""
    engine = RolloutEngine(model, engine_options(model, decode_attention="triton", cuda_graphs=False, **engine_kw))
    engine.generate(prompts, max_new_tokens=2, eos_token_ids=[NO_EOS], prefix=principle, prefixed=prefixed)
    engine.generate(prompts, max_new_tokens=1, eos_token_ids=[NO_EOS], prefix=principle, prefixed=prefixed)
    return engine


def steps_from_one_cache(model, engine, variants: list[dict]) -> list[tuple[torch.Tensor, ...]]:
    """(hidden states, keys, values) after one fused decode step from the prepared engine's cache, for
    each dict of decode_hidden options; the cache goes back to its state before each step."""
    st, cache = engine.state, engine.cache
    saved = (cache.keys.clone(), cache.values.clone())
    outputs = []
    with engine._engine_mode():
        for options in variants:
            cache.keys.copy_(saved[0])
            cache.values.copy_(saved[1])
            hidden = decode_hidden(model, cache.keys, cache.values, st.tokens, st.positions, cache.capacity,
                                   **options)
            outputs.append((hidden, cache.keys.clone(), cache.values.clone()))
    return outputs


@pytest.mark.parametrize("family,extra", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_decode_step_equals_the_stock_layers(family, extra, dtype):
    """From the same cache and tokens, the fused step's final hidden states and the K/V it writes match
    the stock HF layers (with the same decode attention kernel): fp32 to 1e-5 (on CPU); bf16, where every glue
    op rounds as HF's does, to a few bf16 units of the final states."""
    model = family_model(family, extra, dtype).eval()
    assert unsupported_reason(model) is None
    prompts = random_tokens([3, 9, 1, 6], seed=61)
    principle = random_tokens([4], seed=62)[0]
    prefixed = [True, False, False, True]
    engine = prepared_step(model, prompts, principle, prefixed, layers="stock")
    st, cache = engine.state, engine.cache
    batch = len(prompts)
    kv_length = cache.capacity
    saved = (cache.keys.clone(), cache.values.clone())
    with engine._engine_mode():
        stock = engine._stock_hidden(kv_length)
        stock_cache = (cache.keys.clone(), cache.values.clone())
        cache.keys.copy_(saved[0])
        cache.values.copy_(saved[1])
        fused = decode_hidden(model, cache.keys, cache.values, st.tokens, st.positions, kv_length)
    tolerance = FP32_FORWARD_TOL if dtype == torch.float32 else 3e-2
    assert fused.shape == stock.shape and fused.dtype == stock.dtype
    assert rel_err(fused, stock) < tolerance
    rows = torch.arange(batch, device=DEVICE)
    for got, want in zip((cache.keys, cache.values), stock_cache):
        assert rel_err(got[:, rows, :, st.positions], want[:, rows, :, st.positions]) < tolerance
        untouched = torch.ones(cache.capacity, dtype=torch.bool, device=DEVICE).repeat(batch, 1)
        untouched[rows, st.positions] = False
        assert torch.equal(got.transpose(2, 3)[:, untouched], want.transpose(2, 3)[:, untouched])


@pytest.mark.parametrize("family,extra", [("llama", {}), ("qwen3", {"head_dim": 16}),
                                          ("mistral", {"sliding_window": 5}),
                                          ("llama", {"rope_parameters": LLAMA3_ROPE}),
                                          ("llama", {"rope_parameters": YARN_ROPE})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_tables_give_the_step_the_same_bits(family, extra, dtype):
    """A table of every position (what the engine's fused step reads) holds, row for row, the bits the
    model's rotary module gives a batch of positions; a step reading it writes the same cache and
    hidden states as a step running the module."""
    model = family_model(family, extra, dtype).eval()
    assert position_independent_rotary(model)
    prompts = random_tokens([3, 9, 1, 6], seed=63)
    engine = prepared_step(model, prompts, [], [False] * 4)
    assert engine.rope_from_tables and engine.rope_tables[0].shape == (engine.cache.capacity, head_dim(model.config))
    cache = engine.cache
    positions = torch.tensor([0, 5, 17, cache.capacity - 1], device=DEVICE)
    with torch.no_grad():
        per_batch = model.model.rotary_emb(torch.empty(0, dtype=dtype, device=DEVICE), positions.view(4, 1))
        tables = rotary_tables(model, cache.capacity, dtype, DEVICE)
    for table, rows in zip(tables, per_batch):
        assert table.dtype == dtype and torch.equal(table[positions], rows[:, 0])
    outputs = steps_from_one_cache(model, engine, [dict(rope_tables=None), dict(rope_tables=tables)])
    for got, want in zip(*outputs):
        assert torch.equal(got, want)


def test_rotary_tables_are_not_used_where_the_frequencies_follow_the_batch():
    """HF's dynamic rope rescales by the batch's longest position: the step runs the module instead."""
    model = family_model("llama", {"rope_parameters": dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)})
    assert not position_independent_rotary(model)
    engine = prepared_step(model, random_tokens([3, 5], seed=64), [], [False, False])
    assert engine.options.fused_layers and not engine.rope_from_tables and engine.rope_tables is None


@pytest.mark.parametrize("family,extra", FAMILIES + [("llama", {"rope_parameters": LLAMA3_ROPE})])
def test_fused_engine_equals_hf_generate(family, extra, monkeypatch):
    """Greedy dual generation with the fused layers (decode steps, and the packed prefill's layers) is
    token for token HF generate, run separately on the queries and on principle + queries (one prompt
    per call where a window would meet padding)."""
    import ple_fast.fused_layers as fused_layers

    prefill_layers = []
    real = fused_layers.layer_forward
    monkeypatch.setattr(fused_layers, "layer_forward", lambda *a, **k: prefill_layers.append(1) or real(*a, **k))
    model = family_model(family, extra)
    queries = random_tokens([3, 9, 1, 6], seed=71)
    principle = random_tokens([4], seed=72)[0]
    engine = RolloutEngine(model, engine_options(model, decode_attention="triton"))
    assert engine.options.fused_layers
    got = engine.generate(queries + queries, max_new_tokens=10, eos_token_ids=[NO_EOS], prefix=principle,
                          prefixed=[False] * 4 + [True] * 4)
    assert len(prefill_layers) == model.config.num_hidden_layers       # one packed prefill chunk
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
    engine = RolloutEngine(wrapped, engine_options(wrapped, decode_attention="triton"))
    assert engine.options.fused_layers
    got = engine.generate(queries, max_new_tokens=8, eos_token_ids=[NO_EOS], prefix=principle,
                          prefixed=[True, False, True])
    full = [principle + queries[0], queries[1], principle + queries[2]]
    assert got == generate(wrapped, full, max_new_tokens=8, eos_token_id=NO_EOS)


@pytest.mark.skipif(DEVICE != "cuda", reason="a second CUDA stream")
@pytest.mark.parametrize("family,extra", FAMILIES)
def test_side_stream_changes_nothing_but_the_streams(family, extra):
    """The k / v projections beside q and gate beside up on a second stream (side_by_side): one eager
    step gives the same hidden states and cache writes, and whole generations in CUDA graphs (captured
    with the second stream, no fallback) give the same tokens, greedy and sampled."""
    model = family_model(family, extra)
    prompts = random_tokens([3, 9, 1, 6], seed=91)
    principle = random_tokens([4], seed=92)[0]
    prefixed = [True, False, False, True]
    engine = prepared_step(model, prompts, principle, prefixed, side_stream=False)
    one_stream, two_streams = steps_from_one_cache(model, engine, [{}, {"side_stream": torch.cuda.Stream()}])
    torch.cuda.synchronize()
    for one, two in zip(one_stream, two_streams):
        assert torch.equal(one, two)
    for temperature in (0.0, 1.0):
        kw = dict(max_new_tokens=12, eos_token_ids=[NO_EOS], prefix=principle, prefixed=prefixed,
                  temperature=temperature, seed=5)
        one_stream = RolloutEngine(model, engine_options(model, side_stream=False))
        two_streams = RolloutEngine(model)
        assert two_streams.side_stream is not None and one_stream.side_stream is None
        assert two_streams.generate(prompts, **kw) == one_stream.generate(prompts, **kw)
        assert two_streams.side_stream is not None and two_streams.last_stats.graphs


def _launch_counted(counter, launch, count):
    """launch, calling count() first and pausing counter's torch-op count while it runs: a launch is one
    kernel, whatever torch ops the interpreter runs inside it."""
    def counted(*args, **kwargs):
        count()
        counter.paused += 1
        try:
            return launch(*args, **kwargs)
        finally:
            counter.paused -= 1
    return counted


class _CountOps(TorchDispatchMode):
    """aten ops that launch a kernel on a GPU (views and allocations do not), and Triton launches
    (the host functions below, whose insides the interpreter would otherwise show as aten ops)."""
    FREE = {"view", "_unsafe_view", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select", "t",
            "reshape", "permute", "alias", "detach", "as_strided", "empty", "empty_like", "empty_strided"}
    LAUNCHERS = [("ple_fast.fused_layers", "add_rms_norm"), ("ple_fast.fused_layers", "silu_mul"),    # where called
                 ("ple_fast.fused_layers", "decode_attention"), ("ple_fast.engine.attention", "decode_attention"),
                 ("ple_fast.engine.rollout_engine", "record_step")]

    def __init__(self, monkeypatch):
        super().__init__()
        self.aten = self.triton = self.paused = 0
        for module, name in self.LAUNCHERS:
            fn = getattr(__import__(module, fromlist=[name]), name)
            monkeypatch.setattr(f"{module}.{name}", _launch_counted(self, fn, self._count_launch))

    def _count_launch(self):
        self.triton += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.overloadpacket.__name__ not in self.FREE:
            self.aten += 1
        return func(*args, **(kwargs or {}))


def test_fused_step_leaves_only_the_projections_to_torch(monkeypatch):
    """Per layer, the fused step's torch ops are its 7 projections and its glue is 4 Triton kernels;
    per step, torch runs the embedding, the head and the greedy argmax, and Triton the final norm
    and the step record (the rotary tables are read, not computed). The stock step spends ~30 more
    torch ops per layer on norms, rotary, SwiGLU and residual adds."""
    model = family_model("llama", {}).eval()
    layers = model.config.num_hidden_layers
    prompts = random_tokens([3, 5], seed=81)
    counts = {}
    for fused in (True, False):
        engine = prepared_step(model, prompts, [], [False, False], layers="fused" if fused else "stock")
        with engine._engine_mode(), _CountOps(monkeypatch) as ops:
            engine._decode_step(engine.cache.capacity, (0.0, 0, 1.0, False), *engine._constants(0, (NO_EOS,)))
        counts[fused] = (ops.aten, ops.triton)
    assert counts[True] == (7 * layers + 3, 4 * layers + 2)
    assert counts[False][1] == layers + 1              # the decode attention kernel and the step record
    assert counts[False][0] - counts[True][0] >= 25 * layers


class _CountTrainingOps(TorchDispatchMode):
    """Kernels a forward + backward launches: aten ops that launch one on a GPU (views and allocations
    do not), and Triton launches by kernel name, counted where a JIT kernel is launched, so the
    backward's launches inside autograd Functions count too (the interpreter's own torch ops do not)."""

    def __init__(self, monkeypatch):
        from ple_fast.kernels.rms_norm import _add_rms_norm_kernel

        super().__init__()
        self.aten, self.triton, self.paused = {}, {}, 0
        kernel_type = type(_add_rms_norm_kernel)          # JITFunction, or InterpretedFunction on CPU
        getitem = kernel_type.__getitem__

        def launcher(kernel, grid):
            name = getattr(kernel, "__name__", None) or kernel.fn.__name__
            return _launch_counted(self, getitem(kernel, grid),
                                   lambda: self.triton.__setitem__(name, self.triton.get(name, 0) + 1))
        monkeypatch.setattr(kernel_type, "__getitem__", launcher)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in _CountOps.FREE | {"promote_types"}:
            self.aten[name] = self.aten.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_fused_training_layer_kernel_count(monkeypatch):
    """Per layer, a packed training step (forward + backward, triton tree attention) launches 13 Triton
    kernels and 24 torch kernels: 21 projection GEMMs (3 of them addmm_, which sum the q / k / v and the
    gate / up input gradients), the residual add and the RMSNorm weight gradients' sums (2); the
    attention reads its gathered keys in place and sums their gradients in one kernel. A change that
    adds a kernel to every layer shows here: the layer's input gradient, the squeezed attention inputs,
    the norms' dW buffers, the projections' input gradients and the K/V gather (index_select, new_zeros,
    index_add and zeros_like, each twice) each cost kernels before."""
    counts = {}
    for layers in (1, 3):
        model = test_dual_forward.tiny_model("llama", layers=layers).to(DEVICE)
        pairs = test_dual_forward.random_pairs(random.Random(2), 3)
        with monkeypatch.context() as patch, _CountTrainingOps(patch) as ops:
            rows = dual_response_rows(model, FUSED_TRITON, *pairs)
            rows.hidden.float().square().sum().backward()
        counts[layers] = ops
    per_layer = lambda kind: {name: (getattr(counts[3], kind).get(name, 0) - getattr(counts[1], kind).get(name, 0)) / 2
                              for name in getattr(counts[3], kind)}
    triton_per_layer, aten_per_layer = per_layer("triton"), per_layer("aten")
    assert triton_per_layer == {"_add_rms_norm_kernel": 2, "_rms_norm_backward_kernel": 2, "_rotary_kernel": 2,
                                "_fwd_kernel": 1, "_bwd_delta_kernel": 1, "_bwd_dkdv_kernel": 1, "_bwd_dq_kernel": 1,
                                "_silu_mul_kernel": 1, "_silu_mul_backward_kernel": 1, "_gather_grad_kernel": 1}
    assert {name: n for name, n in aten_per_layer.items() if n} == {"mm": 18, "addmm_": 3, "add": 1, "sum": 2}


def _packed_step(model, pairs, weights, monkeypatch, one_node: bool, autocast: bool = False):
    """(log-probs, gradients, one-node layer forwards, bytes the graph saved for backward) of a packed
    fused step on the triton tree attention, its forward under bf16 autocast if asked (backward outside,
    as the trainer runs it); one_node False forces the per-op layer."""
    import ple_fast.fused_layers as fused_layers

    calls, saved = [], {}
    forward = fused_layers._PackedTrainingLayer.forward

    def counted(ctx, *args):
        calls.append(1)
        return forward(ctx, *args)

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with monkeypatch.context() as patch:
        patch.setattr(fused_layers._PackedTrainingLayer, "forward", staticmethod(counted))
        if not one_node:
            patch.setattr(fused_layers, "_one_node_reason", lambda *args: "forced")
        precision = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision:
            rows = dual_response_rows(model, FUSED_TRITON, *pairs)
        logps, grads = test_dual_forward.logps_and_grads(model, rows, weights)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return logps, grads, len(calls), sum(n for ptr, n in saved.items() if ptr not in params)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32", "bf16", "fp32 weights, bf16 autocast"])
def test_one_node_training_layer_equals_the_per_op_layer(family, dtype, autocast, monkeypatch):
    """A packed forward on the triton tree attention runs each layer as one autograd node
    (_PackedTrainingLayer): the same kernels in the same order as the per-op fused layer, with
    autocast's casts in the same places (the trainer's CUDA setting), so the same bits, log-probs and
    every gradient (Qwen2's q / k / v biases, Qwen3's head norms, sliding windows), and no more memory
    saved for backward."""
    model = test_dual_forward.tiny_model(family, layers=3).to(dtype).to(DEVICE)
    pairs = test_dual_forward.random_pairs(random.Random(7), 4)
    weights = torch.randn(8, generator=torch.Generator().manual_seed(7))
    got_logps, got_grads, nodes, got_saved = _packed_step(model, pairs, weights, monkeypatch, True, autocast)
    want_logps, want_grads, none, want_saved = _packed_step(model, pairs, weights, monkeypatch, False, autocast)
    assert (nodes, none) == (3, 0)
    assert torch.equal(got_logps, want_logps) and not torch.isnan(got_logps).any()
    assert got_grads.keys() == want_grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, want in want_grads.items():
        assert torch.equal(got_grads[name], want), name
    assert 0 < got_saved <= want_saved


def test_one_node_training_layer_covers_only_its_case():
    """What the one-node layer leaves to the per-op layer: other attention backends, LoRA or hooked
    projections, mixed dtypes without autocast, a cache."""
    from ple_fast.attention import ATTENTION_NAME, METADATA_KWARG, tree_attention_metadata
    from ple_fast.fused_layers import _one_node_params, _one_node_reason
    from ple_fast.layout import pack_dual

    model = test_dual_forward.tiny_model("llama").to(DEVICE)
    layer = model.model.layers[0]
    batch = pack_dual([[1, 2, 3]], [[4]], [[5, 6]], device=DEVICE)
    hidden = torch.randn(1, batch.num_tokens, 32, device=DEVICE)
    rope = model.model.rotary_emb(hidden, batch.position_ids[None])
    reason = lambda backend="triton", h=hidden, cache=None: _one_node_reason(   # noqa: E731
        layer, h, rope, cache, {METADATA_KWARG: tree_attention_metadata(batch, backend)}, _one_node_params(layer))
    model.config._attn_implementation = ATTENTION_NAME
    assert reason() is None
    assert reason("sdpa") == "tree attention backend 'sdpa'"
    assert reason(cache=object()) is not None
    assert reason(h=hidden.double()) == "mixed dtypes without autocast"
    with torch.autocast("cpu" if DEVICE == "cpu" else "cuda", dtype=torch.bfloat16):
        assert reason() is None and reason(h=hidden.double()) is None
    handle = layer.mlp.up_proj.register_forward_hook(lambda *args: None)
    assert "plain nn.Linear" in reason()
    handle.remove()
    model.config._attn_implementation = "sdpa"
    assert reason() == "not a packed tree-attention forward"


def test_one_node_layer_falls_back_per_op_after_a_gpu_launch_failure(monkeypatch):
    """A Triton launch failure on a GPU inside the one-node layer: warned once, then that layer and every
    later one run per op on the `segments` backend, with the same log-probs (a CPU error is raised)."""
    import ple_fast.attention as attention
    import ple_fast.fused_layers as fused_layers

    model = test_dual_forward.tiny_model("llama").to(DEVICE)
    pairs = test_dual_forward.random_pairs(random.Random(8), 2)
    want = dual_response_rows(model, ForwardPlan("packed", "segments", "fused", "torch"), *pairs).hidden

    def out_of_resources(*args, **kwargs):
        raise RuntimeError("simulated: out of shared memory")

    monkeypatch.setattr(fused_layers, "varlen_forward", out_of_resources)     # the one-node layer's kernel
    monkeypatch.setattr(attention, "_triton_failed", [])
    monkeypatch.setattr(attention, "_gpu_launch_failure", lambda err, device: False)
    with pytest.raises(RuntimeError, match="simulated"):
        dual_response_rows(model, FUSED_TRITON, *pairs)
    monkeypatch.setattr(attention, "_gpu_launch_failure", lambda err, device: True)
    with pytest.warns(RuntimeWarning, match="using the 'segments' backend from now on"):
        got = dual_response_rows(model, FUSED_TRITON, *pairs).hidden
    assert len(attention._triton_failed) == 1
    torch.testing.assert_close(got, want, rtol=FP32_FORWARD_TOL, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_packed_training_step_reads_the_device_only_before_its_forward(backend, monkeypatch):
    """The trainer's step from a layout built on the CPU (packed_rows, ple_loss, backward) reads device
    data on the host once, the scored rows' nonzero, and before the forward's first op: on a GPU a read
    after the forward is queued holds the host until the GPU has run it, and the loss and backward then
    launch behind an idle GPU. The tree ancestry (a sync per tree level) is built only for the mask
    backends, here sdpa. On CUDA, torch's sync debug mode checks the whole step (pinned copies too)."""
    from ple_fast import loss
    from ple_fast.forward import packed_rows
    from ple_fast.layout import pack_dual

    # its range checks read the indices on the CPU only, and are skipped on CUDA for this very reason
    monkeypatch.setattr(loss, "_check_index_ranges", lambda *args: None)
    model = test_dual_forward.tiny_model("llama", layers=2).to(DEVICE)
    batch = pack_dual(*test_dual_forward.random_pairs(random.Random(4), 3))
    assert batch.input_ids.device.type == "cpu"
    rewards = torch.tensor([[0.1, 0.9], [0.5, 0.2], [-1.0, 1.0]], device=DEVICE)

    def step():
        rows = packed_rows(model, batch, 6, ForwardPlan("packed", backend, "fused", "torch"))
        out = loss.ple_loss(rows.hidden, rows.weight, rows.labels, rows.seq_index, rewards, 0.3)
        out.loss.backward()

    step()                    # compiles the kernels on a GPU, outside what is checked
    with HostReads() as host:
        step()
    names = [name for name, _ in host.reads]
    if backend == "triton":
        assert names == ["nonzero"] and host.reads[0][1] < host.forward_starts
    else:
        assert names.count("nonzero") == 1 and "_local_scalar_dense" in names
    if DEVICE == "cuda" and backend == "triton":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_option_resolution_and_errors():
    """engine_options: the fused layers by default wherever the triton decode attention runs and the
    family is covered; the side stream only on CUDA with them; each impossible combination a ValueError."""
    model = family_model("llama", {})
    options = lambda **kw: engine_options(model, **kw)       # noqa: E731
    assert options(decode_attention="triton").fused_layers
    assert not options(decode_attention="sdpa").fused_layers
    assert not options(decode_attention="triton", layers="stock").fused_layers
    assert RolloutEngine(model, options(decode_attention="triton")).options.fused_layers
    # the second stream for the projections: CUDA and the fused layers only
    assert options(decode_attention="triton").side_stream == (DEVICE == "cuda")
    assert (RolloutEngine(model, options(decode_attention="triton")).side_stream is not None) == (DEVICE == "cuda")
    assert not options(decode_attention="triton", side_stream=False).side_stream
    assert RolloutEngine(model, options(decode_attention="triton", side_stream=False)).side_stream is None
    with pytest.raises(ValueError, match="side_stream=True needs the fused layers on a CUDA device"):
        options(decode_attention="sdpa", side_stream=True)
    with pytest.raises(ValueError, match="layers=fused: it needs the triton decode attention"):
        options(decode_attention="sdpa", layers="fused")
    with pytest.raises(ValueError, match="choose auto, fused or stock"):
        options(decode_attention="triton", layers="compiled")
    with pytest.raises(ValueError, match="decode_tile needs the fused layers"):
        options(decode_attention="sdpa", decode_tile=CANDIDATE_TILES[0])
    with pytest.raises(ValueError, match=r"lacks \['num_warps'\]"):
        options(decode_attention="triton", decode_tile=dict(BLOCK=32, num_stages=2))
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2))
    assert "model_type 'gpt2'" in unsupported_reason(gpt2)
    assert not engine_options(gpt2, decode_attention="triton").fused_layers
    assert not RolloutEngine(gpt2, engine_options(gpt2, decode_attention="triton")).options.fused_layers
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        engine_options(gpt2, decode_attention="triton", layers="fused")


@pytest.mark.parametrize("tile", CANDIDATE_TILES[::2])
def test_every_candidate_tile_decodes_the_same_tokens(tile):
    """decode_tile (bench_rollout times each CANDIDATE_TILE in the step): another key block and
    pipeline depth in the fused step's attention leave greedy tokens as the default tile's; prompts
    longer than the 32- and 128-key blocks, so the kernel's loop runs several blocks."""
    model = family_model("llama", {}).eval()
    prompts = random_tokens([40, 3, 150, 70], seed=71)
    want = RolloutEngine(model, engine_options(model, decode_attention="triton")).generate(
        prompts, max_new_tokens=6, eos_token_ids=[NO_EOS])
    engine = RolloutEngine(model, engine_options(model, decode_attention="triton", decode_tile=tile))
    assert engine.options.decode_tile == tile
    assert engine.generate(prompts, max_new_tokens=6, eos_token_ids=[NO_EOS]) == want
