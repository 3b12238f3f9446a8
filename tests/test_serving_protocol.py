"""Serving without the network: stubs vs .proto, sparse-q codec, batched forward, the verifier engine."""

from __future__ import annotations

import copy
import random
import tempfile
from pathlib import Path

import pytest
import torch

from fedge.cached_sequence import CachedSequence
from fedge.cloud.batching import KVBuffer, Row, batched_forward
from fedge.cloud.engine import Limits, Refusal, Round, RoundReply, VerifierEngine, VerifierError
from fedge.models import model_fingerprint, tokenizer_fingerprint
from fedge.protocol.codecs import dense_from_sparse, truncate_q, validate_sparse_q
from fedge.sampling import SamplingParams
from fedge.verifier_session import TargetVerifierSession


def test_checked_in_stubs_match_the_proto():
    from fedge.protocol import codegen

    with tempfile.TemporaryDirectory() as tmp:
        fresh = codegen.generate(Path(tmp))
    for name, text in fresh.items():
        checked_in = (codegen.PROTO_DIR / name).read_text()
        assert checked_in == text, f"protocol/{name} is stale: run `python -m fedge.protocol.codegen`"


def test_sparse_q_roundtrip_and_validation():
    q = torch.softmax(torch.randn(3, 50), -1)
    ids, probs = truncate_q(q, 8)
    assert ids.shape == (3, 8) and torch.allclose(probs.sum(-1), torch.ones(3))
    dense = dense_from_sparse(ids, probs, 50)
    rows = [(ids[i].tolist(), probs[i].tolist()) for i in range(3)]
    drafted = [int(ids[i, 0]) for i in range(3)]
    assert torch.allclose(validate_sparse_q(rows, drafted, 50, 8), dense, atol=1e-6)
    bad = {
        "NaN": [(rows[0][0], [float("nan")] + rows[0][1][1:])] + rows[1:],
        "negative": [(rows[0][0], [-0.1, 1.1] + [0.0] * 6)] + rows[1:],
        "outside the vocabulary": [([99] + rows[0][0][1:], rows[0][1])] + rows[1:],
        "sum": [(rows[0][0], [0.5] * 8)] + rows[1:],
    }
    for what, wire in bad.items():
        with pytest.raises(ValueError):
            validate_sparse_q(wire, drafted, 50, 8)
            pytest.fail(f"{what} q was accepted")
    with pytest.raises(ValueError, match="no probability mass"):
        validate_sparse_q(rows, [int(ids[0, 0])] + [int(x) for x in torch.arange(50) if int(x) not in ids[1]][:1]
                          + drafted[2:], 50, 8)
    with pytest.raises(ValueError, match="need 1..4"):
        validate_sparse_q(rows, drafted, 50, 4)


def test_batched_forward_over_ragged_caches_equals_one_session_at_a_time(tiny):
    model, _ = tiny
    rng = random.Random(0)
    vocab = model.config.vocab_size
    seqs = [[rng.randrange(vocab) for _ in range(rng.randint(1, 25))] for _ in range(6)]
    kvs = [KVBuffer() for _ in seqs]
    refs = [CachedSequence(model, s) for s in seqs]
    for _ in range(4):
        rows, extras = [], []
        for seq, kv in zip(seqs, kvs, strict=True):
            extra = [rng.randrange(vocab) for _ in range(rng.randint(0, 5))]
            pending = seq[kv.length:]
            if not pending:
                kv.truncate(kv.length - 1)
                pending = seq[-1:]
            rows.append(Row(kv, pending + extra, len(extra) + 1))
            extras.append(extra)
        outs = batched_forward(model, rows)
        for i, seq in enumerate(seqs):
            ref = refs[i].logits(extras[i])
            assert torch.allclose(outs[i], ref, atol=1e-4), (ref - outs[i]).abs().max()
            assert torch.equal(outs[i].argmax(-1), ref.argmax(-1))
            n = rng.randint(0, len(extras[i]))  # accept a prefix of the draft, then a new token
            accepted = extras[i][:n] + [rng.randrange(vocab)]
            kvs[i].truncate(len(seq) + n)
            seq.extend(accepted)
            refs[i].accept(accepted)


def _engine(tiny, **limits) -> VerifierEngine:
    model, tok = tiny
    return VerifierEngine(model, model_fingerprint(model), tokenizer_fingerprint(tok), Limits(**limits))


def test_engine_batches_16_sessions_with_ragged_drafts_like_separate_verifiers(tiny):
    model, tok = tiny
    engine = _engine(tiny)
    rng = random.Random(1)
    vocab = model.config.vocab_size
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(2, 20))] for _ in range(16)]
    ids = [engine.open_session(tokenizer_fingerprint(tok), model_fingerprint(model), "", SamplingParams(), p).session_id
           for p in prompts]
    refs = [TargetVerifierSession(model, p, SamplingParams()) for p in prompts]
    drafters = [CachedSequence(noisy, p) for p in prompts]
    for _ in range(6):
        rounds = []
        for i in range(16):
            k = rng.randint(0, 6)  # ragged, including empty drafts
            draft = []
            for _ in range(k):
                draft.append(int(drafters[i].logits(draft)[-1].argmax()))
            rounds.append(Round(ids[i], len(refs[i].tokens), draft))
        replies = engine.verify_many(rounds)
        assert engine.batch_sizes[-1] == 16
        for i, (rnd, reply) in enumerate(zip(rounds, replies, strict=True)):
            want = refs[i].verify(rnd.draft_ids)
            assert (reply.n_accepted, reply.next_id) == (want.n_accepted, want.next_id)
            drafters[i].accept(rnd.draft_ids[:reply.n_accepted] + [reply.next_id])
    assert [engine.sessions[s].tokens for s in ids] == [r.tokens for r in refs]


def test_engine_refuses_bad_rounds_with_codes_and_keeps_the_good_ones(tiny):
    model, tok = tiny
    engine = _engine(tiny, max_sessions=3, max_draft_len=4, idle_timeout_s=60)
    fp, mfp = tokenizer_fingerprint(tok), model_fingerprint(model)
    good = engine.open_session(fp, mfp, "", SamplingParams(), [1, 2, 3]).session_id
    sampled = engine.open_session(fp, mfp, "", SamplingParams(temperature=1.0), [1, 2, 3]).session_id

    def code(fn) -> str:
        with pytest.raises(VerifierError) as info:
            fn()
        return info.value.code

    assert code(lambda: engine.open_session("other", mfp, "", SamplingParams(), [1])) == "FAILED_PRECONDITION"
    assert code(lambda: engine.open_session(fp, "other-base", "", SamplingParams(), [1])) == "FAILED_PRECONDITION"
    assert code(lambda: engine.open_session(fp, mfp, "", SamplingParams(), [10**6])) == "INVALID_ARGUMENT"
    assert code(lambda: engine.open_session(fp, mfp, "v9", SamplingParams(), [1])) == "NOT_FOUND"
    engine.open_session(fp, mfp, "", SamplingParams(), [1])
    assert code(lambda: engine.open_session(fp, mfp, "", SamplingParams(), [1])) == "RESOURCE_EXHAUSTED"
    rounds = [
        Round("s0-nope", 3, [1]),  # unknown session
        Round(good, 3, [1] * 5),  # k above the limit
        Round(good, 3, [model.config.vocab_size]),  # token id outside the vocabulary
        Round(sampled, 3, [5], [([5, 6], [float("nan"), 1.0])]),  # NaN q
        Round(sampled, 3, [5], [([5, 6], [1.5, -0.5])]),  # negative q
        Round(good, 7, [1]),  # out of order
        Round(good, 3, [4, 5]),  # fine
    ]
    replies = engine.verify_many(rounds)
    codes = [r.code if isinstance(r, Refusal) else None for r in replies]
    assert codes == ["NOT_FOUND", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                     "ABORTED", None]
    assert isinstance(replies[-1], RoundReply)
    assert replies[-1].position == 3 + replies[-1].n_accepted + 1
    # the same round again (its reply was lost) gets the same answer, not a second verification
    assert engine.verify_many([Round(good, 3, [4, 5])]) == [replies[-1]]
    engine.expire_idle(now=1e12)
    assert engine.verify_many([Round(good, replies[-1].position, [])])[0].code == "NOT_FOUND"
