"""The fast rollout engine against Hugging Face generate and against the model's own softmax."""
import math
from collections import Counter

import pytest
import torch

from ple_fast.engine import ENGINE_ATTENTION, RolloutEngine, candidate_probs, reference_candidate_probs, sample_tokens
from ple_fast.plan import engine_options
from ple_fast.rollout import BACKENDS, generate, generate_dual

VOCAB = 97
PAD, DEFAULT_EOS = 0, 2
NO_EOS = VOCAB + 1   # an id no model here can emit


def tiny_model(family: str, *, vocab: int = VOCAB, seed: int = 0, init: float = 0.3, **extra):
    """A random fp32 causal LM; a large init std makes greedy choices far from ties."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    config = config_cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        initializer_range=init, pad_token_id=PAD, eos_token_id=DEFAULT_EOS, bos_token_id=None,
                        tie_word_embeddings=False, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = DEFAULT_EOS
    return model.train()          # the trainer hands over a model in training mode


def random_tokens(lengths, seed, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def midbatch_eos(responses):
    """A token that some responses emit mid-way (after their first token) and others never emit."""
    counts = Counter()
    for r in responses:
        counts.update({t for t in r[1:-1] if t not in r[:1]})
    for tok, n in counts.most_common():
        if n < len(responses) and any(tok not in r for r in responses):
            return tok
    raise AssertionError("no token fits as a mid-batch EOS; change the test seed")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_greedy_dual_equals_hf_generate_run_separately(family):
    model = tiny_model(family)
    queries = random_tokens([3, 9, 1, 6, 4], seed=1)
    principle = random_tokens([5], seed=2)[0]
    new = 14
    # find an EOS that stops some rows early and not others
    probe = generate(model, queries + [principle + q for q in queries], max_new_tokens=new, eos_token_id=NO_EOS)
    eos = midbatch_eos(probe)
    hf_orig = generate(model, queries, max_new_tokens=new, eos_token_id=eos)
    hf_prin = generate(model, [principle + q for q in queries], max_new_tokens=new, eos_token_id=eos)
    stopped = [r[-1] == eos and len(r) < new for r in hf_orig + hf_prin]
    assert any(stopped) and not all(stopped), "the test must see EOS mid-batch"
    engine = RolloutEngine(model)
    fast = generate_dual(model, queries, principle, max_new_tokens=new, eos_token_id=eos, backend="fast",
                         engine=engine)
    assert fast.originals == hf_orig
    assert fast.principled == hf_prin
    assert model.training, "the model's training flag is restored"
    assert model.config._attn_implementation != ENGINE_ATTENTION
    if family != "llama":
        return
    # the caller's engine is kept between calls: a second call with other shapes reuses or regrows its buffers
    longer = random_tokens([12, 2], seed=3)
    again = generate_dual(model, longer, principle, max_new_tokens=new + 10, eos_token_id=eos, backend="fast",
                          engine=engine)
    assert again.originals == generate(model, longer, max_new_tokens=new + 10, eos_token_id=eos)
    assert again.principled == generate(model, [principle + q for q in longer], max_new_tokens=new + 10,
                                        eos_token_id=eos)


@pytest.mark.parametrize("prefill_tokens,attention", [(32768, "sdpa"), (7, "sdpa"), (1, "sdpa"),
                                                      (32768, "segments"), (7, "segments"),
                                                      (32768, "triton"), (7, "triton")])
def test_packed_prefill_computes_the_principle_once_and_equals_hf(prefill_tokens, attention):
    """Mixed prefixed / plain prompts in any order; small budgets split the packed prefill in chunks."""
    model = tiny_model("qwen2", seed=3)
    prompts = random_tokens([4, 1, 6, 2, 5], seed=21)
    prefixed = [True, False, True, True, False]
    principle = random_tokens([6], seed=22)[0]
    engine = RolloutEngine(model, engine_options(model, prefill_tokens=prefill_tokens, prefill_attention=attention))
    fed = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: fed.append(args[0].numel()))
    try:
        got = engine.generate(prompts, max_new_tokens=5, eos_token_ids=[NO_EOS], prefix=principle, prefixed=prefixed)
    finally:
        hook.remove()
    expected = generate(model, [principle + p if f else p for p, f in zip(prompts, prefixed)], max_new_tokens=5,
                        eos_token_id=NO_EOS)
    assert got == expected
    prefill_fed = sum(fed) - 4 * len(prompts)            # the 4 decode steps feed one token per row
    if prefill_tokens >= sum(map(len, prompts)):          # one chunk: every token once, the principle too
        assert prefill_fed == len(principle) + sum(map(len, prompts))
    else:                                                 # once per chunk that has followers
        assert len(principle) + sum(map(len, prompts)) < prefill_fed <= 3 * len(principle) + sum(map(len, prompts))


def test_sliding_window_matches_hf_per_prompt():
    model = tiny_model("mistral", sliding_window=4)
    prompts = random_tokens([6, 2], seed=4)
    fast = generate(model, prompts, max_new_tokens=10, eos_token_id=NO_EOS, backend="fast")
    for prompt, got in zip(prompts, fast):          # one prompt per HF call: no padding inside its window
        assert got == generate(model, [prompt], max_new_tokens=10, eos_token_id=NO_EOS)[0]


@pytest.mark.gpu          # on CPU under the Triton interpreter; on a GPU compiled, decode in CUDA graphs
@pytest.mark.parametrize("family,window", [("llama", None), ("qwen2", None), ("mistral", 5)])
@pytest.mark.parametrize("fused_layers", [True, False])
def test_decode_attention_kernel_engine_equals_hf(family, window, fused_layers):
    """The engine with its Triton decode attention (the CUDA default) against HF generate: grouped
    heads, ragged prompts, the principle's shared slots, and a sliding window; through the fused
    decode layers (the CUDA default) and through the stock HF layers."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = {"sliding_window": window} if window else {}
    model = tiny_model(family, seed=4, **extra).to(device)
    prompts = random_tokens([3, 9, 1, 6], seed=51)
    principle = random_tokens([4], seed=52)[0]
    prefixed = [True, False, False, True]
    engine = RolloutEngine(model, engine_options(model, decode_attention="triton",
                                                 layers="fused" if fused_layers else "stock"))
    got = engine.generate(prompts, max_new_tokens=12, eos_token_ids=[NO_EOS], prefix=principle, prefixed=prefixed)
    full = [principle + p if f else p for p, f in zip(prompts, prefixed)]
    if window:      # one prompt per HF call: no padding inside its window
        want = [generate(model, [p], max_new_tokens=12, eos_token_id=NO_EOS)[0] for p in full]
    else:
        want = generate(model, full, max_new_tokens=12, eos_token_id=NO_EOS)
    assert got == want


def test_live_weights_are_used_after_an_in_place_update():
    model = tiny_model("llama")
    prompts = random_tokens([4, 7], seed=5)
    engine = RolloutEngine(model)                # one engine across the update, as the trainer keeps it
    before = generate(model, prompts, max_new_tokens=8, eos_token_id=NO_EOS, backend="fast", engine=engine)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)        # what an optimizer step does: same storage, new values
    after = generate(model, prompts, max_new_tokens=8, eos_token_id=NO_EOS, backend="fast", engine=engine)
    assert after == generate(model, prompts, max_new_tokens=8, eos_token_id=NO_EOS)
    assert after != before


def test_generate_fast_with_batch_size_chunks_equals_hf():
    model = tiny_model("qwen2", seed=1)
    prompts = random_tokens([5, 1, 8, 3, 2], seed=6)
    got = generate(model, prompts, max_new_tokens=9, eos_token_id=NO_EOS, backend="fast", batch_size=2)
    assert got == generate(model, prompts, max_new_tokens=9, eos_token_id=NO_EOS)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = tiny_model("llama", init=0.05)
    queries = random_tokens([3, 5, 2, 6], seed=7)
    principle = random_tokens([4], seed=8)[0]
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=40, eos_token_id=NO_EOS, backend="fast",
              engine=RolloutEngine(model))
    a = generate_dual(model, queries, principle, seed=11, **kw)
    b = generate_dual(model, queries, principle, seed=11, **kw)
    c = generate_dual(model, queries, principle, seed=12, **kw)
    assert a == b
    assert a != c


def test_top_k_one_equals_greedy():
    model = tiny_model("llama", init=0.05)
    queries = random_tokens([3, 5, 2], seed=9)
    principle = random_tokens([3], seed=10)[0]
    greedy = generate_dual(model, queries, principle, max_new_tokens=10, eos_token_id=NO_EOS, backend="fast")
    top1 = generate_dual(model, queries, principle, max_new_tokens=10, temperature=0.7, top_k=1,
                         eos_token_id=NO_EOS, backend="fast", seed=3)
    assert top1 == greedy


def _chi2_bound(dof: int, z: float = 4.753) -> float:
    """Wilson-Hilferty upper quantile of chi-square(dof) at z sigma (4.753: p = 1e-6)."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs * counts.sum()
    kept = probs > 0
    assert counts[~kept].sum() == 0, "a token with probability 0 was sampled"
    stat = float((((counts - expected) ** 2)[kept] / expected[kept]).sum())
    return stat, int(kept.sum()) - 1


def test_dense_mask_prefill_runs_in_smaller_chunks(monkeypatch):
    """The CPU's dense-mask prefill holds [N, N] masks and scores per chunk, so its chunks default to
    DENSE_PREFILL_TOKENS (one 32768-token chunk of 6000 short prompts peaked at 13.7 GB); varlen
    backends keep PREFILL_TOKENS, and an explicit size wins."""
    import ple_fast.engine.prefill as prefill_module
    from ple_fast.plan import DENSE_PREFILL_TOKENS, PREFILL_TOKENS

    model = tiny_model("llama").eval()
    assert RolloutEngine(model).options.prefill_tokens == DENSE_PREFILL_TOKENS      # auto -> sdpa on CPU
    assert engine_options(model, prefill_attention="segments").prefill_tokens == PREFILL_TOKENS
    assert engine_options(model, prefill_tokens=100).prefill_tokens == 100
    engine = RolloutEngine(model)
    chunks = []
    real = prefill_module._prefill_chunk
    monkeypatch.setattr(prefill_module, "_prefill_chunk", lambda model, cache, first, prompts, *a:
                        chunks.append(len(prompts)) or real(model, cache, first, prompts, *a))
    prompts = [[5, 7, 3]] * (DENSE_PREFILL_TOKENS // 3 + 10)
    out = engine.generate(prompts, max_new_tokens=1)
    assert chunks == [DENSE_PREFILL_TOKENS // 3, 10] and len(set(map(tuple, out))) == 1     # greedy: one answer


@pytest.mark.parametrize("temperature,top_k,top_p,fused", [
    (1.0, 0, 1.0, False), (0.8, 5, 1.0, False), (1.3, 0, 0.7, False), (0.7, 0, 1.0, True)])
def test_sampled_first_tokens_follow_the_model_distribution(temperature, top_k, top_p, fused):
    """fused: the Triton race kernel (the CUDA default for plain temperature sampling)."""
    vocab, draws = 12, 6000
    model = tiny_model("llama", vocab=vocab, init=0.15, seed=2).eval()
    prompt = [5, 7, 3]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1:]
    probs = reference_candidate_probs(logits, temperature, top_k, top_p)[0]
    assert (probs[probs > 0] * draws).min() >= 5, "expected counts too small for a chi-square test"
    assert (probs > 0).sum() >= 3
    engine = RolloutEngine(model, engine_options(model, fused_sampling=fused))
    first = engine.generate([prompt] * draws, max_new_tokens=1, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=123)
    counts = torch.bincount(torch.tensor([r[0] for r in first]), minlength=vocab).double()
    stat, dof = _chi2(counts, probs)
    assert stat < _chi2_bound(dof), (stat, dof, counts, probs * draws)
    # power: the same draws are rejected against a visibly different distribution
    wrong = reference_candidate_probs(logits, temperature * 1.5, 0, 1.0)[0]
    wrong_stat = float((((counts - wrong * draws) ** 2) / (wrong * draws)).sum())
    assert wrong_stat > _chi2_bound(vocab - 1)


@pytest.mark.gpu          # on CPU under the Triton interpreter; on a GPU compiled, decode in CUDA graphs
@pytest.mark.parametrize("decode_attention", ["auto", "triton"])
def test_fused_sampling_follows_the_race_oracle_at_every_step(decode_attention):
    """Every decode step draws with its own step counter: token t of row b is the fp64 race of the
    model's logits over the uniforms of (seed, row b, step t), which the kernel exports. With the
    Triton decode attention (the CUDA default; on CPU only when asked) the step record kernel picks
    each row's winner among the race's splits."""
    from ple_fast.kernels.sampling import race_sample_reference, race_uniforms

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("llama", init=0.05).eval().to(device)
    prompts = random_tokens([3, 5, 2, 6], seed=41)
    engine = RolloutEngine(model, engine_options(model, fused_sampling=True, decode_attention=decode_attention))
    assert engine.decode_kernel == (decode_attention == "triton" or device == "cuda")
    out = engine.generate(prompts, max_new_tokens=6, temperature=0.9, seed=17)
    assert out == engine.generate(prompts, max_new_tokens=6, temperature=0.9, seed=17)
    assert out != engine.generate(prompts, max_new_tokens=6, temperature=0.9, seed=18)
    assert engine.last_stats.graphs == (device == "cuda")
    seed = torch.tensor([17], device=device)
    uniforms = [race_uniforms(len(prompts), VOCAB, seed, torch.tensor([t], device=device)) for t in range(6)]
    for b, (prompt, new) in enumerate(zip(prompts, out)):
        assert len(new) == 6
        seq = list(prompt)
        for t, token in enumerate(new):
            with torch.no_grad():
                logits = model(torch.tensor([seq], device=device)).logits[0, -1:]
            assert token == int(race_sample_reference(logits, uniforms[t][b:b + 1], 0.9)), (b, t)
            seq.append(token)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.5, 3, 1.0), (1.0, 0, 0.6), (2.0, 7, 0.8), (1.0, 1, 1.0), (1.0, 0, 1e-4), (0.9, 100, 0.9)])
def test_candidate_probs_match_the_dense_reference(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g) * 3
    logits[0, :5] = 1.25                       # ties
    probs, ids = candidate_probs(logits, temperature, top_k, top_p)
    dense = torch.zeros(logits.shape, dtype=torch.float64)
    dense.scatter_(1, ids if ids is not None else torch.arange(40).expand(6, 40), probs.double())
    ref = reference_candidate_probs(logits, temperature, top_k, top_p)
    if top_k == 0 and top_p == 1.0 or top_k == 1:
        assert torch.allclose(dense, ref, atol=1e-6)
    else:                                      # ties may be broken differently; compare row by row off-tie
        for row in range(1, 6):
            assert torch.allclose(dense[row], ref[row], atol=1e-6)
    assert torch.allclose(dense.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-6)


def test_sample_tokens_greedy_is_argmax_and_never_picks_filtered_tokens():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 30, generator=g)
    assert torch.equal(sample_tokens(logits, None, 0.0), logits.argmax(-1))
    noise = torch.empty(64, 3).exponential_(generator=g)
    picked = sample_tokens(logits, noise, 1.0, top_k=3)
    assert (picked.unsqueeze(1) == logits.topk(3).indices).any(1).all()


def test_all_rows_done_stops_decoding_early():
    model = tiny_model("llama")
    prompts = random_tokens([3, 4], seed=12)
    firsts = {r[0] for r in generate(model, prompts, max_new_tokens=1, eos_token_id=NO_EOS)}
    engine = RolloutEngine(model)
    out = engine.generate(prompts, max_new_tokens=30, eos_token_ids=sorted(firsts))
    assert all(len(r) == 1 and r[0] in firsts for r in out)
    assert engine.last_stats.decode_steps == 1


def test_edge_cases_and_errors():
    model = tiny_model("llama")
    assert generate(model, [[4, 5]], max_new_tokens=0, backend="fast") == [[]]
    assert generate_dual(model, [], [3, 4], max_new_tokens=4, backend="fast").originals == []
    assert generate_dual(model, [], [3, 4], max_new_tokens=4, backend="hf").principled == []
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[4], []], max_new_tokens=3, backend="fast")
    with pytest.raises(ValueError, match="at least one token"):
        generate_dual(model, [[]], [3], max_new_tokens=3, backend="fast")
    with pytest.raises(ValueError, match="choose one of hf, fast"):
        generate_dual(model, [[4]], [3], max_new_tokens=3, backend="vllm")
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[4]], max_new_tokens=3, temperature=1.0, top_p=0.0, backend="fast")
    with pytest.raises(ValueError, match="cuda_graphs=True but the model is on cpu"):
        engine_options(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="prefill_attention='dense': choose one of auto, sdpa"):
        engine_options(model, prefill_attention="dense")
    with pytest.raises(TypeError, match="not a Hugging Face causal LM"):
        RolloutEngine(torch.nn.Linear(2, 2))
    assert BACKENDS == ("hf", "fast")


def test_peft_lora_model_equals_hf_generate():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                           init_lora_weights=False)
    wrapped = peft.get_peft_model(model, lora)
    queries = random_tokens([3, 6], seed=13)
    principle = [7, 8, 9]
    fast = generate_dual(wrapped, queries, principle, max_new_tokens=8, eos_token_id=NO_EOS, backend="fast")
    assert fast == generate_dual(wrapped, queries, principle, max_new_tokens=8, eos_token_id=NO_EOS)


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_principle_and_query_share_one_bos(backend):
    """With bos_token_id, the principle-guided prompt is BOS + principle + query without its BOS."""
    model = tiny_model("llama")
    bos = 1
    queries = [[bos] + q for q in random_tokens([4, 7], seed=5)] + [[bos]]
    principle = [bos] + random_tokens([3], seed=6)[0]
    out = generate_dual(model, queries, principle, max_new_tokens=6, eos_token_id=NO_EOS, backend=backend,
                        bos_token_id=bos)
    expected = [principle + q[1:] for q in queries[:2]] + [principle + [bos]]   # a lone BOS stays
    assert out.principled == generate(model, expected, max_new_tokens=6, eos_token_id=NO_EOS)
    assert out.originals == generate(model, queries, max_new_tokens=6, eos_token_id=NO_EOS)
    plain = generate_dual(model, queries, principle, max_new_tokens=6, eos_token_id=NO_EOS, backend=backend)
    assert plain.principled == generate(model, [principle + q for q in queries], max_new_tokens=6,
                                        eos_token_id=NO_EOS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cuda_graph_engine_equals_hf_generate_on_gpu(family):
    """The GPU path end to end: packed prefill (auto backend), CUDA-graph decode, mid-batch EOS, fp32,
    seeded sampling through the torch path (top-p) and the fused race kernel (plain temperature)."""
    model = tiny_model(family).to("cuda")
    queries = random_tokens([3, 9, 1, 6, 4, 7, 2, 5], seed=31)
    principle = random_tokens([6], seed=32)[0]
    new = 60                                            # ends past slot 64: two cache lengths, two graphs
    probe = generate(model, queries + [principle + q for q in queries], max_new_tokens=new, eos_token_id=NO_EOS)
    eos = midbatch_eos(probe)
    engine = RolloutEngine(model)
    fast = generate_dual(model, queries, principle, max_new_tokens=new, eos_token_id=eos, backend="fast",
                         engine=engine)
    assert engine.last_stats.graphs, "decode steps ran as CUDA graphs"
    assert fast.originals == generate(model, queries, max_new_tokens=new, eos_token_id=eos)
    assert fast.principled == generate(model, [principle + q for q in queries], max_new_tokens=new, eos_token_id=eos)
    for top_p in (0.9, 1.0):
        sample = dict(max_new_tokens=24, temperature=1.0, top_p=top_p, eos_token_id=NO_EOS, backend="fast",
                      engine=engine)
        first = generate_dual(model, queries, principle, seed=5, **sample)
        assert engine.last_stats.graphs
        assert first == generate_dual(model, queries, principle, seed=5, **sample)
        assert first != generate_dual(model, queries, principle, seed=6, **sample)
