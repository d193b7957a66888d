"""A silo's side of secure aggregation for distributed noise (``dp-noise = "distributed"``).

Flower 1.42's SecAgg+ client stages run unchanged on Flower's own ``SecAggPlusState``:
``_setup`` (two fresh key pairs), ``_share_keys`` (Shamir shares of the private-mask seed and
of the mask key, encrypted to each neighbour) and ``_unmask`` (shares of the survivors'
seeds and of the dropped silos' keys), from ``flwr.client.mod.secure_aggregation``. One key
set-up runs ``secagg-key-rounds`` independent SecAgg+ instances at once, one per round: every
round has its own keys, seeds and shares, and no instance is used twice.

Ours is stage 2, the masked vector: the silo's integers on Z_{2^32} (its lattice sum plus its
discrete Gaussian share, :mod:`common.distributed`) plus its private mask and the pairwise
masks, expanded with ChaCha20 (:func:`common.distributed.mask_stream`) rather than Flower's
``pseudo_rand_gen`` (32-bit Mersenne Twister seeds). The Flower stages are imported by name;
their signatures are those of the pinned Flower version (a test runs the whole protocol).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from common import protocol as P
from common.distributed import MODULUS, add_mod, mask_stream

# the module (its package re-exports a function of the same name)
flwr_secagg = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")


class SecAggError(RuntimeError):
    """The server asked for something the protocol forbids (the silo refuses)."""


def _state_key(instance: int) -> str:
    return f"adadpigu-secagg-{instance}"


def _load(context: Context, instance: int) -> Any:
    rec = context.state.config_records.get(_state_key(instance))
    if rec is None:
        raise SecAggError(
            f"no secure-aggregation keys for instance {instance}: the key set-up did not run here"
        )
    return flwr_secagg.SecAggPlusState(**rec)


def _save(context: Context, instance: int, state: Any) -> None:
    context.state.config_records[_state_key(instance)] = ConfigRecord(state.to_dict(), False)


def _meta(context: Context, epoch: int) -> ConfigRecord:
    meta = context.state.config_records.get(P.STATE_SECAGG_META)
    if meta is None or int(meta["epoch"]) != epoch:
        raise SecAggError(f"secure-aggregation key set-up {epoch} is not the one this silo holds")
    return meta


def keys_setup(cfg: ConfigRecord, context: Context, node_id: int) -> ConfigRecord:
    """Stage 0 for every instance of a new key set-up: two key pairs each (Flower's ``_setup``)."""
    epoch, instances = int(cfg[P.SECAGG_EPOCH]), int(cfg[P.SECAGG_INSTANCES])
    k = len(list(cfg[P.SECAGG_NODES]))
    flwr_cfg = ConfigRecord(
        {
            Key.SAMPLE_NUMBER: k,
            Key.SHARE_NUMBER: k,
            Key.THRESHOLD: int(cfg[P.SECAGG_THRESHOLD]),
            Key.CLIPPING_RANGE: 1.0,  # Flower's float quantization: not used (ours is the lattice)
            Key.TARGET_RANGE: 1,
            Key.MOD_RANGE: MODULUS,
            Key.MAX_WEIGHT: 1.0,
        }
    )
    flwr_secagg.check_configs(Stage.SETUP, flwr_cfg)
    pk1, pk2 = [], []
    for i in range(instances):
        state = flwr_secagg.SecAggPlusState()
        state.nid, state.current_stage = node_id, Stage.SETUP
        res = flwr_secagg._setup(state, flwr_cfg)  # noqa: SLF001 - Flower's own stage
        pk1.append(res[Key.PUBLIC_KEY_1])
        pk2.append(res[Key.PUBLIC_KEY_2])
        _save(context, i, state)
    context.state.config_records[P.STATE_SECAGG_META] = ConfigRecord(
        {"epoch": epoch, "instances": instances, "collected": [0] * instances, "unmasked": [0] * instances}
    )
    return ConfigRecord({P.SECAGG_PK1: pk1, P.SECAGG_PK2: pk2})


def keys_share(cfg: ConfigRecord, context: Context) -> ConfigRecord:
    """Stage 1 for every instance: shares of the mask seed and key, encrypted to each
    neighbour (Flower's ``_share_keys``)."""
    meta = _meta(context, int(cfg[P.SECAGG_EPOCH]))
    nodes = [int(n) for n in cfg[P.SECAGG_NODES]]
    pk1, pk2 = list(cfg[P.SECAGG_PK1]), list(cfg[P.SECAGG_PK2])
    instances = int(meta["instances"])
    if len(pk1) != instances * len(nodes) or len(pk2) != len(pk1):
        raise SecAggError(
            f"key share: {len(pk1)} public keys for {instances} instances of {len(nodes)} silos"
        )
    dst, ct, inst = [], [], []
    for i in range(instances):
        state = _load(context, i)
        keys = ConfigRecord(
            {str(n): [pk1[i * len(nodes) + j], pk2[i * len(nodes) + j]] for j, n in enumerate(nodes)}
        )
        flwr_secagg.check_configs(Stage.SHARE_KEYS, keys)
        state.current_stage = Stage.SHARE_KEYS
        res = flwr_secagg._share_keys(state, keys)  # noqa: SLF001 - Flower's own stage
        dst += [int(d) for d in res[Key.DESTINATION_LIST]]
        ct += list(res[Key.CIPHERTEXT_LIST])
        inst += [i] * len(res[Key.DESTINATION_LIST])
        _save(context, i, state)
    return ConfigRecord({P.SECAGG_DST: dst, P.SECAGG_CT: ct, P.SECAGG_INSTANCE: inst})


def check_collect(cfg: ConfigRecord, context: Context) -> int:
    """Refuse a second masked vector from the same instance (two vectors under one mask would
    reveal their difference) before any training; the instance to use."""
    meta = _meta(context, int(cfg[P.SECAGG_EPOCH]))
    i = int(cfg[P.SECAGG_INSTANCE])
    if not (0 <= i < int(meta["instances"])):
        raise SecAggError(f"secure-aggregation instance {i} does not exist")
    if int(meta["collected"][i]):
        raise SecAggError(
            f"secure-aggregation instance {i} was already used for a masked vector; refusing to reuse it"
        )
    return i


def mask_vector(cfg: ConfigRecord, context: Context, vector: np.ndarray) -> np.ndarray:
    """Stage 2: decrypt the neighbours' shares, then ``vector`` + private mask +- pairwise
    masks on Z_{2^32}."""
    meta = _meta(context, int(cfg[P.SECAGG_EPOCH]))
    i = check_collect(cfg, context)
    state = _load(context, i)
    srcs, cts = [int(s) for s in cfg[P.SECAGG_SRC]], list(cfg[P.SECAGG_CT])
    if len(srcs) != len(cts):
        raise SecAggError("collect: sources and ciphertexts differ in number")
    if len(cts) + 1 < state.threshold:
        raise SecAggError(
            f"collect: {len(cts) + 1} silos hold shares, fewer than the threshold {state.threshold}"
        )
    for src, ciphertext in zip(srcs, cts):
        if src not in state.ss2_dict:
            raise SecAggError(f"collect: no shared key with node {src}")
        actual_src, dst, seed_share, sk1_share = share_keys_plaintext_separate(
            decrypt(state.ss2_dict[src], ciphertext)
        )
        if actual_src != src or dst != state.nid:
            raise SecAggError(
                f"collect: a share from {actual_src} to {dst} arrived as from {src} to {state.nid}"
            )
        state.rd_seed_share_dict[src] = seed_share
        state.sk1_share_dict[src] = sk1_share
    n = int(np.size(vector))
    out = add_mod(vector, mask_stream(state.rd_seed, i, n))
    sk1 = bytes_to_private_key(state.sk1)
    for src in srcs:
        pairwise = mask_stream(
            generate_shared_key(sk1, bytes_to_public_key(state.public_keys_dict[src][0])), i, n
        )
        out = add_mod(out, pairwise, +1 if state.nid > src else -1)
    state.current_stage = Stage.COLLECT_MASKED_VECTORS
    _save(context, i, state)
    collected = list(meta["collected"])
    collected[i] = 1
    meta["collected"] = collected
    return out


def unmask(cfg: ConfigRecord, context: Context) -> ConfigRecord:
    """Stage 3 (Flower's ``_unmask``): seed shares of the survivors, key shares of the dropped,
    for an instance this silo sent a masked vector in, once."""
    meta = _meta(context, int(cfg[P.SECAGG_EPOCH]))
    i = int(cfg[P.SECAGG_INSTANCE])
    if not (0 <= i < int(meta["instances"])) or not int(meta["collected"][i]):
        raise SecAggError(f"unmask: this silo sent no masked vector in instance {i}")
    if int(meta["unmasked"][i]):
        raise SecAggError(f"unmask: instance {i} was already unmasked; refusing a second set of shares")
    active, dead = [int(n) for n in cfg[P.SECAGG_ACTIVE]], [int(n) for n in cfg[P.SECAGG_DEAD]]
    state = _load(context, i)
    if set(active) & set(dead) or state.nid not in active:
        raise SecAggError("unmask: inconsistent survivor lists")
    flwr_cfg = ConfigRecord({Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})
    flwr_secagg.check_configs(Stage.UNMASK, flwr_cfg)
    state.current_stage = Stage.UNMASK
    res = flwr_secagg._unmask(state, flwr_cfg)  # noqa: SLF001 - Flower's own stage
    unmasked = list(meta["unmasked"])
    unmasked[i] = 1
    meta["unmasked"] = unmasked
    _save(context, i, state)
    return ConfigRecord(
        {
            P.SECAGG_SHARE_NODES: [int(n) for n in res[Key.NODE_ID_LIST]],
            P.SECAGG_SHARES: list(res[Key.SHARE_LIST]),
        }
    )
