"""``--plot``: latency and TFLOP/s against token count, one line per implementation, one PNG per scenario."""

from __future__ import annotations

import math
from pathlib import Path


def write_plots(rows: list[dict], base: str) -> list[Path]:
    """PNG files ``<base>_<scenario>.png``; rows that are not OK are left out of the lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_path = Path(base)
    if base_path.suffix in (".csv", ".md", ".json", ".png"):
        base_path = base_path.with_suffix("")
    base_path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        fig, (ax_lat, ax_tf) = plt.subplots(1, 2, figsize=(11, 4))
        for impl in dict.fromkeys(r["implementation"] for r in rows):
            pts = [
                r
                for r in rows
                if r["scenario"] == scenario
                and r["implementation"] == impl
                and r["status"] == "OK"
                and not math.isnan(r["latency_mean_ms"])
            ]
            if not pts:
                continue
            tokens = [r["num_tokens"] for r in pts]
            ax_lat.plot(tokens, [r["latency_mean_ms"] for r in pts], marker="o", label=impl)
            ax_tf.plot(tokens, [r["tflops"] for r in pts], marker="o", label=impl)
        for ax, label in ((ax_lat, "latency (ms)"), (ax_tf, "TFLOP/s")):
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlabel("tokens")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        ax_lat.set_yscale("log")
        ax_lat.legend(fontsize="small")
        fig.suptitle(f"{scenario} routing")
        fig.tight_layout()
        path = base_path.with_name(f"{base_path.name}_{scenario}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
