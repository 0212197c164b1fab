"""Conversion of every supported architecture: exact under forced full routing, weight-preserving,
and cached generation equal to recomputation under mixed hard routing."""

import contextlib
import copy

import pytest
import torch
from arch_cases import all_cases
from transformers.cache_utils import Cache

from ma_convert import convert, force_expert, routing_stats, set_routing_mode
from ma_convert.adapters import adapter_for
from ma_convert.core.meta_attention import MetaAttention
from ma_convert.modeling.attention import CACHE_KEYWORDS, cache_argument

CASES = all_cases()
TOL = dict(atol=1e-5, rtol=1e-5)


def converted(original, **overrides):
    return convert(copy.deepcopy(original), **overrides).eval()


def batch(case, padding):
    """Token ids (2, 12) and an attention mask with left or right padding on row 1 (or none)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, case.vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :5] = 0
    elif padding == "right":
        mask[1, -5:] = 0
    return ids, mask


def spread_routing(model, seed=0):
    """Random router outputs so that hard routing sends tokens to all three experts."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, MetaAttention):
            with torch.no_grad():
                m.router.fc2.weight.copy_(torch.randn(m.router.fc2.weight.shape, generator=g) * 3)
                m.router.fc2.bias.zero_()


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_forced_full_logits_equal_the_original(case, impl, padding):
    original = case.make(impl)
    model = converted(original)
    # Where the original's eager path is itself wrong (Falcon adds ALiBi twice), SDPA is the truth.
    reference = original if impl == "sdpa" or case.eager_is_reference else case.make("sdpa")
    ids, mask = batch(case, padding)
    with torch.no_grad(), force_expert(model, "full"):
        got = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], **TOL)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_forced_full_greedy_generation_is_identical(case, padding):
    original = case.make("sdpa")
    model = converted(original)
    ids, mask = batch(case, padding)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = original.generate(**kwargs)
        with force_expert(model, "full"):
            got = model.generate(**kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):  # the scores too, not only the argmax
        torch.testing.assert_close(a, b, **TOL)
    # With no mask given, generate infers it from the pad token as it does for the original.
    kwargs = dict(input_ids=torch.where(mask.bool(), ids, 0), max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=2)
    with torch.no_grad(), force_expert(model, "full"):
        assert torch.equal(model.generate(**kwargs), original.generate(**kwargs))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_weights_are_preserved(case):
    original = case.make("sdpa")
    model = converted(original)
    before, after = original.state_dict(), model.state_dict()
    assert set(before) <= set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    new = set(after) - set(before)
    assert new and all(".meta." in k for k in new)
    if getattr(original.config, "tie_word_embeddings", False):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cached_decoding_equals_recomputation_under_mixed_hard_routing(case):
    model = converted(case.make("sdpa"))
    spread_routing(model)
    assert_cached_decoding_equals_recomputation(model, case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_gets_the_cache_under_a_keyword_ma_convert_reads(case):
    """The original model's own attention, in a cached forward: the cache must arrive under a name in
    CACHE_KEYWORDS. transformers 5.24 renamed it (past_key_values -> cache) and converted models then
    decoded without a cache; a future rename fails here, loudly."""
    original = case.make("sdpa")
    attention = adapter_for(original.config.model_type).attention_modules(original)[0]
    calls = []
    attention.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    with torch.no_grad():
        original(input_ids=batch(case, "none")[0], use_cache=True)
    names = {name for name, value in calls[0].items() if isinstance(value, Cache)}
    assert names and names <= set(CACHE_KEYWORDS), f"attention got the cache as {names}, ma_convert reads {CACHE_KEYWORDS}"
    assert isinstance(cache_argument(calls[0]), Cache)


def test_a_cache_under_an_unknown_keyword_is_an_error():
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="passed the KV cache to attention as 'kv_store'"):
        cache_argument({"kv_store": DynamicCache(), "position_ids": None})
    assert cache_argument({"position_ids": None}) is None


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("routing", ["full", "mixed"])
def test_cached_generation_equals_uncached_generation(case, routing):
    """generate() with the cache and with use_cache=False give the same tokens and scores, under forced
    full and under mixed hard routing (the linear state, the local window and the full KV cache in play)."""
    model = converted(case.make("sdpa"))
    spread_routing(model, seed=7)
    set_routing_mode(model, "hard")
    ids, mask = batch(case, "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), force_expert(model, "full") if routing == "full" else contextlib.nullcontext():
        cached, uncached = model.generate(**kwargs), model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, **TOL)


def perturb_linear_experts(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts.1." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hybrid_linear_expert_decodes_as_it_recomputes(case):
    """The linear expert with an exact window reads the KV cache when decoding (no state)."""
    original = case.make("sdpa")
    if getattr(original.config, "sliding_window", None) is not None:  # a cache that drops old keys: refused
        with pytest.raises(ValueError, match="linear_window=3 cannot be used with a sliding-window model"):
            converted(original, linear_window=3)
        return
    model = converted(original, linear_window=3)
    spread_routing(model)
    perturb_linear_experts(model)
    assert_cached_decoding_equals_recomputation(model, case)
    with torch.no_grad():
        ids, mask = batch(case, "none")
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))


def assert_cached_decoding_equals_recomputation(model, case):
    set_routing_mode(model, "hard")
    ids, mask = batch(case, "left")
    prompt = 7
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        fractions = torch.tensor([s.expert_fractions for s in routing_stats(model)]).sum(0)
        assert (fractions > 0).all(), f"routing does not use every expert: {fractions}"
        out = model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(prompt, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    cached = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], **TOL)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_batched_generation_with_padding_under_mixed_routing(case):
    model = converted(case.make("sdpa"))
    spread_routing(model, seed=3)
    set_routing_mode(model, "hard")
    ids, mask = batch(case, "left")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        # Row 1 alone (without its padding) generates the same continuation.
        alone = model.generate(input_ids=ids[1:, 5:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 18)
    assert torch.equal(out[1, 12:], alone[0, 7:])


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("llama-gqa", "gpt2", "falcon-rw-alibi-parallel")], ids=str)
def test_beam_search_reorders_the_linear_state(case):
    model = converted(case.make("sdpa"))
    spread_routing(model, seed=5)
    set_routing_mode(model, "hard")
    ids, mask = batch(case, "none")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**kwargs)
        recomputed = model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_a_cropped_cache_rebuilds_the_kernel_state():
    """Cropping (assisted decoding rolls rejected tokens back) drops a kernel state that saw the
    cropped keys; the next call rebuilds it from the cache, so the logits equal recomputation."""
    case = next(c for c in CASES if c.name == "llama-gqa")
    model = converted(case.make("sdpa"))
    spread_routing(model, seed=2)
    set_routing_mode(model, "hard")
    ids, _ = batch(case, "none")
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = model(input_ids=ids[:, :9], use_cache=True).past_key_values
        for t in (9, 10):
            model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        try:
            cache.crop(6)  # transformers before 5.2x: the length to keep
        except ValueError:
            cache.crop(6 - cache.get_seq_length())  # later: minus the tokens to drop
        assert cache.get_seq_length() == 6
        resumed = model(input_ids=ids[:, 6:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(resumed, full[:, 6:], **TOL)


def test_unsupported_caches_and_masks_are_refused():
    from transformers import StaticCache

    case = next(c for c in CASES if c.name == "mistral-sliding-window")
    model = converted(case.make("sdpa"))
    ids, _ = batch(case, "none")
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="static caches for models without ALiBi or a sliding window"):
            model(input_ids=ids, past_key_values=StaticCache(config=model.config, max_cache_len=20))
        packed = torch.cat([torch.arange(6), torch.arange(6)]).unsqueeze(0)  # two sequences in one row
        with pytest.raises(NotImplementedError, match="packed sequences"):
            model(input_ids=ids[:1], position_ids=packed, use_cache=False)


def test_kv_cache_grows_in_place_during_decoding(monkeypatch):
    """Decode steps write into spare room of a (large) cache instead of copying it (DynamicLayer's
    torch.cat); the cached keys stay exactly what concatenation would give."""
    monkeypatch.setattr("ma_convert.modeling.attention.GROW_IN_PLACE_FROM", 0)  # this tiny cache counts as large
    case = next(c for c in all_cases() if c.name == "llama-gqa")
    model = converted(case.make("sdpa"))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :5], use_cache=True).past_key_values
        layer = cache.layers[0]
        expected = [layer.keys.clone()]
        pointers = set()
        for t in range(5, 9):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            pointers.add(layer.keys.data_ptr())
        full = model(input_ids=ids, use_cache=True).past_key_values.layers[0].keys
    assert len(pointers) == 1  # one buffer after the first step: no copy per step
    assert layer.keys.shape == full.shape and layer.keys.shape[2] == 9
    torch.testing.assert_close(layer.keys, full)
    torch.testing.assert_close(layer.keys[:, :, :5], expected[0])
    assert out.logits.isfinite().all()


def test_full_tail_sends_the_end_of_a_prompt_and_every_generated_token_to_full():
    case = next(c for c in all_cases() if c.name == "llama-gqa")
    original = case.make("sdpa").eval()
    model = converted(original)
    spread_routing(model)
    ids = torch.randint(3, case.vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    modules = [m for m in model.modules() if isinstance(m, MetaAttention)]
    with torch.no_grad():
        set_routing_mode(model, "hard", full_tail=12)  # a tail as long as the input: the original, exactly
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, **TOL)
        set_routing_mode(model, "hard", full_tail=3)
        cache = model(input_ids=ids[:, :9], use_cache=True).past_key_values
        for m in modules:
            assert (m.last_routes[:, -3:] == m.full_index).all()
        assert any((m.last_routes[:, :-3] != m.full_index).any() for m in modules)  # the rest stays routed
        model(input_ids=ids[:, 9:10], past_key_values=cache, use_cache=True)
        assert all((m.last_routes == m.full_index).all() for m in modules)  # a decode step is the tail
        set_routing_mode(model, "hard", full_tail=0)
        model(input_ids=ids)
        assert any((m.last_routes[:, -3:] != m.full_index).any() for m in modules)
    with pytest.raises(ValueError, match="full_tail=-1"):
        set_routing_mode(model, "hard", full_tail=-1)


def test_converting_an_eval_model_leaves_it_in_eval_mode():
    """New Meta-Attention modules take the model's mode: hard routing of an eval model is deterministic."""
    case = next(c for c in all_cases() if c.name == "llama-gqa")
    model = convert(case.make("sdpa").eval())
    modules = [m for m in model.modules() if isinstance(m, MetaAttention)]
    assert modules and not any(m.training for m in modules)
    spread_routing(model)
    set_routing_mode(model, "hard")
    ids = torch.randint(3, case.vocab, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    assert all(m.training for m in convert(case.make("sdpa").train()).modules() if isinstance(m, MetaAttention))


STATIC_CASES = [c for c in CASES if c.name in ("llama-gqa", "gpt2", "phi-partial-rotary", "phi3-gqa-partial-rotary")]


@pytest.mark.parametrize("case", STATIC_CASES, ids=str)
@pytest.mark.parametrize("routing", ["full", "mixed", "hybrid"])
def test_static_cache_generation_equals_the_dynamic_cache(case, routing):
    """generate(cache_implementation="static") gives the tokens of the default cache: forced full
    (and then the original model's, also with a static cache), and under mixed routing (pure linear
    and hybrid kernel expert)."""
    original = case.make("sdpa")
    model = converted(original, **({"linear_window": 3} if routing == "hybrid" else {}))
    spread_routing(model, seed=11)
    set_routing_mode(model, "hard")
    ids, mask = batch(case, "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), force_expert(model, "full") if routing == "full" else contextlib.nullcontext():
        dynamic = model.generate(**kwargs)
        static = model.generate(**kwargs, cache_implementation="static")
        if routing == "full":
            assert torch.equal(static, original.generate(**kwargs, cache_implementation="static"))
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("routing", ["full", "mixed"])
def test_compiled_model_generates_as_eager(routing):
    """torch.compile(model) traces the converted model (prefill and static-cache decode steps, with
    and without routing) and generates the eager tokens. The test compiles with the aot_eager backend,
    which checks tracing without a C++ toolchain; inductor is measured in benchmarks/bench_real.py."""
    case = next(c for c in CASES if c.name == "llama-gqa")
    model = converted(case.make("sdpa"))
    spread_routing(model, seed=12)
    set_routing_mode(model, "hard")
    ids, _ = batch(case, "none")
    kwargs = dict(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    torch._dynamo.reset()
    with torch.no_grad(), force_expert(model, "full") if routing == "full" else contextlib.nullcontext():
        eager = model.generate(**kwargs)
        model.forward = torch.compile(model.forward, backend="aot_eager")
        try:
            compiled = model.generate(**kwargs)
        finally:
            del model.forward
    assert torch.equal(compiled, eager)
