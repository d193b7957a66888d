"""``adadpigu alone``: every silo of a per-silo root trains by itself, centrally, under the same
settings and privacy budget, and is tested on its own test split: the baseline a federation
has to beat to be worth joining (docs/RESULTS.md, "Chem97").

    adadpigu alone --data-dir silos/chem97 --dataset custom --schema simulations/schemas/chem97.toml \\
        --model logreg --test-fraction 0.2 --epsilon 3 --epochs 30 --out-dir results/chem97-alone --json

Each silo is one ``adadpigu train`` run (its own run folder under ``out-dir/<silo>``); the
result is every silo's test accuracy (of the model chosen on its own validation split) and
their mean weighted by test examples, the number comparable with a federated run's pooled
test accuracy. A silo too small for the plan (a batch larger than its records) is reported
as skipped with the reason, not silently dropped.
"""

from __future__ import annotations

import argparse
import json
import os

from common.config import TrainConfig
from common.errors import UserError
from common.outputs import write_json_atomic


def silo_alone(cfg: TrainConfig, *, log=print) -> dict:
    from common.silos import local_splits, silo_folders
    from common.trainer import train_centralized

    folders = silo_folders(cfg.data_dir)
    if folders is None:
        raise UserError(
            f"{cfg.data_dir} has no silos.toml: `adadpigu alone` trains each silo of a per-silo root"
        )
    rows = []
    for folder in folders:
        name = os.path.basename(os.path.normpath(folder))
        one = cfg.replace(data_dir=folder, out_dir=os.path.join(cfg.out_dir, name))
        try:
            summary = train_centralized(one, log=lambda s: None)
        except UserError as exc:
            rows.append({"silo": name, "skipped": str(exc)})
            log(f"[alone] {name}: skipped ({exc})")
            continue
        from common.schema import schema_of

        n_test = len(
            local_splits(
                folder,
                schema_of(cfg.dataset, cfg.schema),
                validation_fraction=cfg.validation_fraction,
                test_fraction=cfg.test_fraction,
            ).test
        )
        rows.append(
            {
                "silo": name,
                "test_examples": n_test,
                "test_accuracy": summary["test_accuracy_best_val"],
                "epsilon": summary["epsilon"],
                "run_dir": summary["run_dir"],
            }
        )
        log(f"[alone] {name}: test accuracy {summary['test_accuracy_best_val']:.4f} on {n_test} examples")
    done = [r for r in rows if "skipped" not in r]
    total = sum(r["test_examples"] for r in done)
    result = {
        "method": cfg.method,
        "model": cfg.model,
        "epsilon": cfg.epsilon if cfg.private else None,
        "seed": cfg.seed if cfg.seeded else None,
        "silos": len(rows),
        "silos_trained": len(done),
        "test_examples": total,
        "test_accuracy_weighted": sum(r["test_accuracy"] * r["test_examples"] for r in done) / total
        if total
        else None,
        "test_accuracy_mean": sum(r["test_accuracy"] for r in done) / len(done) if done else None,
        "rows": rows,
    }
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_json_atomic(os.path.join(cfg.out_dir, "alone.json"), result)
    return result


def cmd_alone(args: argparse.Namespace, config_from_args) -> int:
    cfg = config_from_args(args)
    result = silo_alone(cfg, log=(lambda s: None) if args.json else print)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"[alone] {result['silos_trained']} of {result['silos']} silos trained; test accuracy weighted by "
            f"test examples {result['test_accuracy_weighted']}; {os.path.join(cfg.out_dir, 'alone.json')}"
        )
    return 0


def register(sub, add_config_flags, config_from_args) -> None:
    p = sub.add_parser(
        "alone",
        help="each silo of a per-silo root trains alone (same settings and budget): the baseline to beat",
    )
    add_config_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda a: cmd_alone(a, config_from_args))
