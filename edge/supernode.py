"""`flower-supernode` with its waits set: the idle poll, the heartbeat, the object-pull back-off. Nothing else.

Flower 1.41's SuperNode loop (`flwr.supernode.start_client_internal`) asks the SuperLink for a
message and, when there is none, sleeps a fixed 3 s; while its ClientApp runs it checks for the
reply every 0.5 s. Neither is an option (the SuperExec's poll is: FLWR_SUPEREXEC_TASK_POLL_INTERVAL).
A message that arrives just after a pull waits up to 3 s on the device before it is even fetched,
and a round is several exchanges (a secure one has five), so on a fast link this wait is most of a
round. A SuperNode also tells the SuperLink how often it sends heartbeats (30 s, Flower's default;
the SuperLink accepts 10 to 1800 s) and is declared offline after two missed intervals: a device that
dies is noticed after about a minute, and until then a restarted device with the same key is refused.

This entry point is Flower's own `flower-supernode` (same options, same loop) after setting those
intervals where Flower reads them:

- `--poll-interval S` (default 0.25): the idle sleep, and the reply check at most S;
- `--heartbeat-interval S` (default: Flower's 30; 10 to 1800): the interval the node announces and
  sends heartbeats at (every (S - 5 s) x 0.7-0.9, Flower's formula);
- the back-off when a message's contents are not on the SuperLink yet: 20 ms doubling to 0.5 s,
  not 1 s doubling to 10 s (`fedge.flower_waits`).

    python -m fedge.edge.supernode --poll-interval 0.25 --heartbeat-interval 10 \\
        --superlink 10.0.0.1:9092 --root-certificates ca.crt --auth-supernode-private-key device.key \\
        --node-config 'data="jsonl:/data/notes.jsonl"'

It refuses to start if Flower's loop no longer sleeps exactly as 1.41's does (`check_flower_loop`),
rather than changing a loop it does not know. A shorter poll costs more requests on the SuperLink
(one per node per interval while idle).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import time

from fedge.flower_waits import shorten_object_pulls

IDLE_SLEEP_S = 3  # Flower 1.41: `time.sleep(3)` after a pull that found no message
REPLY_SLEEP_S = 0.5  # `time.sleep(0.5)` while waiting for the ClientApp's reply (and its contents)


def flower_loop_sleeps() -> list[tuple[str, object]]:
    """(attribute, first argument) of every `time.<attr>(...)` call in Flower's SuperNode loop."""
    import flwr.supernode.start_client_internal as loop

    calls = []
    for node in ast.walk(ast.parse(inspect.getsource(loop))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "time"):
            arg = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            calls.append((node.func.attr, arg))
    return calls


def check_flower_loop() -> None:
    """Fail unless the loop's only use of `time` is sleep(3) when idle and sleep(0.5) for replies."""
    calls = flower_loop_sleeps()
    if set(calls) != {("sleep", IDLE_SLEEP_S), ("sleep", REPLY_SLEEP_S)}:
        raise RuntimeError(f"flwr.supernode.start_client_internal uses time as {calls}, not as Flower 1.41 "
                           "did; fedge.edge.supernode cannot set its intervals: use flower-supernode")


class LoopClock:
    """Stands in for `time` inside Flower's SuperNode loop: its sleeps, shortened; the rest is `time`'s."""

    def __init__(self, poll_interval: float, sleep=time.sleep) -> None:
        self.poll_interval = poll_interval
        self._sleep = sleep

    def sleep(self, seconds: float) -> None:
        self._sleep(self.poll_interval if seconds == IDLE_SLEEP_S else min(seconds, self.poll_interval))

    def __getattr__(self, name: str):
        return getattr(time, name)


def set_intervals(poll_interval: float, heartbeat_interval: float | None = None) -> None:
    """Set the SuperNode's idle poll (and heartbeat interval) in this process, before it starts."""
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection
    import flwr.supernode.start_client_internal as loop
    from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL

    if not 0.01 <= poll_interval <= IDLE_SLEEP_S:
        raise ValueError(f"--poll-interval must be between 0.01 and {IDLE_SLEEP_S} s, got {poll_interval}")
    check_flower_loop()
    shorten_object_pulls()
    loop.time = LoopClock(poll_interval)
    if heartbeat_interval is not None:
        if not HEARTBEAT_MIN_INTERVAL <= heartbeat_interval <= HEARTBEAT_MAX_INTERVAL:
            raise ValueError(f"--heartbeat-interval must be between {HEARTBEAT_MIN_INTERVAL} and "
                             f"{HEARTBEAT_MAX_INTERVAL} s (what a SuperLink accepts), got {heartbeat_interval}")
        connection.HEARTBEAT_DEFAULT_INTERVAL = heartbeat_interval  # announced to the SuperLink
        heartbeat.HEARTBEAT_DEFAULT_INTERVAL = heartbeat_interval  # how often the node's sender sends


def interval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--poll-interval", type=float, default=0.25,
                        help="seconds between pulls while idle (Flower 1.41: a fixed 3)")
    parser.add_argument("--heartbeat-interval", type=float, default=None,
                        help="seconds between heartbeats the SuperLink expects (Flower: 30; 10 to 1800)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`flower-supernode`'s command line plus --poll-interval and --heartbeat-interval."""
    from flwr.supernode.cli import flower_supernode

    ours, rest = interval_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        set_intervals(ours.poll_interval, ours.heartbeat_interval)
    except (ValueError, RuntimeError) as exc:
        sys.exit(f"fedge.edge.supernode: {exc}")
    sys.argv = [sys.argv[0], *rest]  # flower-supernode parses sys.argv
    flower_supernode()


if __name__ == "__main__":
    main()
