"""server.messaging: push, then pull at a short, growing interval (not Flower's fixed sleeps)."""

from __future__ import annotations

from types import SimpleNamespace

from flwr.superlink.grid import HttpGrid, InMemoryGrid

from server import messaging


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


class PushPullGrid:
    """Replies become available at given times (``None``: never)."""

    def __init__(self, clock: FakeClock, ready_at: dict[str, float | None]) -> None:
        self.clock, self.ready_at = clock, ready_at
        self.pulls = 0
        self.delivered: set[str] = set()

    def push_messages(self, messages):
        return [m for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        out = []
        for i in sorted(ids):
            t = self.ready_at[i]
            if t is not None and t <= self.clock.now and i not in self.delivered:
                self.delivered.add(i)
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)))
        return out


def _poll(grid, clock, ids, timeout):
    return messaging.poll_replies(grid, ids, timeout=timeout, clock=clock, sleep=clock.sleep)


def test_every_reply_is_collected_soon_after_it_arrives():
    clock = FakeClock()
    grid = PushPullGrid(clock, {"a": 0.0, "b": 0.31, "c": 2.0})
    replies = _poll(grid, clock, ["a", "b", "c"], timeout=None)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b", "c"]
    # the last reply arrived at 2.0 s and was pulled within one maximum interval of it
    assert 2.0 <= clock.now <= 2.0 + messaging.MAX_PULL_INTERVAL + 1e-9
    assert clock.sleeps[0] == messaging.FIRST_PULL_INTERVAL
    assert max(clock.sleeps) <= messaging.MAX_PULL_INTERVAL
    assert clock.sleeps == sorted(clock.sleeps)  # backs off, never speeds up


def test_the_timeout_returns_what_arrived_and_never_sleeps_past_it():
    clock = FakeClock()
    grid = PushPullGrid(clock, {"a": 0.2, "b": None})
    replies = _poll(grid, clock, ["a", "b"], timeout=1.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert abs(clock.now - 1.0) < 1e-9


def test_no_messages_no_pull():
    clock = FakeClock()
    grid = PushPullGrid(clock, {})
    assert _poll(grid, clock, [], timeout=5.0) == [] and grid.pulls == 0 and clock.sleeps == []


def test_flowers_grids_are_polled_other_grids_keep_their_own_send_and_receive(monkeypatch):
    called = []
    monkeypatch.setattr(
        messaging,
        "poll_replies",
        lambda grid, msgs, timeout, maximum=messaging.MAX_PULL_INTERVAL: called.append((grid, maximum)) or [],
    )
    for cls in (InMemoryGrid, HttpGrid):
        grid = object.__new__(cls)  # no state or connection needed to route it
        messaging.send_and_receive(grid, [], timeout=1.0)
    assert [(type(g), m) for g, m in called] == [
        (InMemoryGrid, messaging.MAX_PULL_INTERVAL),
        (HttpGrid, messaging.MAX_PULL_INTERVAL_HTTP),
    ]

    class OwnGrid:
        def send_and_receive(self, messages, *, timeout=None):
            return iter(["own"])

    assert messaging.send_and_receive(OwnGrid(), [], timeout=1.0) == ["own"] and len(called) == 2
