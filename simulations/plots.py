"""Figures (PNG) of data splits and results: ``adadpigu plot DIR`` and ``adadpigu plot-partition``.

Result plots take the rows of :func:`simulations.results.collect` (one per finished run:
its settings with kebab-case keys, ``test_accuracy_best_val``, ``test_accuracy_final``,
``epsilon_spent``, ``run_dir``, ...); curves are read from ``<run_dir>/metrics.json``
(centralized: one row per ``epoch`` with ``test_accuracy``, ``epsilon``; federated: one
row per ``round`` with ``test_accuracy``, ``max_epsilon``).

Runs that differ only in ``seed`` form one series (mean ± standard deviation over seeds);
a series is named by the settings that vary among the plotted runs. Each function
returns the path it wrote, or ``None`` when the rows hold nothing to plot (e.g. a single
target ε for an accuracy-vs-ε plot). Figures are drawn on matplotlib's Agg canvas
directly, so importing this module neither loads matplotlib nor changes the backend.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from common.errors import UserError

# the accuracy a result plot shows: the model chosen on validation data, tested once
ACCURACY_KEYS = ("test_accuracy_best_val", "test_accuracy_final")
# row keys that never name a series
_NOT_SETTINGS = {
    "seed",
    "run_dir",
    "command",
    "out-dir",
    "data-dir",
    "device",
    "test_accuracy_best_val",
    "test_accuracy_final",
    "best_val_accuracy",
    "epsilon_spent",
    "rounds_completed",
    "seconds",
}
_MASK_METHODS = ("adadpigu", "adadpigu-static")


# ----- helpers --------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _number(value) -> float | None:
    """A finite float, or None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _accuracy(row: dict) -> float | None:
    for key in ACCURACY_KEYS:
        v = _number(row.get(key))
        if v is not None:
            return v
    return None


# settings that only matter for some runs: (keys, does the row use them?)
_CONDITIONAL: tuple[tuple[tuple[str, ...], Callable[[dict], bool]], ...] = (
    (
        ("epsilon", "delta", "accountant", "noise-multiplier", "pretrain-noise-multiplier", "clip-norm"),
        lambda r: r.get("method") != "nonprivate",
    ),
    (
        ("r0", "r-max", "schedule", "mask-scope", "importance"),
        lambda r: r.get("method") in _MASK_METHODS,
    ),
    (
        (
            "beta1",
            "beta2",
            "h1",
            "h2",
            "scale-rule",
            "pretrain-fraction",
            "pretrain-noise-multiplier",
            "importance-rounds",
        ),
        lambda r: r.get("method") in (*_MASK_METHODS, "adaclip"),
    ),
    (("alpha",), lambda r: r.get("partitioner") == "dirichlet"),
    (("classes-per-silo",), lambda r: r.get("partitioner") == "pathological"),
)


def _setting(row: dict, key: str):
    """``row[key]``, or None when the run does not use that setting (e.g. r0 of DP-SGD)."""
    if "method" in row or "partitioner" in row:
        for keys, used in _CONDITIONAL:
            if key in keys and not used(row):
                return None
    v = row.get(key)
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def _setting_keys(rows: Sequence[dict], exclude: Iterable[str] = ()) -> list[str]:
    """Settings every row has (``method`` first).

    A setting that exists in some runs' config.json only (written by another version of
    the code) is left out, so it does not split the series.
    """
    if not rows:
        return []
    skip = _NOT_SETTINGS | set(exclude)
    keys = [k for k in rows[0] if k not in skip and all(k in r for r in rows)]
    return sorted(keys, key=lambda k: (k != "method", k))


def _varying_keys(rows: Sequence[dict], exclude: Iterable[str] = ()) -> list[str]:
    """Settings whose (used) value differs among ``rows``."""
    keys = _setting_keys(rows, exclude)
    # a setting that only some methods use (None elsewhere) does not vary by itself
    return [
        k
        for k in keys
        if k == "method"
        and len({r.get(k) for r in rows}) > 1
        or len({_setting(r, k) for r in rows} - {None}) > 1
    ]


def _series(rows: Sequence[dict], keys: Sequence[str]) -> dict[str, list[dict]]:
    """Rows grouped by the used values of ``keys``, named like ``dpsgd, epsilon=3.0``."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        parts = []
        for k in keys:
            v = _setting(r, k)
            if v is not None:
                parts.append(str(v) if k == "method" else f"{k}={v}")
        groups.setdefault(", ".join(parts) or str(r.get("method", "runs")), []).append(r)
    return dict(sorted(groups.items()))


def _legend(ax, entries: int) -> None:
    """Inside the axes for a few entries, to the right of them for many."""
    if entries > 5:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    else:
        ax.legend(fontsize=8)


def _width(entries: int) -> float:
    return 6.4 if entries <= 5 else 10.0


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def load_metrics(run_dir: str) -> list[dict]:
    """The per-epoch / per-round rows of a run (``metrics.json``); [] when missing or unreadable."""
    path = os.path.join(run_dir, "metrics.json")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return []
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []


def _x_kind(metrics: Sequence[dict]) -> str | None:
    if any("round" in m for m in metrics):
        return "round"
    if any("epoch" in m for m in metrics):
        return "epoch"
    return None


# ----- label distribution ------------------------------------------------------------------


def plot_label_distribution(
    dist, path: str, *, title: str | None = None, class_names: Sequence[str] | None = None
) -> str:
    """Stacked bars: examples of each class (colour) in each silo (bar).

    ``dist`` is ``[num_silos, num_classes]`` as from :func:`common.partition.label_distribution`.
    """
    d = np.asarray(dist, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] == 0 or d.shape[1] == 0:
        raise ValueError(f"dist must be a non-empty [silos, classes] array, got shape {d.shape}")
    silos, classes = d.shape
    names = list(class_names) if class_names is not None else [str(c) for c in range(classes)]
    fig = _figure(max(6.4, 0.45 * silos + 3.0), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(silos)
    bottom = np.zeros(silos)
    for c, color in zip(range(classes), _colors(classes)):
        ax.bar(x, d[:, c], bottom=bottom, color=color, label=names[c], width=0.8, edgecolor="white", lw=0.3)
        bottom += d[:, c]
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in x])
    ax.set_xlabel("silo (partition id)")
    ax.set_ylabel("examples")
    ax.set_xlim(-0.6, silos - 0.4)
    if title:
        ax.set_title(title)
    ax.legend(title="class", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title_fontsize=8)
    return _save(fig, path)


# ----- curves from metrics.json ---------------------------------------------------------


def _curves(
    rows: Sequence[dict], path: str, *, kind: str, ylabel: str, value: Callable[[dict], float | None], title
) -> str | None:
    """One line per series (mean ± std band over seeds) of ``value`` against round/epoch."""
    runs = []
    for r in rows:
        if not r.get("run_dir"):
            continue
        metrics = load_metrics(str(r["run_dir"]))
        if _x_kind(metrics) != kind:
            continue
        points = [(m.get(kind), value(m)) for m in metrics]
        points = [(int(x), y) for x, y in points if _number(x) is not None and y is not None]
        if points:
            runs.append((r, points))
    if not runs or max(len(p) for _, p in runs) < 2:
        return None
    groups = _series([r for r, _ in runs], _varying_keys([r for r, _ in runs]))
    by_run = {id(r): p for r, p in runs}
    fig = _figure(_width(len(groups)))
    ax = fig.add_subplot(1, 1, 1)
    for (label, members), color in zip(groups.items(), _colors(len(groups))):
        at: dict[int, list[float]] = {}
        for r in members:
            for x, y in by_run[id(r)]:
                at.setdefault(x, []).append(y)
        xs = sorted(at)
        stats = [_mean_std(at[x]) for x in xs]
        mean = np.array([s[0] for s in stats])
        std = np.array([s[1] for s in stats])
        n = len(members)
        ax.plot(xs, mean, color=color, lw=1.5, label=label + (f" (n={n})" if n > 1 else ""))
        if n > 1:
            ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2, lw=0)
    ax.set_xlabel(kind)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, len(groups))
    return _save(fig, path)


def plot_accuracy_curves(rows: Sequence[dict], path: str, *, kind: str = "round") -> str | None:
    """Test accuracy against ``kind`` (``"round"``: federated, ``"epoch"``: centralized) per series."""
    return _curves(
        rows,
        path,
        kind=kind,
        ylabel="test accuracy",
        value=lambda m: _number(m.get("test_accuracy")),
        title=f"test accuracy per {kind}",
    )


def plot_epsilon_curves(rows: Sequence[dict], path: str, *, kind: str = "round") -> str | None:
    """Privacy spent (federated: largest ε over clients) against round / epoch per series."""
    key = "max_epsilon" if kind == "round" else "epsilon"
    return _curves(
        [r for r in rows if r.get("method") != "nonprivate"],
        path,
        kind=kind,
        ylabel="ε spent" + (" (max over clients)" if kind == "round" else ""),
        value=lambda m: _number(m.get(key)),
        title=f"privacy spent per {kind}",
    )


# ----- final accuracy against a setting ------------------------------------------------------


def _plot_vs(
    rows: Sequence[dict],
    path: str,
    *,
    x_key: str,
    xlabel: str,
    title: str,
    include: Callable[[dict], bool],
    reference: Callable[[dict], bool] = lambda r: False,
    reference_key: str = "method",
    log_x: bool | None = None,
) -> str | None:
    """Accuracy (mean ± std over seeds) against ``row[x_key]``, one line per series.

    Only series with at least two x values are drawn (a run that belongs to another part
    of a grid is a single point, not a trend); None when there is none. Rows for which
    ``reference`` holds (and ``include`` does not) are baselines, drawn as dashed
    horizontal lines at their mean, when they match a drawn series in every setting but
    ``x_key`` and ``reference_key`` (e.g. the non-private run of the same grid).
    """
    points = [
        r for r in rows if include(r) and _number(r.get(x_key)) is not None and _accuracy(r) is not None
    ]
    refs = [r for r in rows if not include(r) and reference(r) and _accuracy(r) is not None]
    groups = {
        label: members
        for label, members in _series(points, _varying_keys(points, exclude=(x_key,))).items()
        if len({_number(r[x_key]) for r in members}) >= 2
    }
    if not groups:
        return None
    drawn = [r for members in groups.values() for r in members]
    context = _setting_keys(drawn + refs, exclude=(x_key, reference_key))
    signatures = {tuple(_setting(r, k) for k in context) for r in drawn}
    refs = [r for r in refs if tuple(_setting(r, k) for k in context) in signatures]
    keys = _varying_keys(drawn + refs, exclude=(x_key,))
    groups = _series(drawn, keys)
    ref_groups = _series(refs, keys)
    xs_all = sorted({_number(r[x_key]) for r in drawn})
    fig = _figure(_width(len(groups) + len(ref_groups)))
    ax = fig.add_subplot(1, 1, 1)
    colors = _colors(len(groups) + len(ref_groups))
    for (label, members), color in zip(groups.items(), colors):
        at: dict[float, list[float]] = {}
        for r in members:
            at.setdefault(_number(r[x_key]), []).append(_accuracy(r))
        xs = sorted(at)
        stats = [_mean_std(at[x]) for x in xs]
        seeds = max(len(v) for v in at.values())
        ax.errorbar(
            xs,
            [s[0] for s in stats],
            yerr=[s[1] for s in stats],
            color=color,
            marker="o",
            ms=4,
            capsize=3,
            lw=1.5,
            label=label + (f" (≤{seeds} seeds)" if seeds > 1 else ""),
        )
    for (label, members), color in zip(ref_groups.items(), colors[len(groups) :]):
        mean, _ = _mean_std([_accuracy(r) for r in members])
        ax.axhline(mean, color=color, ls="--", lw=1.2, label=label)
    if log_x is None:
        log_x = xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 10
    if log_x:
        ax.set_xscale("log")
    ax.set_xticks(xs_all)
    ax.set_xticklabels([f"{x:g}" for x in xs_all])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (best validation round/epoch)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, len(groups) + len(ref_groups))
    return _save(fig, path)


def plot_accuracy_vs_epsilon(rows: Sequence[dict], path: str) -> str | None:
    """Accuracy against the target ε per series; non-private runs as a dashed line."""
    return _plot_vs(
        rows,
        path,
        x_key="epsilon",
        xlabel="target ε",
        title="accuracy vs privacy budget",
        include=lambda r: r.get("method") != "nonprivate",
        reference=lambda r: r.get("method") == "nonprivate",
    )


def plot_accuracy_vs_r0(rows: Sequence[dict], path: str) -> str | None:
    """Accuracy against the initial retention ratio r0 (AdaDPIGU methods); others as dashed lines."""
    return _plot_vs(
        rows,
        path,
        x_key="r0",
        xlabel="initial retention ratio r0",
        title="accuracy vs retention ratio",
        include=lambda r: r.get("method") in _MASK_METHODS,
        reference=lambda r: r.get("method") not in _MASK_METHODS,
        log_x=False,
    )


def plot_accuracy_vs_alpha(rows: Sequence[dict], path: str) -> str | None:
    """Accuracy against the Dirichlet α of the split (small α: strong label skew); IID as dashed lines."""
    return _plot_vs(
        rows,
        path,
        x_key="alpha",
        xlabel="Dirichlet α (smaller = more label skew)",
        title="accuracy vs data heterogeneity",
        include=lambda r: r.get("partitioner") == "dirichlet",
        reference=lambda r: r.get("partitioner") == "iid",
        reference_key="partitioner",
        log_x=True,
    )


def plot_run_label_distribution(run_dir: str) -> str | None:
    """``label-distribution.png`` in a federated run folder, from the counts the server wrote."""
    src = os.path.join(run_dir, "label-distribution.json")
    if not os.path.exists(src):
        return None
    with open(src) as fh:
        data = json.load(fh)
    return plot_label_distribution(
        np.asarray(data["counts"]), os.path.join(run_dir, "label-distribution.png"), title=data["title"]
    )


def plot_all(rows: Sequence[dict], out_dir: str) -> list[str]:
    """Every plot the rows support, as PNGs in ``out_dir``; the paths written."""
    out = []
    for kind in ("round", "epoch"):
        out.append(plot_accuracy_curves(rows, os.path.join(out_dir, f"accuracy-vs-{kind}.png"), kind=kind))
        out.append(plot_epsilon_curves(rows, os.path.join(out_dir, f"epsilon-vs-{kind}.png"), kind=kind))
    out.append(plot_accuracy_vs_epsilon(rows, os.path.join(out_dir, "accuracy-vs-epsilon.png")))
    out.append(plot_accuracy_vs_r0(rows, os.path.join(out_dir, "accuracy-vs-r0.png")))
    out.append(plot_accuracy_vs_alpha(rows, os.path.join(out_dir, "accuracy-vs-alpha.png")))
    return [p for p in out if p is not None]


# ----- command line ------------------------------------------------------------------------


def cmd_plot(args: argparse.Namespace) -> int:
    from simulations.results import collect_finished

    rows = collect_finished(args.dir)
    if not rows:
        raise UserError(f"no finished runs (summary.json) under {args.dir}")
    paths = plot_all(rows, args.out or os.path.join(args.dir, "plots"))
    paths += [p for p in (plot_run_label_distribution(r["run_dir"]) for r in rows) if p]
    if not paths:
        raise UserError(f"the {len(rows)} runs under {args.dir} hold nothing to plot (no metrics.json)")
    for p in paths:
        print(p)
    return 0


def cmd_plot_partition(args: argparse.Namespace, config_from_args) -> int:
    from common.data import load_dataset, take_subset
    from common.partition import label_distribution, partition_indices, skew_statistic

    cfg = config_from_args(args)
    if args.num_partitions < 1:
        raise UserError(f"--num-partitions must be >= 1, got {args.num_partitions}")
    data = take_subset(load_dataset(cfg.dataset, cfg.data_dir, True), cfg.train_subset)
    parts = partition_indices(data.y, args.num_partitions, cfg)
    num_classes = int(data.y.max()) + 1
    dist = label_distribution(data.y, parts, num_classes=max(num_classes, 10))
    skew = skew_statistic(dist)
    detail = {
        "dirichlet": f" α={cfg.alpha:g}",
        "pathological": f" {cfg.classes_per_silo} classes/silo",
    }.get(cfg.partitioner, "")
    title = f"{cfg.dataset}: {cfg.partitioner}{detail}, {args.num_partitions} silos (label skew {skew:.2f})"
    path = plot_label_distribution(dist, args.out, title=title)
    print(f"{path} (mean TV distance to the pooled label distribution: {skew:.4f})")
    return 0


def register(sub, add_config_flags, config_from_args) -> None:
    p = sub.add_parser("plot", help="PNG figures from a folder of finished runs (accuracy, ε, r0, α)")
    p.add_argument("dir")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: DIR/plots)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("plot-partition", help="PNG of the label distribution of a cross-silo split")
    add_config_flags(p, federated=True)
    p.add_argument("--num-partitions", type=int, default=10, help="number of silos")
    p.add_argument("--out", default="label-distribution.png", help="PNG path")
    p.set_defaults(func=lambda a: cmd_plot_partition(a, config_from_args))
