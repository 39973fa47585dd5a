#!/usr/bin/env python3
r"""Plot label instability per consecutive decoder-stage pair over training (paper Fig. 7 layout).

Usage::

    python tools/plot_instability.py output/demo/stageinteractor output/demo/adamixer \
        --output docs/instability_demo.png --smooth 20

Each argument is a training output folder of tools/train_net.py (``metrics.json``, and
``config.yaml`` / ``log.txt`` for the label). One subplot per consecutive stage pair
(stage i -> i+1, 1-based like the paper), x = iteration, y = fraction of ground-truth objects
whose matched query changes between the two stages; one curve per run.

Metric names recognised in ``metrics.json`` (one JSON record per line): any scalar whose name
ends in ``instability_s{a}_s{b}``, optionally preceded by ``label_`` and a prefix, e.g.
``diag/label_instability_s0_s1`` (StageInteractor criterion, logged by the meta-arch) and
``csla/instability_s0_s1`` (the detrex CSLA criteria). Both come from
``stageinteractor.core.diagnostics.label_instability``. A run that logs several groups
(H-Deformable-DETR with CSLA on the one-to-many branch too: ``csla/`` and ``csla_one2many/``)
is plotted with the first group not named ``one2many``, or the one given by ``--group``.

Labels: ``--labels`` if given, else the config file name recorded by detectron2 in the folder's
``log.txt`` (``config_file='configs/demo/stageinteractor_demo.py'`` -> ``stageinteractor_demo``),
else the folder name. ``--smooth N``: trailing moving average over N logged points (1 = raw).
A mistake (a folder without ``metrics.json``, no instability scalars, a bad option value) ends
in one line ``plot_instability: error: ...`` and exit status 2.
"""

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stageinteractor.errors import UserError, run_tool  # noqa: E402


class MetricsError(UserError, ValueError):
    """A run folder or an option cannot be plotted (one line, see stageinteractor.errors)."""


KEY_RE = re.compile(r"(?:^|/)(?:label_)?instability_s(\d+)_s(\d+)$")
CONFIG_FILE_RE = re.compile(r"config_file=['\"]([^'\"]+)['\"]")

Pair = Tuple[int, int]
Series = Dict[Pair, Tuple[np.ndarray, np.ndarray]]


def parse_key(name: str) -> Optional[Pair]:
    """``"diag/label_instability_s0_s1"`` -> (0, 1); None for other names."""
    m = KEY_RE.search(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def key_group(name: str) -> str:
    """The part of a metric name before ``[label_]instability_s<a>_s<b>`` (e.g. ``"diag/"``)."""
    m = KEY_RE.search(name)
    return name[: m.start() + (1 if name[m.start()] == "/" else 0)] if m else ""


def load_metrics(folder: str, group: Optional[str] = None) -> Series:
    """Instability series of one run: {(a, b): (iterations, values)} sorted by iteration.

    A later record of the same iteration replaces an earlier one (resumed runs). When the run
    logs several groups of instability scalars (H-Deformable-DETR with CSLA on both branches:
    ``csla/`` and ``csla_one2many/``), ``group`` picks one (the name prefix, e.g. ``"csla/"``);
    by default the first group whose name does not contain ``one2many``.
    """
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        raise MetricsError(
            f"{folder!r}: no metrics.json (expected a tools/train_net.py output folder)"
        )
    groups: Dict[str, Dict[Pair, Dict[int, float]]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetricsError(f"{path}:{lineno}: not a JSON record ({e})") from None
            if not isinstance(rec, dict) or "iteration" not in rec:
                continue
            for name, value in rec.items():
                pair = parse_key(name)
                if pair is not None and isinstance(value, (int, float)):
                    per_pair = groups.setdefault(key_group(name), {})
                    per_pair.setdefault(pair, {})[int(rec["iteration"])] = float(value)
    if not groups:
        raise MetricsError(
            f"{path}: no label-instability scalars (names ending in 'instability_s<a>_s<b>', e.g. "
            "'diag/label_instability_s0_s1'); was the run trained with a StageInteractor or CSLA "
            "criterion?"
        )
    if group is None:
        names = sorted(groups)
        group = next((g for g in names if "one2many" not in g), names[0])
    elif group not in groups:
        raise MetricsError(
            f"{path}: no instability scalars with the prefix {group!r}; found {sorted(groups)}"
        )
    out: Series = {}
    for pair, points in groups[group].items():
        iters = np.array(sorted(points), dtype=np.int64)
        out[pair] = (iters, np.array([points[i] for i in iters], dtype=np.float64))
    return out


def run_label(folder: str) -> str:
    """Config name from ``log.txt`` (detectron2 logs the command line), else the folder name."""
    log = os.path.join(folder, "log.txt")
    if os.path.isfile(log):
        with open(log, errors="replace") as f:
            for line in f:
                m = CONFIG_FILE_RE.search(line)
                if m:
                    return os.path.splitext(os.path.basename(m.group(1)))[0]
    return os.path.basename(os.path.normpath(folder))


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` points (fewer at the start); window 1 = identity."""
    if window < 1:
        raise ValueError(f"--smooth must be >= 1, got {window}")
    values = np.asarray(values, dtype=np.float64)
    if window == 1 or values.size == 0:
        return values
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_runs(
    runs: Sequence[Tuple[str, Series]], output: str, *, smooth: int = 1, title: Optional[str] = None
) -> List[Pair]:
    """Write the figure; returns the stage pairs plotted (one subplot each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({p for _, series in runs for p in series})
    cols = min(len(pairs), 3)
    rows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True
    )
    for k, (a, b) in enumerate(pairs):
        ax = axes[k // cols][k % cols]
        for label, series in runs:
            if (a, b) in series:
                iters, values = series[(a, b)]
                ax.plot(iters, moving_average(values, smooth), label=label, linewidth=1.4)
        ax.set_title(f"stage {a + 1} \u2192 {b + 1}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if k % cols == 0:
            ax.set_ylabel("label instability")
    for k in range(len(pairs), rows * cols):
        axes[k // cols][k % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    head = title or "fraction of GT objects whose matched query changes between stages"
    if smooth > 1:
        head += f" (moving average of {smooth})"
    top = 1.0 - 0.5 / (3.2 * rows)  # title and legend take ~0.5 inch
    fig.suptitle(head, y=0.995, fontsize=10)
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, top + 0.02),
        ncol=max(len(runs), 1),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, top - 0.03))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return pairs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", help="training output folders (metrics.json inside)")
    p.add_argument("--output", required=True, help="PNG file to write")
    p.add_argument("--labels", nargs="+", default=None, help="one label per run")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window (logged points)")
    p.add_argument("--title", default=None)
    p.add_argument(
        "--group",
        default=None,
        help="metric-name prefix to plot when a run logs several (e.g. csla/ or csla_one2many/)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    """The command line; returns the exit status (2 and one line on a mistake)."""
    return run_tool(_main, argv, tool="plot_instability")


def _main(argv=None) -> int:
    args = parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise MetricsError(f"--labels: got {len(args.labels)} labels for {len(args.runs)} runs")
    if args.smooth < 1:
        raise MetricsError(f"--smooth must be >= 1, got {args.smooth}")
    labels = args.labels or [run_label(r) for r in args.runs]
    runs = [(label, load_metrics(r, args.group)) for label, r in zip(labels, args.runs)]
    pairs = plot_runs(runs, args.output, smooth=args.smooth, title=args.title)
    for label, series in runs:
        last = ", ".join(
            f"s{a}-s{b} {series[(a, b)][1][-1]:.3f}" for a, b in pairs if (a, b) in series
        )
        print(f"{label}: {len(next(iter(series.values()))[0])} points; last values: {last}")
    print(f"wrote {args.output} ({len(pairs)} stage pairs, {len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
