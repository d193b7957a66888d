"""The server's side of secure aggregation for distributed noise (``dp-noise = "distributed"``).

Drives Flower 1.42's SecAgg+ stages (run by the silos, :mod:`client.secagg`) from our own
round loop over the Message API, with Flower's primitives for the server's part (Shamir
``combine_shares``, ECDH ``generate_shared_key``):

- a **key set-up** (two message rounds) runs ``secagg-key-rounds`` independent SecAgg+
  instances at once: public keys out, encrypted shares in; it is redone when its instances
  are used up, when a silo joins, and after a round in which a silo dropped;
- each training round uses the next instance: its COLLECT message carries the shares
  addressed to the silo; the silo replies with its masked vector on Z_{2^32};
- :meth:`SecureAggregator.unmask` asks the survivors for the shares that remove the masks
  (seeds of the survivors, mask keys of the dropped) and returns the sum. With fewer
  survivors than ``max(t, threshold)`` it refuses (:class:`SecAggRefused`) *before* asking
  for any share: nothing is unmasked, nothing is learned, the round is not charged.

The server learns the sum only (honest-but-curious server; the Shamir threshold is more than
half the silos, so it cannot obtain both the seed and the key shares of one silo).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from common import protocol as P
from common.distributed import add_mod, mask_stream
from common.errors import UserError


class SecAggRefused(UserError):
    """Secure aggregation cannot complete this round (too few survivors or shares)."""


@dataclass
class KeyEpoch:
    number: int
    members: list[int]  # nodes that completed the key share, sorted
    instances: int
    threshold: int
    pk1: dict[int, list[bytes]]  # node -> its first public key per instance
    forward: list[dict[int, tuple[list[int], list[bytes]]]]  # per instance: dst -> (srcs, ciphertexts)
    used: int = 0


@dataclass
class SecureAggregator:
    survivors: int  # t: the fewest silos a round may aggregate (0 = every member)
    key_rounds: int
    timeout: float
    train_config_json: str
    epoch: KeyEpoch | None = None
    numbers: itertools.count = field(default_factory=lambda: itertools.count(1))
    dropped_last_round: bool = False

    def required(self, members: int) -> int:
        """Survivors a round needs: ``t`` for the privacy claim, the Shamir threshold to unmask."""
        t = self.survivors or members
        return max(t, members // 2 + 1)

    # ----- key set-up ---------------------------------------------------------------------
    def prepare(self, grid: Grid, nodes: list[int]) -> KeyEpoch:
        """The key set-up the next round uses (a new one when needed); raises SecAggRefused
        when fewer silos than required complete it."""
        e = self.epoch
        if e is None or e.used >= e.instances or self.dropped_last_round or set(nodes) - set(e.members):
            self.epoch = self._set_up(grid, sorted(nodes))
            self.dropped_last_round = False
        return self.epoch

    def _send(self, grid: Grid, per_node: dict[int, ConfigRecord]) -> dict[int, ConfigRecord]:
        msgs = [
            Message(RecordDict({P.CONFIG: rc}), dst_node_id=n, message_type=MessageType.TRAIN)
            for n, rc in per_node.items()
        ]
        out = {}
        for reply in grid.send_and_receive(msgs, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "secure aggregation: node %s failed a key stage: %s", node, reply.error.reason)
            elif node in per_node and P.CONFIG in reply.content.config_records:
                out[node] = reply.content[P.CONFIG]
        return out

    def _set_up(self, grid: Grid, nodes: list[int]) -> KeyEpoch:
        number = next(self.numbers)
        k = len(nodes)
        threshold = k // 2 + 1
        if self.survivors:
            threshold = max(threshold, min(self.survivors, k))
        base = {
            P.SECAGG_EPOCH: number,
            P.SECAGG_INSTANCES: self.key_rounds,
            P.SECAGG_NODES: nodes,
            P.SECAGG_THRESHOLD: threshold,
            P.TRAIN_CONFIG: self.train_config_json,
        }
        keys = self._send(
            grid, {n: ConfigRecord({P.SECAGG_STAGE: P.STAGE_KEYS_SETUP, **base}) for n in nodes}
        )
        self._need(len(keys), k, "key set-up")
        if len(keys) < k:  # the others' keys were made for k silos: start over without the absent
            return self._set_up(grid, sorted(keys))
        pk1 = {n: list(keys[n][P.SECAGG_PK1]) for n in nodes}
        pk2 = {n: list(keys[n][P.SECAGG_PK2]) for n in nodes}
        flat1 = [pk1[n][i] for i in range(self.key_rounds) for n in nodes]
        flat2 = [pk2[n][i] for i in range(self.key_rounds) for n in nodes]
        shares = self._send(
            grid,
            {
                n: ConfigRecord(
                    {P.SECAGG_STAGE: P.STAGE_KEYS_SHARE, **base, P.SECAGG_PK1: flat1, P.SECAGG_PK2: flat2}
                )
                for n in nodes
            },
        )
        members = sorted(shares)
        self._need(len(members), k, "key share")
        forward: list[dict[int, tuple[list[int], list[bytes]]]] = [
            {n: ([], []) for n in members} for _ in range(self.key_rounds)
        ]
        for src in members:
            rc = shares[src]
            for dst, ct, i in zip(rc[P.SECAGG_DST], rc[P.SECAGG_CT], rc[P.SECAGG_INSTANCE]):
                if int(dst) in forward[int(i)]:
                    forward[int(i)][int(dst)][0].append(src)
                    forward[int(i)][int(dst)][1].append(ct)
        return KeyEpoch(number, members, self.key_rounds, threshold, {n: pk1[n] for n in members}, forward)

    def _need(self, got: int, of: int, stage: str) -> None:
        if got < self.required(of):
            raise SecAggRefused(
                f"{stage}: {got} of {of} silos completed it, fewer than the {self.required(of)} a round "
                f"needs (secagg-survivors {self.survivors or 'all'}, Shamir threshold {of // 2 + 1})"
            )

    # ----- a round ----------------------------------------------------------------------------
    def collect_fields(self, node: int) -> dict:
        """What a node's COLLECT (training) message carries for secure aggregation."""
        e = self.epoch
        assert e is not None
        srcs, cts = e.forward[e.used][node]
        return {
            P.SECAGG_STAGE: P.STAGE_COLLECT,
            P.SECAGG_EPOCH: e.number,
            P.SECAGG_INSTANCE: e.used,
            P.SECAGG_SRC: list(srcs),
            P.SECAGG_CT: list(cts),
        }

    def abandon(self) -> None:
        """The round's instance is not unmasked: never use it again, re-key next round."""
        if self.epoch is not None:
            self.epoch.used += 1
        self.dropped_last_round = True

    def unmask(self, grid: Grid, masked: dict[int, np.ndarray]) -> np.ndarray:
        """The sum of the survivors' vectors on Z_{2^32} (uint32); SecAggRefused (nothing
        unmasked) when too few survived or too few shares came back."""
        e = self.epoch
        assert e is not None
        instance = e.used
        e.used += 1  # used, whatever happens next: never again
        active = sorted(n for n in masked if n in e.members)
        dead = sorted(set(e.members) - set(active))
        self.dropped_last_round = bool(dead)
        need = max(self.required(len(e.members)), e.threshold)
        if len(active) < need:
            raise SecAggRefused(
                f"{len(active)} of {len(e.members)} silos sent their masked vectors, fewer than the "
                f"{need} required (secagg-survivors {self.survivors or 'all'}): the round is not aggregated"
            )
        base = {
            P.SECAGG_STAGE: P.STAGE_UNMASK,
            P.SECAGG_EPOCH: e.number,
            P.SECAGG_INSTANCE: instance,
            P.SECAGG_ACTIVE: active,
            P.SECAGG_DEAD: dead,
        }
        replies = self._send(grid, {n: ConfigRecord(dict(base)) for n in active})
        collected: dict[int, list[bytes]] = {}
        for rc in replies.values():
            for nid, share in zip(rc[P.SECAGG_SHARE_NODES], rc[P.SECAGG_SHARES]):
                collected.setdefault(int(nid), []).append(share)
        secrets = {}
        for nid in active + dead:
            shares = collected.get(nid, [])
            if len(shares) < e.threshold:
                raise SecAggRefused(
                    f"unmask: {len(shares)} shares for node {nid}, fewer than the threshold {e.threshold}"
                )
            secrets[nid] = combine_shares(shares)
        n = int(np.size(next(iter(masked.values()))))
        total = np.zeros(n, dtype=np.uint32)
        for nid in active:
            total = add_mod(total, masked[nid])
            total = add_mod(total, mask_stream(secrets[nid], instance, n), -1)  # the private mask
        for j in dead:  # the survivors' pairwise masks with a dropped silo do not cancel
            sk_j = bytes_to_private_key(secrets[j])
            for k in active:
                pairwise = mask_stream(
                    generate_shared_key(sk_j, bytes_to_public_key(e.pk1[k][instance])), instance, n
                )
                total = add_mod(total, pairwise, -1 if k > j else +1)
        return total
