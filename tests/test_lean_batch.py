"""The verifier's lean batched forward: each packed row computes what a batch-of-one forward does,
rollback is the length pointer, and the engine's greedy output is the target's own on either path."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from fedge.cached_sequence import CachedSequence
from fedge.cloud.batching import KVBuffer, Row, batched_forward
from fedge.cloud.engine import Limits, Round, VerifierEngine
from fedge.cloud.lean_batch import LeanBatchForward
from fedge.models import model_fingerprint, tokenizer_fingerprint
from fedge.sampling import SamplingParams
from fedge.speculative import autoregressive_generate


def test_packed_rows_equal_one_session_at_a_time_with_rollback(tiny):
    model, _ = tiny
    lean = LeanBatchForward(model)
    rng = random.Random(3)
    vocab = model.config.vocab_size
    seqs = [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))] for _ in range(7)]
    kvs = [KVBuffer() for _ in seqs]
    refs = [CachedSequence(model, s) for s in seqs]
    for _ in range(5):
        rows, extras = [], []
        for seq, kv in zip(seqs, kvs, strict=True):
            extra = [rng.randrange(vocab) for _ in range(rng.choice([0, 0, 1, 3, 8]))]  # decode rows and drafts
            pending = seq[kv.length:]
            if not pending:
                kv.truncate(kv.length - 1)
                pending = seq[-1:]
            rows.append(Row(kv, pending + extra, len(extra) + 1))
            extras.append(extra)
        outs = lean(rows)
        for i, seq in enumerate(seqs):
            ref = refs[i].logits(extras[i])
            assert outs[i].shape == ref.shape
            torch.testing.assert_close(outs[i], ref, rtol=1e-4, atol=1e-4)
            assert torch.equal(outs[i].argmax(-1), ref.argmax(-1))
            assert kvs[i].length == len(seq) + len(extras[i])
            n = rng.randint(0, len(extras[i]))  # keep a prefix of the draft, reject the rest
            accepted = extras[i][:n] + [rng.randrange(vocab)]
            kvs[i].truncate(len(seq) + n)
            seq.extend(accepted)
            refs[i].accept(accepted)


def test_bad_rows_are_refused_before_any_cache_changes(tiny):
    model, _ = tiny
    lean = LeanBatchForward(model)
    kv = KVBuffer()
    with pytest.raises(ValueError):
        lean([Row(kv, [], 1)])
    with pytest.raises(ValueError):
        lean([Row(kv, [1, 2], 3)])
    assert kv.length == 0 and lean([]) == []


def _engine(tiny, forward: str) -> VerifierEngine:
    model, tok = tiny
    return VerifierEngine(model, model_fingerprint(model), tokenizer_fingerprint(tok), Limits(), forward=forward)


def test_engine_lean_and_hf_paths_give_the_targets_greedy_output(tiny):
    model, tok = tiny
    rng = random.Random(5)
    vocab = model.config.vocab_size
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(2, 30))] for _ in range(6)]
    engines = {path: _engine(tiny, path) for path in ("lean", "hf")}
    assert {e.forward_path for e in engines.values()} == {"lean", "hf"}
    ids = {path: [e.open_session(tokenizer_fingerprint(tok), model_fingerprint(model), "", SamplingParams(), p)
                  .session_id for p in prompts] for path, e in engines.items()}
    drafters = [CachedSequence(noisy, p) for p in prompts]
    for _ in range(8):
        drafts = []
        for i, d in enumerate(drafters):
            k = [0, 1, 4, 7][(i + len(d.tokens)) % 4]  # cloud-only steps (k = 0) beside verify rounds
            draft: list[int] = []
            for _ in range(k):
                draft.append(int(d.logits(draft)[-1].argmax()))
            drafts.append(draft)
        replies = {path: e.verify_many([Round(sid, len(drafters[i].tokens), drafts[i])
                                        for i, sid in enumerate(ids[path])]) for path, e in engines.items()}
        assert [(r.n_accepted, r.next_id) for r in replies["lean"]] == \
            [(r.n_accepted, r.next_id) for r in replies["hf"]]
        assert engines["lean"].batch_sizes[-1] == len(prompts)  # packed: one forward for every row
        for i, r in enumerate(replies["lean"]):
            drafters[i].accept(drafts[i][:r.n_accepted] + [r.next_id])
            assert r.forward_s > 0 and r.queue_s >= 0 and r.verify_s >= r.forward_s
    for i, p in enumerate(prompts):
        want = autoregressive_generate(model, p, len(drafters[i].tokens) - len(p))
        assert engines["lean"].sessions[ids["lean"][i]].tokens == p + want == drafters[i].tokens


def test_per_token_adapters_match_the_padded_path(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny
    engine = _engine((copy.deepcopy(model), tiny[1]), "lean")
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False))  # B != 0: it changes logits
    peft_model.save_pretrained(tmp_path / "v1")
    blobs = {f.name: f.read_bytes() for f in (tmp_path / "v1").iterdir() if f.is_file()}
    assert engine.adapters.load_verified("v1", blobs) == 0
    rng = random.Random(7)
    feeds = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in (5, 1, 9, 3)]
    adapter_rows = [0, -1, 0, -1]
    outs = {}
    for path in ("lean", "hf"):
        rows = [Row(KVBuffer(), f, len(f)) for f in feeds]
        if path == "lean":
            outs[path] = engine.forward_rows(rows, adapter_rows)
        else:
            with engine.adapters.rows(adapter_rows):
                outs[path] = batched_forward(engine.model, rows)
    for a, b in zip(outs["lean"], outs["hf"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with engine.adapters.rows([-1]):
        plain = batched_forward(engine.model, [Row(KVBuffer(), feeds[0], len(feeds[0]))])[0]
    assert not torch.allclose(plain, outs["lean"][0], atol=1e-3)  # the adapter did apply to row 0
