"""Plot digits FD and class accuracy of an iMF model against omega (1 NFE), MeanFlow as a reference line.

    python scripts/imf_digits_plot.py OUT_DIR OUT.png    (OUT_DIR written by scripts/imf_digits.sh)
Prints the table rows used in docs/RESULTS.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def metrics(path: Path) -> dict:
    """The 1-NFE MeanFlow-sampler entry of an eval JSON."""
    return json.loads(path.read_text())["results"]["meanflow_1nfe"]


def main(out_dir: str, png: str) -> None:
    root = Path(out_dir)
    omegas = [1, 2, 4, 8]
    imf = [metrics(root / f"imf_omega{w}.json") for w in omegas]
    base = metrics(root / "meanflow_1nfe.json")
    for w, m in zip(omegas, imf):
        print(f"| iMF (imf-tiny/2), omega {w} | 1 | {m['class_accuracy']:.3f} | {m['digits_fd']:.1f} |")
    print(f"| MeanFlow (unet-tiny, guidance in the weights) | 1 | {base['class_accuracy']:.3f} | {base['digits_fd']:.1f} |")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key, label in ((axes[0], "digits_fd", "digits FD (lower is better)"), (axes[1], "class_accuracy", "class accuracy")):
        ax.plot(omegas, [m[key] for m in imf], "o-", label="iMF, omega as input")
        ax.axhline(base[key], color="gray", linestyle="--", label="MeanFlow, equal wall-clock and CPU time")
        ax.set_xscale("log", base=2)
        ax.set_xticks(omegas, [str(w) for w in omegas])
        ax.set_xlabel("omega (1 NFE)")
        ax.set_title(label)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
