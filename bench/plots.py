"""What every committed plot shares: a caption saying what ran where and when, and axes that
read as numbers.

The caption's second line names the machine (CPU model and cores, or the GPU), the weights
(dummy: random values in the real shapes, so the figures measure speed, not answers), the date
of the measurement and the result file the figure was drawn from. The date is the JSON's
"date" field when it has one, else the commit date of the result file when it is committed
and unchanged, else the file's modification date (a run that has just written it).
"""
from __future__ import annotations

import datetime
import os
import shlex
import subprocess
from typing import Iterable, Optional

EMBEDDED = "embedded SmolLM2-135M-Instruct (real weights)"


def pyplot():
    """matplotlib.pyplot drawing to files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def result_date(path: Optional[str], doc: Optional[dict] = None) -> str:
    if doc and doc.get("date"):
        return str(doc["date"])[:10]
    if path is None:  # drawn by the run itself, nothing written
        return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    where = os.path.dirname(os.path.abspath(path))
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", os.path.abspath(path)],
                               cwd=where, capture_output=True, text=True, check=True).stdout
        if not dirty.strip():
            day = subprocess.run(["git", "log", "-1", "--format=%cs", "--",
                                  os.path.abspath(path)], cwd=where, capture_output=True,
                                 text=True, check=True).stdout.strip()
            if day:
                return day
    except (OSError, subprocess.CalledProcessError):
        pass
    return datetime.datetime.fromtimestamp(os.path.getmtime(path),
                                           datetime.timezone.utc).strftime("%Y-%m-%d")


def machine(m: dict) -> str:
    """The GPU when there was one (its host in brackets), else the CPU model and its cores."""
    host = f"{m.get('cpu', 'CPU')}, {m['cores']} cores" if m.get("cores") else m.get("cpu", "CPU")
    return f"{m['gpu']} (host: {host})" if m.get("gpu") else host


def model(command: str) -> str:
    """The model a serve flag string or a bench command line names, and whose weights."""
    words = shlex.split(command)
    name = None
    for i, w in enumerate(words):
        if w == "--model" and i + 1 < len(words):
            name = words[i + 1]
    if name is None and words and not words[0].startswith("-") and not words[0].endswith(".py") \
            and "python" not in words[0]:
        name = words[0]  # `minivllm serve MODEL ...`: the serve flags start with it
    dummy = any(w == "--load-format" and i + 1 < len(words) and words[i + 1] == "dummy"
                for i, w in enumerate(words)) or "--load-format=dummy" in words
    if name is None:
        return EMBEDDED
    return f"{name} (dummy weights: random, real shapes)" if dummy else name


def caption(path: Optional[str], doc: dict, what: str, model_from: Optional[str] = None) -> str:
    """Two lines: what was measured; model and weights, machine, date, source file."""
    parts = [model(model_from if model_from is not None else doc.get("command", "")),
             machine(doc.get("machine", {})), f"measured {result_date(path, doc)}"]
    if path is not None:
        parts.append(os.path.basename(path))
    return what + "\n" + " | ".join(parts)


def number(v: float) -> str:
    """A measured value as a label: 20,708 / 245 / 14 / 1.17."""
    return f"{v:,.0f}" if abs(v) >= 10 else f"{v:.3g}"


def plain_numbers(axis) -> None:
    """Tick labels as 1,000 and 20 on a log axis too, not 10^3 and 2x10^1. Call it once the
    data is drawn: a log axis over more than two decades gets its powers of ten only."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    if axis.get_scale() == "log":
        low, high = axis.get_view_interval()
        subs = (1.0,) if high / max(low, 1e-12) > 150 else (1.0, 2.0, 5.0)
        axis.set_major_locator(LogLocator(base=10, subs=subs))
        axis.set_minor_formatter(NullFormatter())


def decade_floor(values: Iterable[float]) -> float:
    """Where a log axis of bars should start: the power of ten below the least value (half
    of it when that value sits on the power), so every bar has a visible length from a round
    base."""
    import math

    least = min(values)
    base = 10 ** math.floor(math.log10(least))
    return base / 2 if least / base < 1.5 else base


def legend_below(ax, handles=None, labels=None, offset: float = -0.16) -> None:
    """The legend under the axes, where it covers no data."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, fontsize=8, ncol=2, loc="upper center",
              bbox_to_anchor=(0.5, offset))


def constant(values: Iterable) -> Optional[float]:
    """The one value of a series that never changes (None when it does, or is empty)."""
    seen = {v for v in values if v is not None}
    return seen.pop() if len(seen) == 1 else None


def save(fig, path: str, title: str, dpi: int = 110) -> None:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
