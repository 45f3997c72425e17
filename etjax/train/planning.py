"""Ahead-of-time memory plans of named ModelZoo models (what `etjax plan` prints).

A `PlanSpec` names a model, a mesh, a rules preset, a global batch, precision, remat
and optimizer; `plan_model` builds the model's real train step (an encoder trains a
sentence classifier, an encoder-decoder trains token cross-entropy) and hands it to
etjax.sharding.plan, which compiles it from abstract shapes only.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from etjax import models
from etjax.algorithms import optim
from etjax.algorithms.finetune import finetune
from etjax.algorithms.seq2seq import seq2seq
from etjax.models.config import EncoderConfig
from etjax.sharding import mesh as mesh_lib
from etjax.sharding import plan as plan_lib
from etjax.sharding import rules as rules_lib


@dataclasses.dataclass(frozen=True)
class PlanSpec:
  """One plan: a model, a mesh and rules, a global batch, precision, remat, optimizer.

  target_length is the decoder length of encoder-decoders; pipeline is (stages,
  microbatches) over the mesh's `stage` axis.
  """
  model: str
  mesh: str
  rules: str
  batch: int
  length: int
  target_length: int = 0
  dtype: str = "bfloat16"
  remat: str = "full"
  optimizer: str = "adamw"
  device_memory_gib: float = 80.0
  pipeline: tuple[int, int] = (1, 1)

  def __post_init__(self):
    # Every value is checked here, naming the flag, so a bad one fails before jax runs.
    for name in ("batch", "length"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
    if self.target_length < 0:
      raise ValueError(f"--target_length must be >= 0, got {self.target_length}")
    if self.device_memory_gib is not None and not self.device_memory_gib > 0:
      raise ValueError("--device_memory_gib must be positive, got "
                       f"{self.device_memory_gib}")
    if len(self.pipeline) != 2 or min(self.pipeline) < 1:
      raise ValueError(f"--pipeline must be STAGESxMICROBATCHES with both >= 1, got "
                       f"{self.pipeline}")
    for axis, size in mesh_lib.parse_mesh_spec(self.mesh).items():
      if size < 1:
        raise ValueError(f"--mesh {self.mesh!r}: axis {axis!r} has size {size}; a plan "
                         "needs every axis size >= 1")

  @property
  def num_devices(self) -> int:
    return math.prod(mesh_lib.parse_mesh_spec(self.mesh).values())


def parse_pipeline(text: str) -> tuple[int, int]:
  """'STAGESxMICROBATCHES' (e.g. '4x8') as (stages, microbatches)."""
  parts = text.lower().split("x")
  try:
    stages, micro = (int(p) for p in parts)
  except ValueError:
    raise ValueError(f"--pipeline {text!r}: expected STAGESxMICROBATCHES, e.g. 4x8"
                     ) from None
  return stages, micro


def train_step_and_batch(spec: PlanSpec):
  """(TrainStep, abstract global batch of ShapeDtypeStructs) of `spec`'s model."""
  config = models.get_config(spec.model, dtype=spec.dtype, remat_policy=spec.remat,
                             pipeline_stages=spec.pipeline[0],
                             pipeline_microbatches=spec.pipeline[1])
  tx = optim.make_optimizer(spec.optimizer, learning_rate=1e-4, total_steps=1000)
  ids = jax.ShapeDtypeStruct((spec.batch, spec.length), jnp.int32)
  if isinstance(config, EncoderConfig):
    model = models.SequenceClassifier(models.module_for(config), num_labels=2)
    batch = {"input_ids": ids, "attention_mask": ids, "token_type_ids": ids,
             "labels": jax.ShapeDtypeStruct((spec.batch,), jnp.int32)}
    return finetune(model, tx), batch
  if not spec.target_length:
    raise ValueError(f"plan for {spec.model}: an encoder-decoder needs target_length")
  targets = jax.ShapeDtypeStruct((spec.batch, spec.target_length), jnp.int32)
  batch = {"input_ids": ids, "attention_mask": ids, "decoder_input_ids": targets,
           "targets": targets}
  return seq2seq(models.module_for(config), tx), batch


def plan_model(spec: PlanSpec) -> plan_lib.MemoryPlan:
  """Compiles `spec`'s train step from shapes on the first num_devices devices (fake
  CPU devices: see etjax.sharding.fake_devices) and returns its memory plan."""
  if spec.num_devices > jax.device_count():
    raise ValueError(f"mesh {spec.mesh} needs {spec.num_devices} devices, "
                     f"{jax.device_count()} exist (run under ensure_fake_devices)")
  step, batch = train_step_and_batch(spec)
  mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec(spec.mesh),
                            devices=jax.devices()[:spec.num_devices])
  return plan_lib.plan(step, batch, mesh, rules_lib.get_rules(spec.rules),
                       device_memory_gib=spec.device_memory_gib)
