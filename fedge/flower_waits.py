"""Flower 1.41's back-off when a message's contents are not there yet: 1 s, doubling to 10 s. Set here.

Flower moves a message as a small header plus content objects, each fetched on its own
(`flwr.supercore.inflatable.inflatable_utils.pull_objects`). The receiver often asks before the sender
has pushed them: a SuperNode pulls the header from the SuperLink while the ServerApp is still
uploading the arrays, the ClientApp process asks its SuperNode while the SuperNode is still
downloading them, the ServerApp asks for a reply whose arrays are still on the way. Each miss waits
`initial_backoff` = 1 s, then 2 s, 4 s (up to `backoff_cap` = 10 s), so an exchange whose only work is
a few kB of adapter costs seconds (measured: 3 s of a 3.5 s ClientApp process with 0.15 s of CPU).
The waits are keyword defaults of Flower's functions, not options; `shorten_object_pulls` sets
them in the calling process (the SuperNode: `fedge.edge.supernode`; ClientApp processes: the warm
SuperExec; the ServerApp: `fedge.cloud.server_app`). It changes nothing else: the number of tries,
the total time limit and the errors stay Flower's. It checks the defaults it replaces are the ones
it knows (Flower 1.41's) and refuses otherwise.
"""

from __future__ import annotations

FLOWER_INITIAL_BACKOFF_S = 1  # Flower 1.41: PULL_INITIAL_BACKOFF
FLOWER_BACKOFF_CAP_S = 10  # PULL_BACKOFF_CAP
INITIAL_BACKOFF_S = 0.02  # fedge's: the first retry after 20 ms, doubling...
BACKOFF_CAP_S = 0.5  # ...to at most 0.5 s between tries


def _pull_functions() -> list:
    from flwr.supercore.inflatable import inflatable_utils

    return [inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree]


def object_pull_backoff() -> list[tuple[float, float]]:
    """(initial back-off, cap) of each of Flower's object-pull functions in this process."""
    return [(fn.__kwdefaults__["initial_backoff"], fn.__kwdefaults__["backoff_cap"]) for fn in _pull_functions()]


def shorten_object_pulls(initial_s: float = INITIAL_BACKOFF_S, cap_s: float = BACKOFF_CAP_S) -> None:
    """Set the back-off of Flower's object pulls in this process (see the module docstring)."""
    if not 0 < initial_s <= cap_s <= FLOWER_BACKOFF_CAP_S:
        raise ValueError(f"need 0 < initial ({initial_s}) <= cap ({cap_s}) <= {FLOWER_BACKOFF_CAP_S}")
    functions = _pull_functions()
    for fn in functions:
        defaults = fn.__kwdefaults__ or {}
        if "initial_backoff" not in defaults or "backoff_cap" not in defaults:
            raise RuntimeError(f"{fn.__module__}.{fn.__name__} has no initial_backoff/backoff_cap defaults: "
                               "not Flower 1.41's object pulls; leaving them as they are")
        if (defaults["initial_backoff"], defaults["backoff_cap"]) not in (
                (FLOWER_INITIAL_BACKOFF_S, FLOWER_BACKOFF_CAP_S), (initial_s, cap_s)):
            raise RuntimeError(f"{fn.__name__} backs off {defaults['initial_backoff']} s up to "
                               f"{defaults['backoff_cap']} s, not as Flower 1.41 did; leaving it as it is")
    for fn in functions:
        fn.__kwdefaults__["initial_backoff"] = initial_s
        fn.__kwdefaults__["backoff_cap"] = cap_s
