"""The AdaDPIGU ClientApp: thin Flower handlers around ``common`` (DESIGN.md §3).

A client trains on its own silo under sample-level DP and replies with the update on
the mask, its example count and the DP events it spent; in importance rounds also its
released importance sums. All of these are computed from the outputs of its Gaussian
mechanism (released gradients) or are public metadata (sizes, the schedule).

Where state lives:
- silo data and the engine (model, per-sample hooks) are cached per process, keyed by
  silo and settings, so data is loaded once per worker, not once per round;
- the AdaCliP statistics are kept **per client in ``context.state``**: they are
  post-processing of this client's own releases, adapt to its own (possibly non-IID)
  data, and cost no upload (aggregating them globally would add 2 x |mask| floats per
  client and round);
- the client's own privacy spend is also in ``context.state``: the client refuses a
  round that would take it past its target, whatever the server asks (defence in depth).
"""

from __future__ import annotations

import functools
import json
from logging import ERROR

import torch  # noqa: F401  (must be imported before ArrayRecord torch conversions in Ray actors)
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from client import secagg, task
from common import protocol as P
from common.config import TrainConfig
from common.errors import DataError
from common.models import model_signature

app = ClientApp()


def _train_config(msg: Message) -> TrainConfig:
    return _parse_train_config(str(msg.content[P.CONFIG][P.TRAIN_CONFIG]))


@functools.lru_cache(maxsize=8)
def _parse_train_config(text: str) -> TrainConfig:
    """The run's settings, parsed and validated once per process and run (not per message)."""
    return TrainConfig.from_mapping(json.loads(text))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report the silo's sizes for weights and the DP plan (declared, public sizes checked
    against the data, or the exact counts when the run opted out, ``silo-sizes``), the hash
    of the schema its data were read with and the signature of the model it builds. Data that
    do not fit the schema are refused here, on the silo's own log; the server hears only that."""
    cfg = _train_config(msg)
    pid = int(context.node_config["partition-id"])
    try:
        silo = task.get_silo(cfg, context)
        n_train, n_val, n_test = task.released_sizes(cfg, silo, context)
    except DataError as exc:
        if exc.public:
            raise
        log(ERROR, "silo %d: its data cannot be used: %s", pid, exc)  # this silo's own log only
        return Message(
            RecordDict({P.METRICS: MetricRecord({P.PARTITION_ID: pid, P.DATA_ERROR: 1})}), reply_to=msg
        )
    engine = task.get_engine(cfg, silo)
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: n_train,
            P.NUM_VAL_EXAMPLES: n_val,
            P.NUM_TEST_EXAMPLES: n_test,
            P.PARTITION_ID: silo.partition_id,
            P.NUM_PARTITIONS: silo.num_partitions,
        }
    )
    ids = ConfigRecord(
        {P.SCHEMA_DIGEST: silo.schema.digest(), P.MODEL_SIGNATURE: model_signature(engine.model)}
    )
    return Message(RecordDict({P.METRICS: metrics, P.CONFIG: ids}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    round_cfg: ConfigRecord = msg.content[P.CONFIG]
    if P.SECAGG_STAGE in round_cfg:  # dp-noise = "distributed": a stage of secure aggregation
        return Message(_secagg_stage(msg, context), reply_to=msg)
    cfg = _train_config(msg)
    arrays: ArrayRecord = msg.content[P.ARRAYS]
    reply_arrays, metrics = task.train_round(cfg, round_cfg, arrays, context)
    return Message(RecordDict({P.ARRAYS: reply_arrays, P.METRICS: metrics}), reply_to=msg)


def _secagg_stage(msg: Message, context: Context) -> RecordDict:
    """Key set-up, key share, the round's masked share (its training), or unmask."""
    rc: ConfigRecord = msg.content[P.CONFIG]
    stage = str(rc[P.SECAGG_STAGE])
    if stage == P.STAGE_KEYS_SETUP:
        return RecordDict({P.CONFIG: secagg.keys_setup(rc, context, msg.metadata.dst_node_id)})
    if stage == P.STAGE_KEYS_SHARE:
        return RecordDict({P.CONFIG: secagg.keys_share(rc, context)})
    if stage == P.STAGE_UNMASK:
        return RecordDict({P.CONFIG: secagg.unmask(rc, context)})
    if stage != P.STAGE_COLLECT:
        raise ValueError(f"unknown secure-aggregation stage {stage!r}")
    secagg.check_collect(rc, context)  # before any training: an instance is used once
    share, metrics = task.distributed_share(
        _train_config(msg), rc, msg.content[P.ARRAYS], context, msg.content.array_records.get(P.ADACLIP)
    )
    masked = secagg.mask_vector(rc, context, share)
    return RecordDict({P.ARRAYS: ArrayRecord({P.UPDATE: Array(masked)}), P.METRICS: metrics})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation metrics of the global model for model selection, released as the run says
    (``validation-release``: noisy and accounted, or exact as an opt-out)."""
    cfg = _train_config(msg)
    metrics = task.evaluate_round(cfg, msg.content[P.ARRAYS], context, msg.content[P.CONFIG])
    return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)
