"""``adadpigu audit``: a one-run canary audit of a centralized training run.

Canaries are training examples with a wrong label (mislabelled examples are what a model
memorises most visibly); each is included with probability 1/2. After training, the
score of a canary is minus the model's loss on its wrong label. See ``common.audit``.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from common.audit import audit_scores
from common.config import TrainConfig
from common.data import Splits, TensorData
from common.engine import derive_seed
from common.errors import ConfigError
from common.trainer import splits_for, train_centralized


def make_canaries(train: TensorData, m: int, seed: int) -> tuple[TensorData, TensorData, np.ndarray]:
    """(base data without the canaries, the m canaries with wrong labels, inclusion bits)."""
    if not 2 <= m < len(train):
        raise ConfigError(
            "canaries", m, f"must be in [2, {len(train) - 1}] for {len(train)} training examples"
        )
    g = torch.Generator().manual_seed(derive_seed(seed, "audit", "canaries"))
    perm = torch.randperm(len(train), generator=g)
    canary_idx, base_idx = perm[:m], perm[m:]
    canaries = train.subset(canary_idx)
    wrong = (canaries.y + torch.randint(1, 10, (m,), generator=g)) % 10
    canaries = TensorData(canaries.x, wrong)
    included = (torch.rand(m, generator=g) < 0.5).numpy()
    return train.subset(base_idx.sort().values), canaries, included


@torch.no_grad()
def canary_scores(model: torch.nn.Module, canaries: TensorData) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    losses = F.cross_entropy(model(canaries.x.to(device)), canaries.y.to(device), reduction="none")
    return (-losses).cpu().numpy()


def run_audit(cfg: TrainConfig, *, canaries: int = 1000, beta: float = 0.05, log=print) -> dict:
    splits = splits_for(cfg)
    base, can, included = make_canaries(splits.train, canaries, cfg.seed)
    idx = torch.from_numpy(np.flatnonzero(included))
    train = TensorData(torch.cat([base.x, can.x[idx]]), torch.cat([base.y, can.y[idx]]))
    summary = train_centralized(
        cfg, log=log, splits=Splits(train, splits.validation, splits.test), return_model=True
    )
    model = summary.pop("model")
    result = audit_scores(
        canary_scores(model, can), included, beta=beta, delta=cfg.delta if cfg.private else 0.0
    )
    result.update(
        method=cfg.method,
        accountant_epsilon=summary["epsilon"] if cfg.private else math.inf,
        delta=cfg.delta,
        test_accuracy=summary["test_accuracy_final"],
        run_dir=summary["run_dir"],
    )
    with open(os.path.join(summary["run_dir"], "audit.json"), "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    log(
        f"[audit] {result['correct']}/{result['guesses']} correct guesses on {canaries} canaries: "
        f"empirical epsilon >= {result['epsilon_lower_bound']:.3f} (confidence {1 - beta:.0%}); "
        f"accountant epsilon = {result['accountant_epsilon']}"
    )
    return result
