"""Decode attention over the static cache (ple_fast/kernels/decode_attention.py) against its fp64 oracle.
CPU runs under TRITON_INTERPRET=1; the suite's `-m gpu` runs the compiled kernel."""
import pytest
import torch

from ple_fast.kernels.decode_attention import CANDIDATE_TILES, combine, decode_attention, decode_attention_reference
from ple_fast.kernels.rotary import rotary_reference

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(actual).any()
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


# (batch, query heads, kv heads, head dim, cache capacity, kv_length, window, dtype):
# MHA, GQA 2/4/8 and an odd group of 3, head dims 16/64/80/128 (80: not a power of two),
# kv_length not a multiple of the 64-key block, one key, capacity beyond kv_length (a view)
CASES = [
    (3, 4, 2, 16, 128, 100, None, torch.float32),
    (2, 8, 8, 128, 64, 64, None, torch.bfloat16),
    (4, 12, 4, 80, 256, 200, 37, torch.float16),
    (2, 24, 8, 64, 192, 130, None, torch.bfloat16),
    (5, 16, 2, 64, 128, 65, 8, torch.float32),
    (1, 2, 1, 16, 64, 1, None, torch.float32),
    (3, 32, 4, 64, 320, 320, 1, torch.bfloat16),
]


@pytest.mark.parametrize("batch,q_heads,kv_heads,dim,capacity,kv_length,window,dtype", CASES)
def test_matches_the_fp64_oracle(batch, q_heads, kv_heads, dim, capacity, kv_length, window, dtype):
    g = torch.Generator().manual_seed(batch * 1000 + dim + kv_length)
    q = torch.randn(batch, q_heads, 1, dim, generator=g).to(dtype).to(DEVICE)
    keys = (torch.randn(batch, kv_heads, capacity, dim, generator=g) * 2).to(dtype).to(DEVICE)
    values = torch.randn(batch, kv_heads, capacity, dim, generator=g).to(dtype).to(DEVICE)
    positions = torch.randint(0, kv_length, (batch,), generator=g)
    positions[0] = kv_length - 1                       # one row at the last slot, others earlier
    positions = positions.to(DEVICE)
    # slots past each row's position hold garbage that must not leak in (NaN would show through 0 * NaN)
    keys[:, :, kv_length:] = float("nan")
    values[:, :, kv_length:] = float("nan")
    got = decode_attention(q, keys, values, positions, kv_length, dim ** -0.5, window)
    want = decode_attention_reference(q, keys, values, positions, kv_length, dim ** -0.5, window)
    assert got.shape == q.shape and got.dtype == dtype
    assert rel_err(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("tile", CANDIDATE_TILES + (dict(BLOCK=16, num_stages=1, num_warps=2),))
@pytest.mark.parametrize("window", [None, 7])
def test_every_candidate_tile_matches_the_oracle(tile, window):
    """The tiles bench_rollout times beside the default (CANDIDATE_TILES) compute the same attention;
    100 keys: no tile's BLOCK divides them, and on CPU two key splits of a tile's BLOCK multiple."""
    batch, q_heads, kv_heads, dim, capacity, kv_length = 3, 8, 2, 64, 192, 100
    g = torch.Generator().manual_seed(tile["BLOCK"] + (window or 0))
    q = torch.randn(batch, q_heads, 1, dim, generator=g).to(torch.bfloat16).to(DEVICE)
    cache = torch.randn(2, batch, kv_heads, capacity, dim, generator=g).to(torch.bfloat16).to(DEVICE)
    positions = torch.tensor([kv_length - 1, 0, 57], device=DEVICE)
    got = decode_attention(q, cache[0], cache[1], positions, kv_length, dim ** -0.5, window, tile=tile)
    want = decode_attention_reference(q, cache[0], cache[1], positions, kv_length, dim ** -0.5, window)
    assert rel_err(got, want) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("batch,q_heads,kv_heads,dim,capacity,kv_length,window,dtype", CASES)
def test_fused_cache_write_then_attend(batch, q_heads, kv_heads, dim, capacity, kv_length, window, dtype):
    """new_keys / new_values: the kernel writes this step's K/V into slot positions[b] of a view into
    a multi-layer cache (that slot held NaN), touches nothing else, and attends as the oracle does
    over the written cache; positions cover first, last and middle slots, so with two key splits
    (CPU) the writing split is the first in some rows and the last in others."""
    g = torch.Generator().manual_seed(7 * batch + dim + kv_length)
    q = torch.randn(batch, q_heads, 1, dim, generator=g).to(dtype).to(DEVICE)
    cache = (torch.randn(2, 2, batch, kv_heads, capacity, dim, generator=g)).to(dtype).to(DEVICE)
    new = torch.randn(2, batch, kv_heads, 1, dim, generator=g).to(dtype).to(DEVICE)
    positions = torch.randint(0, kv_length, (batch,), generator=g)
    positions[0] = kv_length - 1
    positions[-1] = 0 if batch > 1 else positions[-1]
    positions = positions.to(DEVICE)
    rows = torch.arange(batch, device=DEVICE)
    cache[:, 1, rows, :, positions] = float("nan")      # layer 1's slot to be written
    keys, values = cache[0, 1], cache[1, 1]              # views, as the engine passes them
    want_cache = cache.clone()
    want_cache[0, 1, rows, :, positions] = new[0, :, :, 0]
    want_cache[1, 1, rows, :, positions] = new[1, :, :, 0]
    got = decode_attention(q, keys, values, positions, kv_length, dim ** -0.5, window,
                           new_keys=new[0], new_values=new[1])
    assert torch.equal(cache, want_cache)
    want = decode_attention_reference(q, want_cache[0, 1], want_cache[1, 1], positions, kv_length, dim ** -0.5,
                                      window)
    assert rel_err(got, want) < TOLERANCE[dtype]


def hf_rotary_rows(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [B, 1, D] as HF's rotary modules make them: fp32 angles, cast to the model dtype."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = positions.float().cpu()[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]
    return emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)


@pytest.mark.parametrize("batch,q_heads,kv_heads,dim,capacity,kv_length,window,dtype", CASES)
def test_rotary_inside_the_kernel_equals_hf_rotation_then_attention(batch, q_heads, kv_heads, dim, capacity,
                                                                    kv_length, window, dtype):
    """cos / sin: the kernel rotates the query and the new key itself. The written key equals HF's
    apply_rotary_pos_emb arithmetic in the cache dtype, within one unit of its last place (the kernel
    launches without fp fusion, so it rounds each product and the sum as HF does; run A on an H200,
    with fusion on, failed here), and the output matches the oracle over HF-rotated inputs. Tables of
    every position (rope_table=True, read at each row's position) give the same bits."""
    g = torch.Generator().manual_seed(11 * batch + dim + kv_length)
    q = torch.randn(batch, q_heads, 1, dim, generator=g).to(dtype).to(DEVICE)
    cache = torch.randn(2, batch, kv_heads, capacity, dim, generator=g).to(dtype).to(DEVICE)
    new = torch.randn(2, batch, kv_heads, 1, dim, generator=g).to(dtype).to(DEVICE)
    positions = torch.randint(0, kv_length, (batch,), generator=g)
    positions[0] = kv_length - 1
    positions = positions.to(DEVICE)
    cos, sin = hf_rotary_rows(positions, dim, dtype)
    rows = torch.arange(batch, device=DEVICE)
    cache[:, rows, :, positions] = float("nan")
    q_rot, k_rot = (rotary_reference(t, cos.unsqueeze(1), sin.unsqueeze(1)) for t in (q, new[0]))
    want_cache = cache.clone()
    want_cache[0, rows, :, positions] = k_rot[:, :, 0]
    want_cache[1, rows, :, positions] = new[1, :, :, 0]
    by_table = cache.clone()
    cos_table, sin_table = (t[:, 0] for t in hf_rotary_rows(torch.arange(capacity), dim, dtype))   # [capacity, D]
    got_by_table = decode_attention(q, by_table[0], by_table[1], positions, kv_length, dim ** -0.5, window,
                                    new_keys=new[0], new_values=new[1], cos=cos_table, sin=sin_table, rope_table=True)
    got = decode_attention(q, cache[0], cache[1], positions, kv_length, dim ** -0.5, window,
                           new_keys=new[0], new_values=new[1], cos=cos, sin=sin)
    written = cache[0, rows, :, positions]
    want_written = want_cache[0, rows, :, positions]
    assert not torch.isnan(written).any()
    ulp = torch.finfo(dtype).eps
    assert ((written.double() - want_written.double()).abs() <= ulp * want_written.double().abs()).all()
    assert torch.equal(cache[1], want_cache[1])
    want = decode_attention_reference(q_rot, want_cache[0], want_cache[1], positions, kv_length, dim ** -0.5, window)
    assert rel_err(got, want) < TOLERANCE[dtype]
    assert torch.equal(got_by_table, got) and torch.equal(by_table, cache)


def test_rotary_needs_the_new_keys_and_an_even_head_dim():
    q = torch.zeros(1, 4, 1, 16, device=DEVICE)
    kv = torch.zeros(1, 2, 64, 16, device=DEVICE)
    pos = torch.zeros(1, dtype=torch.long, device=DEVICE)
    table = torch.ones(1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="rotary"):
        decode_attention(q, kv, kv, pos, 64, 0.25, cos=table, sin=table)
    with pytest.raises(ValueError, match=r"rope tables must be \[positions, 16\]"):
        decode_attention(q, kv, kv, pos, 64, 0.25, new_keys=kv[:, :, :1], new_values=kv[:, :, :1],
                         cos=table.view(1, 1, 16), sin=table.view(1, 1, 16), rope_table=True)


def test_slots_after_the_position_do_not_leak():
    """Future slots of a row (written by other rows' longer prompts) change nothing."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 1, 32, generator=g).to(DEVICE)
    keys = torch.randn(2, 2, 128, 32, generator=g).to(DEVICE)
    values = torch.randn(2, 2, 128, 32, generator=g).to(DEVICE)
    positions = torch.tensor([10, 70], device=DEVICE)
    before = decode_attention(q, keys, values, positions, 128, 0.2)
    keys[0, :, 11:] = 1e4
    values[0, :, 11:] = float("nan")
    after = decode_attention(q, keys, values, positions, 128, 0.2)
    assert torch.equal(before[0], after[0])


def test_combine_merges_splits_exactly():
    """Online-softmax states of disjoint key ranges merge to the softmax over all keys; an empty
    split (max -inf, sum 0) contributes nothing."""
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(3, 2, 40, generator=g, dtype=torch.float64)
    values = torch.randn(3, 40, 8, generator=g, dtype=torch.float64)
    states = []
    for lo, hi in ((0, 13), (13, 13), (13, 40)):
        part = scores[:, :, lo:hi]
        m = part.amax(dim=-1) if hi > lo else torch.full(part.shape[:2], float("-inf"), dtype=torch.float64)
        p = torch.exp(part - m.unsqueeze(-1)) if hi > lo else part
        states.append((m, p.sum(-1), p @ values[:, lo:hi]))
    m, l, acc = (torch.stack([s[i] for s in states], dim=1).float() for i in range(3))
    want = scores.softmax(-1) @ values
    assert rel_err(combine(m, l, acc), want) < 1e-6


def test_rejects_what_is_not_a_decode_step():
    q = torch.zeros(1, 4, 2, 16, device=DEVICE)
    kv = torch.zeros(1, 2, 64, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one-token decode step"):
        decode_attention(q, kv, kv, torch.zeros(1, dtype=torch.long, device=DEVICE), 64, 0.25)


def test_split_rule_fills_one_wave_of_sms(monkeypatch):
    from types import SimpleNamespace

    from ple_fast.kernels.decode_attention import BLOCK_L, _splits

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert _splits(32, 8, 384, cuda) == 1            # 256 programs: one wave already, no merge
    assert _splits(16, 8, 384, cuda) == 2            # 128 programs: two splits make 256
    assert _splits(2, 8, 384, cuda) == 384 // BLOCK_L  # few rows: as many splits as BLOCK_L blocks allow
    assert _splits(2, 8, 4096, cuda) == 9            # ... or as one wave asks for (ceil(132 / 16))
