"""All of the paper's transfer-learning tables (synthetic and Debian data), for RESULTS.md.

    python benchmarks/tl_tables.py                  # Tables 8-12, seeds 0 1 2
    python benchmarks/tl_tables.py --tables 8 11 --seeds 0
    python benchmarks/tl_tables.py --tables 12 12debian   # Table 12 on both data

Each table is an experiment of etjax.experiments, the same function that
`etjax run --gin_file=gin/runs/<table>.gin` runs; this script only calls them in turn
with the same defaults and each method's settings of gin/algorithms/*.gin, and prints
their markdown with the wall time of each.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

from etjax import main as etjax_main
from etjax.experiments import tl_distill, tl_feature_instance, tl_meta

TABLES = {
    "8": ("Table 8 (feature-based)", tl_feature_instance.run_table8),
    "9": ("Table 9 (instance-based)", tl_feature_instance.run_table9),
    "10": ("Table 10 (teachers, TinyBERT)", tl_distill.run_table10),
    "adabert": ("AdaBERT (searched student vs teacher)", tl_distill.run_adabert),
    "10meta": ("Table 10 (meta-teacher, MetaKD)", tl_meta.run_table10),
    "11": ("Table 11 (MetaFT)", tl_meta.run_table11),
    "12": ("Table 12 (MetaDTL, synthetic)", tl_meta.run_table12),
    "12debian": ("Table 12 (MetaDTL, Debian use -> network)",
                 functools.partial(tl_meta.run_table12, data="debian")),
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  args = parser.parse_args(argv)
  # Each method's settings, as `etjax run` passes them (gin/algorithms/*.gin).
  settings = etjax_main.algorithm_settings()
  for key in args.tables:
    title, run = TABLES[key]
    start = time.time()
    print(f"## {title}\n\n{run(settings=settings, seeds=tuple(args.seeds))}\n\n"
          f"({time.time() - start:.0f} s)\n", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
