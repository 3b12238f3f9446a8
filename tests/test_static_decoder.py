"""The lean runner: same logits as CachedSequence, same rollback, same greedy output, any draft kind;
fused projections compute what the separate ones do; compilation falls back to eager cleanly."""

import copy
import logging

import pytest
import torch

from fedge.cached_sequence import CachedSequence
from fedge.edge.draft import DraftSpec, build_draft, load_draft
from fedge.edge.drafter import Drafter
from fedge.lean_weights import DenseProjection, Int4Projection, Int8Projection, fuse_projections
from fedge.sampling import SamplingParams
from fedge.speculative import DraftLengthController, autoregressive_generate, speculative_generate
from fedge.static_decoder import LeanDecoder, StaticSequence, make_sequence, supports
from fedge.verifier_session import TargetVerifierSession


def _greedy(sequence, n):
    out = []
    for _ in range(n):
        token = int(sequence.logits()[-1].argmax())
        out.append(token)
        sequence.accept([token])
    return out


def test_logits_and_rollback_match_cached_sequence(tiny):
    model, tokenizer = tiny
    decoder = LeanDecoder(model, compile=False)
    prompt = tokenizer("def f(x):\n    return")["input_ids"]
    ref, lean = CachedSequence(model, prompt), StaticSequence(model, prompt, decoder=decoder)
    torch.testing.assert_close(lean.logits([5, 6, 7]), ref.logits([5, 6, 7]), rtol=1e-4, atol=1e-4)
    assert lean.cached_len == ref.cached_len == len(prompt) + 3
    # reject the draft tail and part of the prompt: only the pointer moves
    for seq in (ref, lean):
        seq.accept([5, 9])
        seq.truncate(len(prompt) - 1)
        seq.accept([11, 12])
    assert lean.fed == ref.fed and lean.tokens == ref.tokens
    torch.testing.assert_close(lean.logits([3]), ref.logits([3]), rtol=1e-4, atol=1e-4)
    assert _greedy(lean, 12) == _greedy(ref, 12)


def test_greedy_speculative_identical_with_lean_runners(tiny):
    model, tokenizer = tiny
    draft = LeanDecoder(model, compile=False)  # a second runner over the same weights: a perfect draft
    prompt = tokenizer("import os\nfor i in range(")["input_ids"]
    reference = autoregressive_generate(model, prompt, 24)
    verifier = TargetVerifierSession(model, prompt, SamplingParams())
    assert isinstance(verifier.sequence, StaticSequence)
    drafter = Drafter(model, prompt, SamplingParams())
    drafter.sequence = StaticSequence(model, prompt, decoder=draft)
    result = speculative_generate(drafter, verifier, 24, DraftLengthController(fixed_k=3))
    assert result.token_ids == reference
    assert result.stats.accepted == result.stats.drafted  # the draft is the target


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_quantized_draft_runs_lean(tiny, tmp_path, quant):
    target, tokenizer = tiny
    path = tmp_path / quant
    build_draft(DraftSpec(target="tiny-random-llama", keep_layers=1, quant=quant), path, progress=False)
    draft, _, _ = load_draft(path)
    assert supports(draft)
    prompt = tokenizer("class A:\n    def")["input_ids"]
    lean = StaticSequence(draft, prompt, decoder=LeanDecoder(draft, compile=False))
    want = CachedSequence(draft, prompt).logits([4, 8])
    # bf16 activations: the two runners round at different points (the lean one attends in fp32)
    assert (lean.logits([4, 8]) - want).abs().max() < 0.02 * want.abs().max()
    assert _greedy(lean, 8) == autoregressive_generate(draft, prompt, 8)


def test_cache_grows_past_its_bucket(tiny):
    model, _ = tiny
    seq = StaticSequence(model, [1, 2, 3], decoder=LeanDecoder(model, compile=False))
    ref = CachedSequence(model, [1, 2, 3])
    long = [4 + i % 50 for i in range(520)]
    seq.accept(long)
    ref.accept(long)
    torch.testing.assert_close(seq.logits([7]), ref.logits([7]), rtol=1e-4, atol=1e-4)
    assert seq.max_len >= 1024


def test_fallbacks(tiny, monkeypatch):
    model, _ = tiny
    monkeypatch.setenv("FEDGE_COMPILE", "1")
    assert LeanDecoder(model).compile is True
    monkeypatch.setenv("FEDGE_COMPILE", "0")
    assert LeanDecoder(model).compile is False
    monkeypatch.delenv("FEDGE_LEAN", raising=False)
    assert type(make_sequence(model, [1, 2])) is StaticSequence  # the default where the model allows
    monkeypatch.setenv("FEDGE_LEAN", "0")
    assert type(make_sequence(model, [1, 2])) is CachedSequence
    assert not supports(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least one prompt token"):
        StaticSequence(model, [])


def _draft(tmp_path, quant):
    path = tmp_path / quant
    build_draft(DraftSpec(target="tiny-random-llama", keep_layers=1, quant=quant), path, progress=False)
    return load_draft(path)[0]


@pytest.mark.parametrize("quant", ["int4", "int8", "none"])
def test_fused_projections_compute_the_separate_ones(tiny, tmp_path, quant):
    """q/k/v and gate/up re-packed into one matmul each: bitwise the same for the packed kinds (each output
    row is the same dot product), to fp32 rounding for float weights (their fused copy is a oneDNN one)."""
    model = tiny[0] if quant == "none" else _draft(tmp_path, quant)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    kind = {"int4": Int4Projection, "int8": Int8Projection, "none": DenseProjection}[quant]
    for modules in ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]):
        fused = fuse_projections(modules)
        assert isinstance(fused, kind)
        for rows in (1, 5):  # 5 rows: the float projection's blocked path
            x = torch.randn(rows, modules[0].in_features, dtype=torch.float32 if quant == "none" else torch.bfloat16)
            want = torch.cat([m(x) for m in modules], dim=-1)
            if quant == "none":
                torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(fused(x), want)


def test_runner_follows_changes_to_the_model(tiny, tmp_path):
    """A weight changed in place or a module replaced (an adapter merged into a draft) re-packs the runner."""
    target = copy.deepcopy(tiny[0])
    prompt = [3, 14, 15, 92, 65]
    decoder = LeanDecoder.for_model(target)
    StaticSequence(target, prompt).logits()
    with torch.no_grad():
        target.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
        target.model.layers[0].mlp.up_proj.weight.add_(0.1)
    torch.testing.assert_close(StaticSequence(target, prompt).logits([7, 8]),
                               CachedSequence(target, prompt).logits([7, 8]), rtol=1e-4, atol=1e-4)
    draft = _draft(tmp_path, "int8")
    StaticSequence(draft, prompt).logits()
    layer = draft.model.layers[0].self_attn
    layer.q_proj = torch.nn.Sequential(layer.q_proj, torch.nn.Tanh())  # any module: the runner calls it
    want = CachedSequence(draft, prompt).logits([7])
    assert (StaticSequence(draft, prompt).logits([7]) - want).abs().max() < 0.02 * want.abs().max()
    assert LeanDecoder.for_model(target) is decoder  # one runner per model, re-packed in place


def test_a_derived_draft_takes_the_target_prefill(tiny, tmp_path):
    """The target's prompt keys/values serve the draft as they are (layer i for layer i): a sequence
    adopting another's prefill computes the logits its own prefill gives, and generation stays the target's."""
    from fedge.edge.local_generate import SpeculativeGenerator

    model, tokenizer = tiny
    prompt = tokenizer("def g(y):\n    return y *")["input_ids"]
    source, own = StaticSequence(model, prompt), StaticSequence(model, prompt)
    source.prefill()
    adopter = StaticSequence(model, prompt)
    assert adopter.adopt_prefix(source) == len(prompt) - 1 and adopter.fed == prompt[:-1]
    torch.testing.assert_close(adopter.logits([4]), own.logits([4]), rtol=1e-4, atol=1e-4)
    build_draft(DraftSpec(target="tiny-random-llama", keep_layers=1, quant="int4"), tmp_path / "d", progress=False)
    draft = load_draft(tmp_path / "d", check_target=model)[0]
    for shared in ("prefill", "accepted"):
        gen = SpeculativeGenerator(target=model, draft=draft, tokenizer=tokenizer, draft_shares_target_kv=shared)
        out, stats = gen.generate_ids(prompt, 20, stop_at_eos=False)
        assert out == autoregressive_generate(model, prompt, 20) and stats.drafted > 0


@pytest.mark.parametrize("lean", [True, False])
def test_drafter_keeps_confirmed_drafts_cached(tiny, lean):
    """A proposal's drafted tokens stay in the draft's cache through the verdict: the ones the target
    confirms are not computed again by the next round's first forward."""
    model, _ = tiny
    prompt = [3, 14, 15, 92, 65, 35]
    drafter = Drafter(model, prompt, SamplingParams())
    drafter.sequence = make_sequence(model, prompt, lean=lean)
    drafter.sequence.prefill()
    ids, _ = drafter.propose(4)
    assert drafter.tokens == prompt and drafter.sequence.cached_len == len(prompt) + 3  # d1..d3 fed
    drafter.accept(ids[:2] + [7])  # two drafts confirmed, then the target's correction
    assert drafter.sequence.cached_len == len(prompt) + 2
    calls = drafter.sequence.forward_calls
    assert drafter.propose(1)[0] == autoregressive_generate(model, prompt + ids[:2] + [7], 1)
    assert drafter.sequence.forward_calls == calls + 1  # one forward over the correction alone


def _failing_backend(graph_module, example_inputs):
    raise RuntimeError("no compiler here")


def test_compile_failure_falls_back_to_eager(tiny, caplog):
    model, _ = tiny
    prompt = [5, 6, 7, 8]
    broken = LeanDecoder(model, compile=True, backend=_failing_backend)
    with caplog.at_level(logging.WARNING, logger="fedge.lean_decoder"):
        logits = StaticSequence(model, prompt, decoder=broken).logits([9, 10])
    assert not broken.compile and "running eager" in caplog.text
    torch.testing.assert_close(logits, CachedSequence(model, prompt).logits([9, 10]), rtol=1e-4, atol=1e-4)


def test_traced_step_matches_eager_at_every_width(tiny):
    """The step as dynamo traces it (backend "eager": no C++ compile, seconds): one graph family for
    prefill, draft steps and verifies, with the eager runner's outputs and greedy tokens."""
    model, tokenizer = tiny
    traced = LeanDecoder(model, compile=True, backend="eager")
    prompt = tokenizer("def f(x):\n    return")["input_ids"]
    ref, lean = CachedSequence(model, prompt), StaticSequence(model, prompt, decoder=traced)
    torch.testing.assert_close(lean.logits([5, 6, 7]), ref.logits([5, 6, 7]), rtol=1e-4, atol=1e-4)
    for seq in (ref, lean):
        seq.accept([5, 6])
    torch.testing.assert_close(lean.logits([9]), ref.logits([9]), rtol=1e-4, atol=1e-4)
    assert lean.greedy_tokens(6) == ref.greedy_tokens(6)
    torch.testing.assert_close(lean.logits([1, 2, 3]), ref.logits([1, 2, 3]), rtol=1e-4, atol=1e-4)
    assert traced.compile and "width 1" in traced.warmup_s  # compiled, the graphs' first calls timed
    assert not any("recompiled" in graph for graph in traced.warmup_s)  # widths and spans are dynamic


@pytest.mark.slow
def test_compiled_steps_match_eager(tiny):
    """torch.compile'd fixed-width steps (padded feeds) give the eager runner's logits and greedy output;
    slow: compiling takes minutes on a loaded 2-core CPU."""
    model, tokenizer = tiny
    compiled = LeanDecoder(model, compile=True)
    prompt = tokenizer("def f(x):\n    return")["input_ids"]
    ref, lean = CachedSequence(model, prompt), StaticSequence(model, prompt, decoder=compiled)
    lean.logits(), ref.logits()  # prefill: eager in both
    for seq in (ref, lean):
        seq.accept([5])
    torch.testing.assert_close(lean.logits([6, 7]), ref.logits([6, 7]), rtol=1e-4, atol=1e-4)  # width 4
    for seq in (ref, lean):
        seq.truncate(len(prompt) + 1)
    assert _greedy(lean, 6) == _greedy(ref, 6)  # width 1
    assert compiled.compile and compiled.warmup_s  # compiled, and its warm-up time recorded
