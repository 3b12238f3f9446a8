"""Flower messages the secure-aggregation Grid builds for stock strategies: copies of train contents
and the per-client replies that carry the aggregate (kept apart so `secagg_server` holds the round).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict


def copy_content(content: RecordDict) -> RecordDict:
    copy = RecordDict()
    for key, record in content.items():
        if isinstance(record, ConfigRecord):
            copy[key] = ConfigRecord(dict(record))
        else:
            copy[key] = record
    return copy


def is_noop(message: Message) -> bool:
    config = message.content.config_records.get("config")
    return bool(config is not None and config.get("noop", False))


def aggregate_replies(messages: list[Message], survivors: set[int], array_key: str,
                       arrays: dict[str, np.ndarray]) -> list[Message]:
    """One reply per surviving client, all carrying the aggregate with weight 1; errors for the rest."""
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    replies = []
    for message in messages:
        if message.metadata.dst_node_id in survivors:
            content = RecordDict({array_key: record, "metrics": MetricRecord({"num-examples": 1})})
            replies.append(Message(content, reply_to=message))
        else:
            replies.append(Message(Error(code=9002, reason="dropped out of the secure-aggregation round"),
                                   reply_to=message))
    return replies
