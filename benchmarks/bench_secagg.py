"""Secure aggregation's own cost for distributed noise: time and bytes per round, K silos.

Runs the real protocol in one process (no network, no Flower transport): the silos' stages
(:mod:`client.secagg`: Flower's SecAgg+ key stages, our masked vector) and the server's
(:class:`server.secagg.SecureAggregator`), on vectors of the paper CNN's size. Reported:
the key set-up (once per ``secagg-key-rounds`` rounds, per silo), a silo's masking, the
server's unmasking (with no dropout and with one), and the upload per silo and round
against the float32 update of local noise. Training itself is not included.

    python -m benchmarks.bench_secagg --json [--silos 10] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from benchmarks.output import emit
from client import secagg as client_secagg
from common import protocol as P
from common.distributed import MODULUS
from server.secagg import SecureAggregator


class KeyRouter:
    """An in-process grid for the protocol's key and unmask stages (tests use it too)."""

    def __init__(self, nodes, *, drop_unmask=()):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.nodes = list(nodes)
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes
        }
        self.drop_unmask = set(drop_unmask)
        self.seen: list[RecordDict] = []
        self.bytes_up: dict[str, int] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            n, rc = m.metadata.dst_node_id, m.content[P.CONFIG]
            stage = rc[P.SECAGG_STAGE]
            self.seen.append(m.content)
            if stage == P.STAGE_UNMASK and n in self.drop_unmask:
                continue
            try:
                if stage == P.STAGE_KEYS_SETUP:
                    reply = client_secagg.keys_setup(rc, self.contexts[n], n)
                elif stage == P.STAGE_KEYS_SHARE:
                    reply = client_secagg.keys_share(rc, self.contexts[n])
                else:
                    reply = client_secagg.unmask(rc, self.contexts[n])
                self.bytes_up[stage] = self.bytes_up.get(stage, 0) + _config_bytes(reply)
                out.append(Message(RecordDict({P.CONFIG: reply}), reply_to=m))
            except Exception as exc:  # noqa: BLE001 - an error reply, as Flower makes one
                out.append(Message(Error(code=1, reason=str(exc)), reply_to=m))
        return out

    def masked(self, aggregator: SecureAggregator, vectors: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Each silo's masked vector for the next instance (the COLLECT stage's secure part)."""
        out = {}
        for n, v in vectors.items():
            rc = ConfigRecord(aggregator.collect_fields(n))
            out[n] = client_secagg.mask_vector(rc, self.contexts[n], np.mod(v, MODULUS).astype(np.uint32))
        return out


def _config_bytes(rc: ConfigRecord) -> int:
    total = 0
    for v in rc.values():
        items = v if isinstance(v, list) else [v]
        total += sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in items)
    return total


def measure(silos: int, dim: int, key_rounds: int, repeats: int) -> dict:
    nodes = list(range(1, silos + 1))
    setup, mask, unmask, unmask_drop = [], [], [], []
    collect_cfg_bytes = 0
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        grid = KeyRouter(nodes)
        agg = SecureAggregator(survivors=0, key_rounds=key_rounds, timeout=60, train_config_json="{}")
        t = time.perf_counter()
        agg.prepare(grid, nodes)
        setup.append(time.perf_counter() - t)
        key_bytes = dict(grid.bytes_up)
        vectors = {n: rng.integers(-(2**20), 2**20, size=dim) for n in nodes}
        collect_cfg_bytes = _config_bytes(ConfigRecord(agg.collect_fields(nodes[0])))
        t = time.perf_counter()
        masked = grid.masked(agg, vectors)
        mask.append((time.perf_counter() - t) / silos)
        t = time.perf_counter()
        total = agg.unmask(grid, masked)
        unmask.append(time.perf_counter() - t)
        assert np.array_equal(total, np.mod(sum(vectors.values()), MODULUS).astype(np.uint32))
        agg.survivors = silos - 1  # the next round: one silo drops after the key share
        masked = grid.masked(agg, vectors)
        del masked[nodes[-1]]
        t = time.perf_counter()
        agg.unmask(grid, masked)
        unmask_drop.append(time.perf_counter() - t)
    up_masked = ArrayRecord({P.UPDATE: Array(np.zeros(dim, dtype=np.uint32))}).count_bytes()
    up_float = ArrayRecord({P.UPDATE: Array(np.zeros(dim, dtype=np.float32))}).count_bytes()
    per_round_keys = (
        (key_bytes.get(P.STAGE_KEYS_SETUP, 0) + key_bytes.get(P.STAGE_KEYS_SHARE, 0)) / silos / key_rounds
    )
    unmask_up = grid.bytes_up.get(P.STAGE_UNMASK, 0) / silos / 2
    med = statistics.median
    return {
        "silos": silos,
        "dimension": dim,
        "key_rounds": key_rounds,
        "repeats": repeats,
        "key_setup_s": med(setup),
        "key_setup_per_round_s": med(setup) / key_rounds,
        "mask_per_silo_s": med(mask),
        "unmask_s": med(unmask),
        "unmask_one_dropout_s": med(unmask_drop),
        "bits_per_coordinate": 32,
        "up_bytes_local_float32": up_float,
        "up_bytes_distributed": up_masked + per_round_keys + unmask_up,
        "up_ratio": (up_masked + per_round_keys + unmask_up) / up_float,
        "down_extra_bytes_per_round": collect_cfg_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--silos", type=int, default=10)
    ap.add_argument("--dim", type=int, default=0, help="vector length (0 = the paper's MNIST CNN)")
    ap.add_argument("--key-rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="3 silos, short vectors, 1 repeat")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    dim = a.dim
    if not dim:
        from common.models import build_model

        dim = sum(p.numel() for p in build_model("mnist-cnn", "mnist").parameters())
    if a.smoke:
        row = measure(3, 1000, 2, 1)
    else:
        row = measure(a.silos, dim, a.key_rounds, a.repeats)
    emit(row, out=a.out, as_json=a.json, lines=(f"{k}: {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
