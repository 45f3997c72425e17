"""Ahead-of-time memory plans of real train steps on fake devices (no parameters allocated).

    python benchmarks/plans.py                  # the table for benchmarks/RESULTS.md
    python benchmarks/plans.py --only t5-11b --json

Each row compiles one model's full train step (forward, backward, optimizer update)
from abstract shapes on a mesh of fake CPU devices with etjax.sharding.plan and prints
XLA's per-device memory figures. The process re-executes itself with as many fake
devices as the largest mesh needs. Encoders (BERT, ALBERT) train a sentence classifier
with AdamW; T5 trains sequence-to-sequence cross-entropy with Adafactor, as T5 was
trained. Figures come from XLA's CPU compiler partitioning for the same mesh; GPU/TPU
temporaries differ somewhat.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional

from etjax.sharding import fake_devices
from etjax.train.planning import PlanSpec


SPECS = (
    # The paper's T5-11B (Whale: hybrid data + model parallelism): fsdp x tensor
    # parallelism on 64 devices, two data-parallel replicas.
    PlanSpec("t5-11b", "data=2,fsdp=4,model=8", "2d", batch=128, length=512,
             target_length=128, optimizer="adafactor"),
    # The same with pipeline parallelism (GPipe, 2 stages x 8 microbatches) in place of
    # one data-parallel replica: Whale's data + model + pipeline hybrid.
    PlanSpec("t5-11b", "fsdp=4,stage=2,model=8", "3d", batch=128, length=512,
             target_length=128, optimizer="adafactor", pipeline=(2, 8)),
    # ALBERT-xxlarge and BERT-large with data parallelism on 8 devices.
    PlanSpec("albert-xxlarge", "data=8", "dp", batch=64, length=512),
    PlanSpec("bert-large", "data=8", "dp", batch=256, length=512),
)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", action="append", default=None, help="model name(s)")
  parser.add_argument("--json", action="store_true", help="one JSON object per line")
  args = parser.parse_args(argv)
  specs = [s for s in SPECS if not args.only or s.model in args.only]
  if not specs:
    parser.error(f"no plan for {args.only}; known: {[s.model for s in SPECS]}")
  fake_devices.ensure_fake_devices(max(s.num_devices for s in specs))
  # pylint: disable=g-import-not-at-top
  from etjax.models.pipeline import bubble_fraction
  from etjax.sharding.plan import human_bytes
  from etjax.train.planning import plan_model
  if not args.json:
    print("| model | mesh | rules | pipeline (stages x microbatches, bubble) "
          "| batch x length | dtype / remat / optimizer | params | params/dev | opt/dev "
          "| grads/dev (est.) | temp/dev | peak/dev | fits 80 GiB | compile s |")
    print("|" + "---|" * 14)
  for spec in specs:
    result = plan_model(spec)
    if args.json:
      print(json.dumps({"spec": dataclasses.asdict(spec), "plan": result.to_dict()}))
    else:
      length = (f"{spec.length}" if not spec.target_length
                else f"{spec.length}+{spec.target_length}")
      stages, micro = spec.pipeline
      pipe = ("none" if stages == 1 else
              f"{stages} x {micro}, {bubble_fraction(stages, micro):.0%}")
      print(f"| {spec.model} | {spec.mesh} | {spec.rules} | {pipe} | {spec.batch} x {length} | "
            f"{spec.dtype} / {spec.remat} / {spec.optimizer} | "
            f"{result.parameter_count / 1e9:.2f} B | "
            f"{human_bytes(result.parameter_bytes)} | {human_bytes(result.optimizer_bytes)} | "
            f"{human_bytes(result.gradient_bytes)} | {human_bytes(result.temporary_bytes)} | "
            f"{human_bytes(result.peak_bytes)} | {'yes' if result.fits else 'NO'} | "
            f"{result.compile_seconds:.0f} |")
    sys.stdout.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main())
