"""Where simulated phones' drafts come from, so N phones and the cloud fit on a few shared cores.

Why: `fedge simulate phones` runs N phones on the machine that also runs the cloud it measures.
Eight phones drafting each on its own need eight cores to draft at their device's speed; on two
they draft four times slower and take the cloud's cores while they do. Two ways out, both drafting
with the real draft model, while `fedge.edge.client.PacedProposer` accounts each round's drafting
at the phone's device speed:

- replay (greedy): the draft's greedy proposal after every prefix of the target's greedy output is
  computed before the timed run (`greedy_draft_table`); under greedy verification every verified
  prefix is such a prefix, so the phones only look their proposals up while the cloud is measured
  (a prefix not in the table is drafted live and counted);
- live: every phone keeps its own draft sequence and KV cache (`FarmSequence`, a drop-in for the
  `Drafter`'s sequence) and one worker thread runs the steps the phones ask for at about the same
  time as one batched forward (`fedge.cloud.lean_batch`: packed rows, each row attends to its own
  cache only), in a process niced below the cloud; what overruns the device profile is reported.

    table = greedy_draft_table(draft, prompt_ids, target_output, k_max=8, max_new_tokens=48)
    farm = DraftFarm(draft); drafter.sequence = FarmSequence(farm, prompt_ids)
"""

from __future__ import annotations

import threading

import torch

from fedge.cached_sequence import RollbackSequence
from fedge.cloud.batching import KVBuffer, Row, batched_forward
from fedge.cloud.lean_batch import LeanBatchForward
from fedge.sampling import SamplingParams


def greedy_draft_table(draft: torch.nn.Module, prompt_ids: list[int], output: list[int], k_max: int,
                       max_new_tokens: int) -> dict[int, list[int]]:
    """{len(prompt) + j: the draft's greedy proposal of the k a round may ask there, after prompt +
    output[:j]} for every j < len(output). A proposal the target kept a token of is reused one token
    shorter (greedy drafting is deterministic), so mostly one new draft step is computed per position."""
    from fedge.edge.drafter import Drafter

    drafter = Drafter(draft, prompt_ids, SamplingParams())
    seq = drafter.sequence
    table: dict[int, list[int]] = {}
    ahead: list[int] = []  # the draft's greedy continuation of prompt + output[:j]
    for j, token in enumerate(output):
        need = max(0, min(k_max, max_new_tokens - j - 1))
        if len(ahead) < need:
            base = len(seq.tokens)
            seq.accept(ahead)
            more, _ = drafter.propose(need - len(ahead))
            seq.truncate(base)
            ahead = ahead + more
        table[len(prompt_ids) + j] = ahead[:need]
        ahead = ahead[1:] if ahead and ahead[0] == token else []
        drafter.accept([token])
    return table


class DraftFarm:
    """One worker thread; `run(row)` blocks until the forward that carried the row returns its logits.
    Rows that arrive within `gather_s` of the first waiting one share its forward."""

    def __init__(self, model: torch.nn.Module, gather_s: float = 0.002, threads: int = 0):
        self.forward = LeanBatchForward(model) if LeanBatchForward.available(model) \
            else (lambda rows: batched_forward(model, rows))
        self.gather_s = gather_s
        self.threads = threads  # torch threads of the worker (0: leave as set)
        self._cond = threading.Condition()
        self._waiting: list[list] = []  # [row, result, done event]
        self._stopped = False
        self.forwards = 0
        self.rows = 0
        self._worker = threading.Thread(target=self._loop, name="draft-farm", daemon=True)
        self._worker.start()

    def run(self, row: Row) -> torch.Tensor:
        slot = [row, None, threading.Event()]
        with self._cond:
            if self._stopped:
                raise RuntimeError("the draft farm is stopped")
            self._waiting.append(slot)
            self._cond.notify_all()
        slot[2].wait()
        if isinstance(slot[1], BaseException):
            raise slot[1]
        return slot[1]

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._worker.join(timeout=30)

    def _take(self) -> list[list] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._waiting or self._stopped)
            if self._stopped:
                return None
            count = -1
            while len(self._waiting) != count:  # gather until no new row came for gather_s
                count = len(self._waiting)
                self._cond.wait(self.gather_s)
            batch, self._waiting = self._waiting, []
            return batch

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while (batch := self._take()) is not None:
            try:
                with torch.inference_mode():
                    outs = self.forward([slot[0] for slot in batch])
            except BaseException as exc:  # every phone in this forward sees it
                outs = [exc] * len(batch)
            self.forwards += 1
            self.rows += len(batch)
            for slot, out in zip(batch, outs, strict=True):
                slot[1] = out
                slot[2].set()
        with self._cond:  # stopped: release anyone still waiting
            for slot in self._waiting:
                slot[1] = RuntimeError("the draft farm stopped")
                slot[2].set()


class FarmSequence(RollbackSequence):
    """A rollback sequence (`fedge.cached_sequence`) over a KV buffer whose forwards run in a
    `DraftFarm`: rollback moves the cache's length pointer."""

    def __init__(self, farm: DraftFarm, prompt_ids: list[int]):
        if not prompt_ids:
            raise ValueError("a session needs at least one prompt token")
        self.farm = farm
        self.tokens: list[int] = list(prompt_ids)
        self.fed: list[int] = []  # the tokens whose keys/values the buffer holds, in order
        self.kv = KVBuffer()
        self.forward_calls = 0

    def logits(self, extra: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        pending = self.tokens[len(self.fed):]
        if not pending:  # the last token must be fed to get its logits
            self._crop(len(self.tokens) - 1)
            pending = self.tokens[-1:]
        feed = pending + list(extra)
        out = self.farm.run(Row(self.kv, feed, len(extra) + 1))
        self.forward_calls += 1
        self.fed.extend(feed)
        return out

    def _crop(self, length: int) -> None:
        if length < len(self.fed):
            del self.fed[length:]
            self.kv.truncate(length)
