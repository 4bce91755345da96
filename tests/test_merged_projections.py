"""q / k / v and gate / up weights laid out back to back (ple_fast.merged_projections), and the decode
step that reads each group as one matmul: same parameters, same training, same tokens."""
import copy

import pytest
import torch
import torch.nn.functional as F

from ple_fast.engine import RolloutEngine
from ple_fast.kernels.decode_attention import decode_attention
from ple_fast.kernels.swiglu import silu_mul_forward, silu_mul_reference
from ple_fast.merged_projections import merge_projection_storage, merged_projection, projection_groups
from ple_fast.plan import engine_options
from ple_fast.rollout import generate
from test_fused_layers import (DEVICE, FAMILIES, FP32_FORWARD_TOL, family_model, prepared_step, rel_err,
                               steps_from_one_cache)
from test_rollout import NO_EOS, random_tokens

pytestmark = pytest.mark.gpu       # CPU here (the interpreter); bench/gpu_suite.sh runs them on the GPU


def groups(model):
    return [g for layer in model.model.layers for g in projection_groups(layer)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merge_keeps_every_parameter_and_its_training(family, tmp_path):
    """Same Parameter objects, values, dtypes and requires_grad; each group then one matrix over the
    parameters' own storage (a write through a parameter shows in it). An AdamW built before the merge
    trains the merged model exactly as an unmerged copy; save_pretrained / from_pretrained round-trips."""
    model = family_model(family, {})
    twin = copy.deepcopy(model)
    before = {name: (id(p), p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    assert all(merged_projection(g) is None for g in groups(model))
    assert merge_projection_storage(model) == 2 * model.config.num_hidden_layers
    assert merge_projection_storage(model) == 0                        # already so: nothing moves
    for name, p in model.named_parameters():
        ident, value, grad = before[name]
        assert id(p) == ident and torch.equal(p, value) and p.requires_grad == grad, name
    attn = model.model.layers[0].self_attn
    weight, bias, sizes = merged_projection((attn.q_proj, attn.k_proj, attn.v_proj))
    assert sizes == [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
    assert (bias is not None) == (family == "qwen2")
    x = torch.randn(5, model.config.hidden_size, device=DEVICE)
    separate = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
    torch.testing.assert_close(F.linear(x, weight, bias), separate)
    with torch.no_grad():
        attn.k_proj.weight[0, 0] = 123.0                                  # the view is the parameter's storage
    assert weight[sizes[0], 0] == 123.0
    with torch.no_grad():
        attn.k_proj.weight[0, 0] = twin.model.layers[0].self_attn.k_proj.weight[0, 0]
    ids = torch.tensor([random_tokens([12], seed=3)[0]], device=DEVICE)
    for _ in range(3):
        for m, opt in ((model, optimizer), (twin, twin_optimizer)):
            opt.zero_grad()
            m(ids, labels=ids).loss.backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    assert all(merged_projection(g) is not None for g in groups(model))   # the optimizer wrote in place
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).to(DEVICE)
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name


def test_merged_views_end_where_the_storage_moves():
    """A parameter given new storage (as load_state_dict(assign=True) or a deepcopy give it) or a hooked
    module: no merged view, so the step runs those projections one by one; a merge lays them out again."""
    model = family_model("llama", {})
    merge_projection_storage(model)
    mlp = model.model.layers[1].mlp
    mlp.up_proj.weight.data = mlp.up_proj.weight.data.clone()
    assert merged_projection((mlp.gate_proj, mlp.up_proj)) is None
    assert merged_projection(projection_groups(model.model.layers[0])[1]) is not None
    assert merge_projection_storage(model) == 1
    attn = model.model.layers[0].self_attn
    handle = attn.v_proj.register_forward_hook(lambda *args: None)
    assert merged_projection((attn.q_proj, attn.k_proj, attn.v_proj)) is None
    assert merge_projection_storage(model) == 0          # hooked: left as it is
    handle.remove()
    other = copy.deepcopy(model)                          # Parameter.__deepcopy__ clones each one apart
    assert all(merged_projection(g) is None for g in groups(other))
    assert merge_projection_storage(other) == 2 * other.config.num_hidden_layers


def test_strided_silu_mul_reads_the_halves_in_place():
    """The merged gate / up output's halves, read in place: the bits of the contiguous kernel."""
    for dtype in (torch.float32, torch.bfloat16):
        for rows, width in ((1, 1), (3, 48), (5, 200)):
            both = torch.randn(rows, 2 * width + 3, device=DEVICE).to(dtype)[:, :2 * width]
            gate, up = both.split(width, dim=-1)
            assert gate.is_contiguous() == (rows == 1)          # one row: a plain offset view
            got = silu_mul_forward(gate, up)
            assert got.is_contiguous() and torch.equal(got, silu_mul_forward(gate.contiguous(), up.contiguous()))
            assert torch.allclose(got.float(), silu_mul_reference(gate.float(), up.float()), rtol=1e-2, atol=1e-2)


def test_decode_attention_reads_a_strided_query_in_place():
    """A query that is a view of the merged q / k / v output: the same output as its contiguous copy."""
    batch, q_heads, kv_heads, dim, capacity = 3, 4, 2, 16, 40
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(batch, (q_heads + 2 * kv_heads) * dim, generator=gen).to(DEVICE)
    q = qkv[:, :q_heads * dim].view(batch, q_heads, 1, dim)
    keys, values = (torch.randn(batch, kv_heads, capacity, dim, generator=gen).to(DEVICE) for _ in range(2))
    positions = torch.tensor([3, 17, 39], device=DEVICE)
    got = decode_attention(q, keys, values, positions, capacity, 0.25)
    assert torch.equal(got, decode_attention(q.contiguous(), keys, values, positions, capacity, 0.25))


@pytest.mark.parametrize("family,extra", FAMILIES)
def test_merged_decode_step_equals_the_separate_matmuls(family, extra, monkeypatch):
    """From the same cache and tokens, one decode step with each group as one matmul writes the K/V and
    gives the final hidden states of the step with the projections one by one (fp32, to 1e-5 of the
    largest value on the CPU)."""
    import ple_fast.fused_layers as fused_layers

    views = []
    real = fused_layers.merged_projection        # the decode step's lookups (the merge's own are not counted)
    monkeypatch.setattr(fused_layers, "merged_projection", lambda modules: views.append(real(modules)) or views[-1])
    model = family_model(family, extra).eval()
    prompts = random_tokens([3, 9, 1, 6], seed=81)
    principle = random_tokens([4], seed=82)[0]
    engine = prepared_step(model, prompts, principle, [True, False, False, True])
    assert merge_projection_storage(model) == 2 * model.config.num_hidden_layers
    outputs = steps_from_one_cache(model, engine, [dict(merged_projections=False), dict(merged_projections=True)])
    assert len(views) == 2 * model.config.num_hidden_layers and all(v is not None for v in views)  # one matmul each
    for got, want in zip(outputs[1], outputs[0]):       # one GEMM or three: the BLAS may block K apart
        assert not torch.isnan(got).any() and rel_err(got, want) < FP32_FORWARD_TOL


@pytest.mark.parametrize("family,extra", [("llama", {}), ("qwen2", {}), ("qwen3", {"head_dim": 16})])
def test_merged_engine_equals_hf_generate(family, extra):
    """Greedy dual generation with merged projections is token for token HF generate; the engine lays
    the weights out itself on its first call."""
    model = family_model(family, extra)
    queries = random_tokens([3, 9, 1, 6], seed=73)
    principle = random_tokens([4], seed=74)[0]
    engine = RolloutEngine(model, engine_options(model, decode_attention="triton", merged_projections=True))
    assert engine.options.merged_projections and engine.options.fused_layers
    got = engine.generate(queries + queries, max_new_tokens=8, eos_token_ids=[NO_EOS], prefix=principle,
                          prefixed=[False] * 4 + [True] * 4)
    assert all(merged_projection(g) is not None for g in groups(model))
    want = generate(model, queries + [principle + q for q in queries], max_new_tokens=8, eos_token_id=NO_EOS)
    assert got == want


def test_merged_projections_need_the_fused_layers():
    model = family_model("llama", {})
    for stock in (dict(decode_attention="sdpa"), dict(decode_attention="triton", layers="stock")):
        with pytest.raises(ValueError, match="merged_projections needs the fused layers"):
            engine_options(model, merged_projections=True, **stock)
