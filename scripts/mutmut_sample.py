"""Print a seeded random sample of mutmut's mutant names, to estimate a module's mutation score quickly.

    mutmut run --max-children 1 $(python scripts/mutmut_sample.py meanflow.autodiff 200 --seed 0)

The names come from ``mutmut results --all true`` (run ``mutmut run`` once, or any run, so that the
mutants exist). Each module prefix is sampled separately, in proportion to its number of mutants;
the same seed gives the same sample.
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys


def mutant_names() -> list[str]:
    """Every mutant name mutmut knows, sorted."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    return sorted(line.strip().split(": ")[0] for line in out.splitlines() if "__mutmut_" in line)


def sample(names: list[str], prefixes: list[str], size: int, seed: int) -> list[str]:
    """``size`` names starting with one of ``prefixes``, spread over the modules in proportion to their mutants."""
    by_module: dict[str, list[str]] = {}
    for name in names:
        if any(name.startswith(p) for p in prefixes):
            by_module.setdefault(name.split(".x")[0], []).append(name)
    total = sum(len(v) for v in by_module.values())
    if not total:
        raise SystemExit(f"no mutant starts with {', '.join(prefixes)}; run `mutmut run` first so that the mutants exist")
    rng = random.Random(seed)
    return [n for module in sorted(by_module) for n in rng.sample(by_module[module], round(size * len(by_module[module]) / total))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="+", help="module prefixes, e.g. meanflow.autodiff meanflow.training.trainer")
    parser.add_argument("size", type=int, help="number of mutants to draw in all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(" ".join(sample(mutant_names(), args.prefixes, args.size, args.seed)))


if __name__ == "__main__":
    main()
