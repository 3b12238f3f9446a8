"""The ServerApp's exchanges with devices: a deadline, prompt polling, and every reply owned by its device.

Flower's deployment Grid (`HttpGrid`, Flower 1.41) polls the SuperLink every 3 s, so each exchange of
a round costs up to 3 s of waiting (a secure round has five). When a device dies, the SuperLink
answers for it (after it missed its heartbeats) with an error whose sender is the SuperLink, not
the device, so a strategy cannot tell who failed. `ReplyGuardGrid` wraps any Grid (deployment or
simulation) and sends with its own loop over the Grid's `push_messages`/`pull_messages`:

- it polls every `pull_interval` seconds and stops at the timeout; devices that did not answer by
  then are simply absent from the replies (the strategy and secure aggregation treat them as
  dropped);
- an error the SuperLink sends in a device's place becomes that device's error reply, with the reason;
- a train reply that names another round than the one it answers (`server-round` in its metrics)
  becomes an error reply "stale update": a replayed or delayed update never enters a sum.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

log = logging.getLogger("fedge.federated")


def _round_of(message: Message) -> int | None:
    config = message.content.config_records.get("config") if message.has_content() else None
    return int(config["server-round"]) if config is not None and "server-round" in config else None


def checked_reply(reply: Message, sent: Message) -> Message:
    """`reply` as the device's own: SuperLink errors attributed to the device, stale updates refused."""
    node = sent.metadata.dst_node_id
    if reply.has_error():
        if reply.metadata.src_node_id != node:  # the SuperLink answering for a device it lost
            return Message(Error(code=reply.error.code, reason=f"node {node}: {reply.error.reason}"), reply_to=sent)
        return reply
    expected = _round_of(sent)
    metrics = reply.content.metric_records.get("metrics")
    claimed = metrics.get("server-round") if metrics is not None else None
    if expected is not None and claimed is not None and int(claimed) != expected:
        return Message(Error(code=ErrorCode.UNKNOWN,
                             reason=f"stale update: it is for round {int(claimed)}, this is round {expected}"),
                       reply_to=sent)
    return reply


class ReplyGuardGrid:
    """A Grid whose `send_and_receive` polls promptly, keeps its deadline and checks replies (see above)."""

    def __init__(self, grid: Grid, pull_interval: float = 0.1) -> None:
        self._grid = grid
        self.pull_interval = pull_interval

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        ids = list(self._grid.push_messages(messages))
        if len(ids) == len(messages):  # in order, "" for a message not taken (HttpGrid)
            sent = {message_id: m for m, message_id in zip(messages, ids, strict=True) if message_id}
        else:  # only those taken (InMemoryGrid); the grid set each message's id
            sent = {m.metadata.message_id: m for m in messages if m.metadata.message_id in set(ids)}
        taken = {id(m) for m in sent.values()}
        for message in messages:
            if id(message) not in taken:
                log.warning("the SuperLink did not take the message to node %d", message.metadata.dst_node_id)
        waiting, replies = set(sent), []
        deadline = None if timeout is None else time.monotonic() + timeout
        while waiting:
            for reply in self._grid.pull_messages(list(waiting)):
                message = sent.get(reply.metadata.reply_to_message_id)
                if message is None or reply.metadata.reply_to_message_id not in waiting:
                    continue
                waiting.discard(reply.metadata.reply_to_message_id)
                replies.append(checked_reply(reply, message))
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.pull_interval)
        for message_id in waiting:
            log.warning("node %d: no reply within %g s", sent[message_id].metadata.dst_node_id, timeout)
        return replies
