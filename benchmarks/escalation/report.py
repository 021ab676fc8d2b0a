"""Plot and Markdown table of the escalation benchmark, and the `## routing` RESULTS.md section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SECTION = "## routing"


def plot(path: Path, rates: Sequence[float], curves: Mapping[str, Sequence[float]],
         expert_accuracy: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"merged + calibrated": "-o", "aligned + raw": "-s", "random (merged)": "--",
              "oracle (merged)": ":", "random": "--", "oracle": ":"}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [100 * r for r in rates]
    for name, ys in curves.items():
        ax.plot(xs, [100 * y for y in ys], styles.get(name, "-"), label=name, markersize=3)
    ax.axhline(100 * expert_accuracy, color="grey", lw=0.8, label="expert alone")
    ax.axvline(20, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("escalation rate (%)")
    ax.set_ylabel("accuracy of final answers (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rates: Sequence[float], curves: Mapping[str, Sequence[float]],
          show: Sequence[float] = (0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)) -> str:
    names = list(curves)
    lines = ["| escalation rate | " + " | ".join(names) + " |",
             "|---:|" + "---:|" * len(names)]
    for want in show:
        i = min(range(len(rates)), key=lambda j: abs(rates[j] - want))
        cells = " | ".join(f"{100 * curves[n][i]:.1f}%" for n in names)
        lines.append(f"| {100 * rates[i]:.0f}% | {cells} |")
    return "\n".join(lines)


def write_section(results_md: Path, body: str, heading: str = SECTION) -> None:
    """Replace (or append) only the `heading` section (default `## routing`) of RESULTS.md."""
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    section = f"{heading}\n\n{body.strip()}\n"
    start = _find(text, heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(heading))
        end = len(text) if nxt < 0 else nxt + 1
        text = text[:start] + section + ("\n" + text[end:] if nxt >= 0 else "")
    results_md.write_text(text)


def _find(text: str, heading: str) -> int:
    for pos in range(len(text)):
        if text.startswith(heading, pos) and (pos == 0 or text[pos - 1] == "\n"):
            tail = text[pos + len(heading): pos + len(heading) + 1]
            if tail in ("", "\n", " "):
                return pos
    return -1


def summary_lines(s: dict[str, Any]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in s.items())
