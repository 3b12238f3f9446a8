"""The continuous-batching scheduler without Ray: a real tiny target, a real engine, an event loop."""

from __future__ import annotations

import asyncio
import copy
import random

import pytest
import torch

from fedge.cached_sequence import CachedSequence
from fedge.cloud.engine import Limits, Refusal, Round, RoundReply, VerifierEngine
from fedge.cloud.scheduler import ContinuousBatchScheduler, OpenRequest
from fedge.models import model_fingerprint, tokenizer_fingerprint
from fedge.sampling import SamplingParams
from fedge.verifier_session import TargetVerifierSession


@pytest.fixture(scope="module")
def noisy(tiny):
    """A draft that agrees with the target often but not always (so rounds see rejections)."""
    model, _ = tiny
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return draft


def _scheduler(tiny, batch_wait_s: float = 0.5, **limits) -> ContinuousBatchScheduler:
    model, tok = tiny
    engine = VerifierEngine(model, model_fingerprint(model), tokenizer_fingerprint(tok), Limits(**limits))
    return ContinuousBatchScheduler(engine, batch_wait_s)


def _open(scheduler: ContinuousBatchScheduler, tiny, prompt: list[int], params: SamplingParams | None = None,
          seed: int = 0):
    model, tok = tiny
    return scheduler.open_session(OpenRequest(tokenizer_fingerprint(tok), model_fingerprint(model), "",
                                              params or SamplingParams(),
                                              prompt, seed))


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    """The target's own greedy continuation, one token at a time."""
    seq = CachedSequence(model, prompt)
    for _ in range(n):
        seq.accept([int(seq.logits()[-1].argmax())])
    return seq.tokens[len(prompt):]


def _drafts(drafter: CachedSequence, k: int) -> list[int]:
    draft: list[int] = []
    for _ in range(k):
        draft.append(int(drafter.logits(draft)[-1].argmax()))
    return draft


def test_concurrent_sessions_share_forwards_and_each_matches_its_own_verifier(tiny, noisy):
    """Several sessions' rounds, arriving concurrently, are verified in one forward; each session's
    accepted tokens and rolled-back cache match an in-process verifier of its own."""
    model, _ = tiny
    rng = random.Random(0)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(2, 12))] for _ in range(6)]
    params = [SamplingParams() if i % 2 == 0 else SamplingParams(temperature=1.0) for i in range(6)]
    refs = [TargetVerifierSession(model, p, sp, seed=i) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    drafters = [CachedSequence(noisy, p) for p in prompts]

    async def run() -> ContinuousBatchScheduler:
        scheduler = _scheduler(tiny)
        opened = await asyncio.gather(*(_open(scheduler, tiny, p, sp, seed=i)
                                        for i, (p, sp) in enumerate(zip(prompts, params, strict=True))))
        ids = [o.session_id for o in opened]
        for _ in range(5):
            drafts = [_drafts(d, rng.randint(0, 4)) for d in drafters]
            # dense q of a point mass on the drafted token: a valid q for the sampled sessions
            rounds = [Round(ids[i], len(refs[i].tokens), drafts[i],
                            [] if params[i].greedy else [([t], [1.0]) for t in drafts[i]]) for i in range(6)]
            replies = await asyncio.gather(*(scheduler.verify(r) for r in rounds))
            assert scheduler.engine.batch_sizes[-1] == 6  # the six rounds shared one forward
            for i, reply in enumerate(replies):
                assert isinstance(reply, RoundReply), reply
                q = None
                if not params[i].greedy:
                    q = torch.zeros(len(drafts[i]), vocab)
                    q[torch.arange(len(drafts[i])), drafts[i]] = 1.0
                want = refs[i].verify(drafts[i], q)
                assert (reply.n_accepted, reply.next_id) == (want.n_accepted, want.next_id)
                assert reply.position == len(refs[i].tokens)
                drafters[i].accept(drafts[i][:reply.n_accepted] + [reply.next_id])
        assert [scheduler.engine.sessions[s].tokens for s in ids] == [r.tokens for r in refs]
        # the rolled-back cache holds exactly the accepted tokens (but the last, fed next round)
        assert all(scheduler.engine.sessions[s].sequence.kv.length <= len(r.tokens) for s, r in zip(ids, refs,
                                                                                                    strict=True))
        await scheduler.stop()
        return scheduler

    asyncio.run(run())


def test_a_bad_round_is_refused_and_the_others_in_its_forward_go_on(tiny):
    model, _ = tiny

    async def run() -> None:
        scheduler = _scheduler(tiny, max_draft_len=4)
        good = (await _open(scheduler, tiny, [1, 2, 3])).session_id
        other = (await _open(scheduler, tiny, [4, 5])).session_id
        replies = await asyncio.gather(
            scheduler.verify(Round(good, 3, [7, 8])),
            scheduler.verify(Round(other, 2, [1] * 5)),  # longer than max_draft_len
            scheduler.verify(Round("s0-missing", 1, [])),
            scheduler.verify(Round(other, 9, [])),  # out of order
        )
        assert isinstance(replies[0], RoundReply) and replies[0].position == 3 + replies[0].n_accepted + 1
        assert [r.code for r in replies[1:]] == ["INVALID_ARGUMENT", "NOT_FOUND", "ABORTED"]
        assert all(isinstance(r, Refusal) and r.message for r in replies[1:])
        # the refused session was not advanced and still verifies
        again = await scheduler.verify(Round(other, 2, [6]))
        assert isinstance(again, RoundReply) and again.position == 2 + again.n_accepted + 1
        refused = await _open(scheduler, tiny, [model.config.vocab_size])
        assert isinstance(refused, Refusal) and refused.code == "INVALID_ARGUMENT"
        await scheduler.stop()

    asyncio.run(run())


def test_retried_round_gets_the_same_reply_without_a_second_verification(tiny):
    async def run() -> None:
        scheduler = _scheduler(tiny, batch_wait_s=0.0)
        sid = (await _open(scheduler, tiny, [1, 2, 3], SamplingParams(temperature=1.0), seed=5)).session_id
        rnd = Round(sid, 3, [9, 10], [([9], [1.0]), ([10], [1.0])])
        first = await scheduler.verify(rnd)
        forwards = scheduler.engine.forwards
        assert await scheduler.verify(rnd) == first
        assert scheduler.engine.forwards == forwards
        await scheduler.stop()

    asyncio.run(run())


def test_cloud_only_generations_decode_together_and_equal_local_greedy(tiny):
    model, _ = tiny
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9], [11]]

    async def collect(scheduler, sid: str, n: int) -> list[int]:
        tokens = []
        async for replies in scheduler.generate(sid, n, []):
            assert all(isinstance(r, RoundReply) for r in replies)
            tokens.extend(r.next_id for r in replies)
        return tokens

    async def run() -> None:
        scheduler = _scheduler(tiny)
        ids = [(await _open(scheduler, tiny, p)).session_id for p in prompts]
        outs = await asyncio.gather(*(collect(scheduler, sid, 12) for sid in ids))
        assert outs == [_greedy(model, p, 12) for p in prompts]
        assert max(scheduler.engine.batch_sizes) == 3  # one decoding step of every generation per forward
        unknown = [r async for r in scheduler.generate("s0-nope", 4, [])]
        assert unknown[0][0].code == "NOT_FOUND"
        await scheduler.stop()

    asyncio.run(run())
