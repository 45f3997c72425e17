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


@dataclasses.dataclass(frozen=True)
class PlanSpec:
  """One row: a model, a mesh and rules, a global batch, precision and remat."""
  model: str
  mesh: str
  rules: str
  batch: int
  length: int
  target_length: int = 0   # decoder length for encoder-decoders
  dtype: str = "bfloat16"
  remat: str = "full"
  optimizer: str = "adamw"
  device_memory_gib: float = 80.0
  pipeline: tuple[int, int] = (1, 1)   # (stages, microbatches)


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


def _num_devices(mesh_spec: str) -> int:
  from etjax.sharding.mesh import parse_mesh_spec  # pylint: disable=g-import-not-at-top
  total = 1
  for size in parse_mesh_spec(mesh_spec).values():
    total *= size
  return total


def _train_step_and_batch(spec: PlanSpec):
  """The model's TrainStep and abstract global batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import optax
  from etjax.algorithms import optim
  from etjax.algorithms.finetune import finetune
  from etjax.algorithms.step import TrainState, TrainStep, apply_gradients, next_rng
  from etjax.models import zoo
  from etjax.models.config import EncoderConfig
  from etjax.models.heads import SequenceClassifier

  config = zoo.get_config(spec.model, dtype=spec.dtype, remat_policy=spec.remat,
                          pipeline_stages=spec.pipeline[0],
                          pipeline_microbatches=spec.pipeline[1])
  tx = optim.make_optimizer(spec.optimizer, learning_rate=1e-4, total_steps=1000)
  ids = jax.ShapeDtypeStruct((spec.batch, spec.length), jnp.int32)
  if isinstance(config, EncoderConfig):
    model = SequenceClassifier(zoo.module_for(config), num_labels=2)
    batch = {"input_ids": ids, "attention_mask": ids, "token_type_ids": ids,
             "labels": jax.ShapeDtypeStruct((spec.batch,), jnp.int32)}
    return finetune(model, tx), batch

  model = zoo.module_for(config)
  targets = jax.ShapeDtypeStruct((spec.batch, spec.target_length), jnp.int32)
  batch = {"input_ids": ids, "attention_mask": ids, "decoder_input_ids": targets,
           "targets": targets}

  def init(rng, batch):
    params = model.init(rng, batch["input_ids"], batch["attention_mask"],
                        batch["decoder_input_ids"])["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=rng)

  def update(state, batch):
    step_rng, rng = next_rng(state)

    def loss_fn(params):
      out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                        batch["decoder_input_ids"], deterministic=False,
                        rngs={"dropout": step_rng})
      return optax.softmax_cross_entropy_with_integer_labels(
          out.logits.astype(jnp.float32), batch["targets"]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return apply_gradients(state, grads, tx, rng=rng), {"loss": loss}
  return TrainStep(init=init, update=update), batch


def run(spec: PlanSpec):
  """Plans one row; returns the MemoryPlan."""
  import jax  # pylint: disable=g-import-not-at-top
  from etjax.sharding import mesh as mesh_lib, plan, rules
  step, batch = _train_step_and_batch(spec)
  n = _num_devices(spec.mesh)
  mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec(spec.mesh), devices=jax.devices()[:n])
  return plan.plan(step, batch, mesh, rules.get_rules(spec.rules),
                   device_memory_gib=spec.device_memory_gib)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", action="append", default=None, help="model name(s)")
  parser.add_argument("--json", action="store_true", help="one JSON object per line")
  args = parser.parse_args(argv)
  specs = [s for s in SPECS if not args.only or s.model in args.only]
  if not specs:
    parser.error(f"no plan for {args.only}; known: {[s.model for s in SPECS]}")
  fake_devices.ensure_fake_devices(max(_num_devices(s.mesh) for s in specs))
  # pylint: disable=g-import-not-at-top
  from etjax.sharding.pipeline import bubble_fraction
  from etjax.sharding.plan import human_bytes
  if not args.json:
    print("| model | mesh | rules | pipeline (stages x microbatches, bubble) "
          "| batch x length | dtype / remat / optimizer | params | params/dev | opt/dev "
          "| grads/dev (est.) | temp/dev | peak/dev | fits 80 GiB | compile s |")
    print("|" + "---|" * 14)
  for spec in specs:
    result = run(spec)
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
