"""Loss curves per stage from the metrics records (matplotlib is optional: the ``plot`` extra)."""

from __future__ import annotations

from kdengine.losses.checks import LOSS_TERMS

__all__ = ["plot_stage"]


def plot_stage(records: list[dict], out_png: str, title: str) -> str | None:
    """Write ``out_png`` with one line per loss term against the step; returns a note instead
    (and writes nothing) when matplotlib is missing or there is nothing to plot."""
    if not records:
        return f"no metrics records for {title}: no loss curve"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'kdengine[plot]'): loss curves skipped"
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    for term in LOSS_TERMS:
        if term in records[0]:
            ax.plot(steps, [r[term] for r in records], label=term, linewidth=2 if term == "loss" else 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return None
