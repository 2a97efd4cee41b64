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
    cpu = " ".join(m.get("cpu", "CPU").replace("(R)", "").replace("(TM)", "").split())
    host = f"{cpu}, {m['cores']} cores" if m.get("cores") else cpu
    return f"{m['gpu']} (host: {host})" if m.get("gpu") else host


def dummy(command: str) -> bool:
    """Whether a serve flag string or a bench command line loads dummy weights."""
    words = shlex.split(command)
    return "--load-format=dummy" in words or any(
        w == "--load-format" and words[i + 1:i + 2] == ["dummy"] for i, w in enumerate(words))


DUMMY = "dummy weights: random, real shapes"


def model(command: str) -> str:
    """The model a serve flag string or a bench command line names, and whose weights."""
    words = shlex.split(command)
    name = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--model"), None)
    if name is None and words and not words[0].startswith("-") and "python" not in words[0]:
        name = words[0]  # `minivllm serve MODEL ...`: the serve flags start with it
    if name is None:
        return EMBEDDED
    return f"{name} ({DUMMY})" if dummy(command) else name


def caption(sources, doc: dict, what: str, subject: Optional[str] = None) -> str:
    """Two lines: what was measured; then the model and its weights (`subject`, by default
    what the doc's command names), the machine, the date and the result file(s) drawn from
    (`sources`: a path, several, or None when the run draws before writing any)."""
    paths = [sources] if isinstance(sources, str) or sources is None else list(sources)
    parts = [subject if subject is not None else model(doc.get("command", "")),
             machine(doc.get("machine", {})),
             "measured " + ", ".join(sorted({result_date(p, doc) for p in paths}))]
    parts += [os.path.basename(p) for p in paths if p is not None]
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


def _wrap(line: str, width: int) -> list[str]:
    """Lines of at most `width` characters, broken between " | " fields where it can."""
    import textwrap

    out: list[str] = []
    for part in line.split(" | "):
        if out and len(out[-1]) + 3 + len(part) <= width:
            out[-1] += " | " + part
        else:
            out += textwrap.wrap(part, width, break_on_hyphens=False)
    return out


def save(fig, path: str, title: str, dpi: int = 110) -> None:
    """Title the figure, wrapping each line to the figure's width (about 12 characters an
    inch at 10 pt), and write it."""
    width = int(fig.get_figwidth() * 12)
    fig.suptitle("\n".join(w for line in title.split("\n") for w in _wrap(line, width)),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
