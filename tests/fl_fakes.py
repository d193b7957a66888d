"""Test doubles for Flower: a fake Grid and reply builders (no network, no Ray)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common import protocol as P

TaskIdentity.run_id = 1
TaskIdentity.node_id = 0
TaskIdentity.task_id = 1


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


def query_reply(
    instr: Message, pid: int, n_train: int, n_val: int = 10, nparts: int = 3, *, strategy=None
) -> Message:
    """A silo's query reply; with ``strategy``, it holds the run's schema and builds its model."""
    m = MetricRecord(
        {P.NUM_EXAMPLES: n_train, P.NUM_VAL_EXAMPLES: n_val, P.PARTITION_ID: pid, P.NUM_PARTITIONS: nparts}
    )
    ids = ConfigRecord(
        {}
        if strategy is None
        else {P.SCHEMA_DIGEST: strategy.schema_digest, P.MODEL_SIGNATURE: strategy.model_signature}
    )
    return Message(RecordDict({P.METRICS: m, P.CONFIG: ids}), reply_to=instr)


def train_reply(
    instr: Message,
    update: np.ndarray,
    *,
    n_examples: int,
    importance: np.ndarray | None = None,
    drop_metric: str | None = None,
    override: dict | None = None,
) -> Message:
    rc = instr.content[P.CONFIG]
    arrays = {P.UPDATE: Array(update)}
    metrics = {
        P.NUM_EXAMPLES: n_examples,
        P.PARTITION_ID: 0,
        P.DP_STEPS: int(rc[P.LOCAL_STEPS]),
        P.DP_NOISE_MULTIPLIER: float(rc[P.NOISE_MULTIPLIER]),
        P.DP_SAMPLE_RATE: float(rc[P.SAMPLE_RATE]),
        P.MASK_VERSION: int(rc[P.MASK_VERSION]),
    }
    if importance is not None:
        arrays[P.IMPORTANCE_TOTAL] = Array(importance.astype(np.float32))
        arrays[P.IMPORTANCE_NOISE_VAR] = Array(np.zeros_like(importance, dtype=np.float32))
        metrics[P.IMPORTANCE_STEPS] = 1
    metrics.update(override or {})
    if drop_metric:
        metrics.pop(drop_metric)
    return Message(
        RecordDict({P.ARRAYS: ArrayRecord(arrays), P.METRICS: MetricRecord(metrics)}), reply_to=instr
    )


def error_reply(instr: Message, reason: str = "boom") -> Message:
    return Message(Error(code=1, reason=reason), reply_to=instr)
