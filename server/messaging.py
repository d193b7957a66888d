"""Sending a batch of messages and waiting for the replies, without Flower's fixed sleeps.

Flower 1.42's own grids implement ``send_and_receive`` as push, then pull every fixed
interval: 0.1 s in simulation (``InMemoryGrid.pull_interval``) and 3 s in the deployment
runtime (``HttpGrid``, hard-coded). A reply that arrives just after a pull waits for the next
one, so every exchange pays on average half that interval on top of the clients' work: 1.5 s
per round trip in a deployment (docs/BENCHMARKS.md, ``bench_deploy``). :func:`send_and_receive`
uses the same public ``push_messages`` / ``pull_messages`` of those grids and pulls at a short
interval that backs off to at most 0.05 s in simulation (a pull is a lookup in the driver's
memory) and 0.25 s in a deployment (a pull is a request to the SuperLink, which also serves
the SuperNodes). Any other grid (the tests' in-process grids, a user's own) keeps its own
``send_and_receive``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid import HttpGrid, InMemoryGrid

# first pull after this long, then the interval grows by half each pull up to the maximum
FIRST_PULL_INTERVAL = 0.005
MAX_PULL_INTERVAL = 0.05
MAX_PULL_INTERVAL_HTTP = 0.25


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float | None) -> list[Message]:
    """The replies to ``messages`` that arrive within ``timeout`` seconds (``None``: wait for
    all), in arrival order: Flower's ``Grid.send_and_receive`` contract."""
    if isinstance(grid, InMemoryGrid):
        return poll_replies(grid, messages, timeout=timeout)
    if isinstance(grid, HttpGrid):
        return poll_replies(grid, messages, timeout=timeout, maximum=MAX_PULL_INTERVAL_HTTP)
    return list(grid.send_and_receive(messages, timeout=timeout))


def poll_replies(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float | None,
    first: float = FIRST_PULL_INTERVAL,
    maximum: float = MAX_PULL_INTERVAL,
    clock=time.monotonic,
    sleep=time.sleep,
) -> list[Message]:
    """Push ``messages``, then pull their replies every ``first`` seconds, growing by half
    each pull up to ``maximum``, until all arrived or ``timeout`` passed."""
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else clock() + timeout
    replies: list[Message] = []
    interval = first
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending:
            break
        if deadline is not None:
            left = deadline - clock()
            if left <= 0:
                break
            sleep(min(interval, left))
        else:
            sleep(interval)
        interval = min(maximum, interval * 1.5)
    return replies
