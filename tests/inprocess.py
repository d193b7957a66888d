"""An in-process Flower Grid: runs the real ClientApp handlers without Ray or a network.

Each node keeps its own Context (node config and ``context.state``) like a SuperNode;
a handler that raises becomes an error reply, as in Flower. ``fail`` lets a test inject
faults per (node index, message type, server round).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_app
from common import protocol as P
from common.config import FederatedConfig, TrainConfig

TaskIdentity.run_id = 1
TaskIdentity.node_id = 0
TaskIdentity.task_id = 1

HANDLERS = {
    MessageType.QUERY: client_app.query,
    MessageType.TRAIN: client_app.train,
    MessageType.EVALUATE: client_app.evaluate,
}


class InProcessGrid:
    def __init__(
        self,
        num_nodes: int,
        *,
        fail: Callable[[int, str, int], str | None] | None = None,
        first_node_id: int = 1000,
    ) -> None:
        self.node_ids = [first_node_id + i for i in range(num_nodes)]
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i, nid in enumerate(self.node_ids)
        }
        self.fail = fail
        self.train_rounds_sent = 0
        self.evaluate_rounds_sent = 0

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        messages = list(messages)
        if any(m.metadata.message_type == MessageType.TRAIN for m in messages):
            self.train_rounds_sent += 1
        if any(m.metadata.message_type == MessageType.EVALUATE for m in messages):
            self.evaluate_rounds_sent += 1
        for m in messages:
            nid = m.metadata.dst_node_id
            kind = m.metadata.message_type
            rnd = (
                int(m.content[P.CONFIG].get(P.SERVER_ROUND, 0)) if P.CONFIG in m.content.config_records else 0
            )
            action = self.fail(self.node_ids.index(nid), kind, rnd) if self.fail else None
            if action == "drop":  # no reply at all (timeout / disconnect)
                continue
            try:
                if action == "raise":
                    raise RuntimeError(f"injected fault on node {nid}")
                reply = HANDLERS[kind](m, self.contexts[nid])
            except Exception as exc:
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=m)
            replies.append(reply)
        return replies


def small_run_configs(out_dir, data_dir, *, epsilon, rounds, train_subset, seed, min_train=3, **fed_kw):
    """A 3-silo AdaDPIGU run on an MNIST subset that takes seconds per round. Validation
    metrics are exact (the opt-out) unless ``validation_release`` says otherwise: these runs
    test rounds, faults and resume; tests/server/test_validation_release.py the releases."""
    fed_kw.setdefault("validation_release", "exact")
    cfg = TrainConfig(
        method="adadpigu",
        epsilon=epsilon,
        batch_size=32,
        train_subset=train_subset,
        test_subset=300,
        seed=seed,
        data_dir=data_dir,
        out_dir=str(out_dir),
    )
    fed = FederatedConfig(
        num_server_rounds=rounds,
        importance_rounds=1,
        local_epochs=0.5,
        min_available_nodes=3,
        min_train_nodes=min_train,
        startup_timeout=30,
        **fed_kw,
    )
    return cfg, fed
