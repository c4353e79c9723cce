"""Coverage of `hf-cpt cmr fit`'s 90 % interval on synthetic pilot families (issue 32, item 2).

For each family of tests/mixers/test_cmr_select.py (`power`: the surfaces' own law; `saturating`: the general loss
levels off; `turning`: a re-warm jump, then the general loss turns back down under replay), 20 seeded pilot sets
(constant-LR pilots of 4..40 updates at shares 0..1, noise 0.003) are fitted, the estimator chosen by data, and
the interval for a budget 10x past the pilots compared with the true CMR. Prints coverage per family and the
verdict against the goal (>= 85 % on each family).

    python bench/cmr_coverage.py [--seeds 20] [--bootstrap 10]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.mixers.test_cmr_select import FAMILIES, interval_hits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--bootstrap", type=int, default=10)
    a = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    worst = 1.0
    for name, general in sorted(FAMILIES.items()):
        start = time.perf_counter()
        hits = interval_hits(general, range(a.seeds), bootstrap=a.bootstrap)
        worst = min(worst, hits / a.seeds)
        print(f"{name:>10}: {hits}/{a.seeds} intervals hold the true CMR ({hits / a.seeds:.0%}), "
              f"{time.perf_counter() - start:.0f} s")
    print(f"verdict: coverage >= 85 % on each family: {'met' if worst >= 0.85 else 'missed'} (worst {worst:.0%})")


if __name__ == "__main__":
    main()
