"""The ``adadpigu`` command line: privacy calculator, centralized training, simulation.

Every :class:`~common.errors.UserError` (bad setting, missing data, unreachable
budget) ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Sequence

from common.config import ACCOUNTANTS, CENTRALIZED_ONLY, FEDERATED_ONLY, TrainConfig
from common.errors import UserError
from simulations.flags import add_setting_flags

EXIT_USER_ERROR = 2


def _add_config_flags(parser: argparse.ArgumentParser, *, federated: bool = False) -> None:
    """The training settings as flags: a federated command leaves out the centralized-only
    ones, a centralized command the federated-only ones (each would be refused or ignored)."""
    add_setting_flags(
        parser, TrainConfig, "cfg", exclude=FEDERATED_ONLY if not federated else CENTRALIZED_ONLY
    )


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {
        name[len("cfg_") :].replace("_", "-"): value  # errors name the flag (batch-size), not the field
        for name, value in vars(args).items()
        if name.startswith("cfg_") and value is not None
    }
    return TrainConfig.from_mapping(values)


def cmd_privacy(args: argparse.Namespace) -> int:
    from common.accounting import Phase, accountant_used, calibrate_noise, compute_epsilon

    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise UserError("give exactly one of --noise-multiplier and --target-epsilon")
    if not (0 < args.sample_rate <= 1):
        raise UserError(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    if not (0 < args.delta < 1):
        raise UserError(f"--delta must be in (0, 1) (delta = 1 promises nothing), got {args.delta}")
    for name in ("noise_multiplier", "target_epsilon"):
        v = getattr(args, name)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
    if args.steps <= 0:
        raise UserError(f"--steps must be a positive integer, got {args.steps}")
    out = {"sample_rate": args.sample_rate, "steps": args.steps, "delta": args.delta}
    if args.noise_multiplier is not None:
        if args.noise_multiplier <= 0:
            raise UserError(f"--noise-multiplier must be > 0, got {args.noise_multiplier}")
        eps = compute_epsilon(
            noise_multiplier=args.noise_multiplier,
            sample_rate=args.sample_rate,
            steps=args.steps,
            delta=args.delta,
            accountant=args.accountant,
        )
        out.update(noise_multiplier=args.noise_multiplier, epsilon=eps)
        text = f"epsilon = {eps:.4f}"
    else:
        sigma = calibrate_noise(
            args.target_epsilon, args.delta, args.sample_rate, args.steps, accountant=args.accountant
        )
        eps = compute_epsilon(
            noise_multiplier=sigma,
            sample_rate=args.sample_rate,
            steps=args.steps,
            delta=args.delta,
            accountant=args.accountant,
        )
        out.update(target_epsilon=args.target_epsilon, noise_multiplier=sigma, epsilon=eps)
        text = f"noise multiplier = {sigma:.4f} (epsilon = {eps:.4f})"
    # the accountant that produced the number (PLD falls back to RDP's bound below PLD_MIN_NOISE)
    used = accountant_used([Phase(out["noise_multiplier"], args.sample_rate, args.steps)], args.accountant)
    out.update(accountant=used, accountant_requested=args.accountant)
    if args.json:
        print(json.dumps(out))
    else:
        fallback = f", as an upper bound on {args.accountant}'s" if used != args.accountant else ""
        print(
            f"{text} at delta = {args.delta:g} ({used}{fallback}, q = {args.sample_rate:g}, {args.steps} steps)"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from common.trainer import train_centralized

    cfg = _config_from_args(args)
    summary = train_centralized(cfg, command="adadpigu " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_stop_superlink(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simulations.processes import flwr_home, stop_local_superlink

    home = Path(args.flwr_home) if args.flwr_home else flwr_home()
    try:
        stopped = stop_local_superlink(home)
    except RuntimeError as exc:
        raise UserError(f"the local SuperLink of {home}: {exc}") from None
    if stopped:
        print(f"stopped the local SuperLink of {home} (pids {', '.join(map(str, stopped))})")
    else:
        print(f"no local SuperLink of {home} is running")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adadpigu", description="Federated, differentially private deep learning with AdaDPIGU."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("privacy", help="epsilon of a DP-SGD schedule, or the noise for a target epsilon")
    p.add_argument("--noise-multiplier", type=float, help="sigma (finite, > 0): print epsilon")
    p.add_argument(
        "--target-epsilon", type=float, help="epsilon (finite, > 0): print the sigma that meets it"
    )
    p.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q in (0, 1]")
    p.add_argument("--steps", type=int, required=True, help="number of releases, 1 to 1e8")
    p.add_argument("--delta", type=float, default=1e-5, help="delta in (0, 1) (default 1e-5)")
    p.add_argument(
        "--accountant",
        choices=ACCOUNTANTS,
        default="pld",
        help="pld (default; below sigma 0.3 the RDP upper bound is used) or rdp",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_privacy)

    p = sub.add_parser("train", help="centralized training on one machine")
    _add_config_flags(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "stop-superlink",
        help="stop the local SuperLink (and its SuperExec) that `flwr run .` left running, and nothing else",
    )
    p.add_argument("--flwr-home", default=None, help="its Flower home (default: $FLWR_HOME, else ~/.flwr)")
    p.set_defaults(func=cmd_stop_superlink)

    _register_extra(sub)
    return parser


def _register_extra(sub: argparse._SubParsersAction) -> None:
    """Sub-commands that need Flower (imported lazily)."""
    try:
        from simulations.commands import register
    except ImportError:
        return
    register(sub, _add_config_flags, _config_from_args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"adadpigu: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # output piped into `head` and the like: not an error of the run
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("adadpigu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
