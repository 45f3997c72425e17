"""The transfer methods a user names with `transfer.method`, each built into a recipe.

A method turns the job's materials (rows by role, encoded; a classifier and encoder
factory; the pretrained backbone; an optimizer factory) into stages of the one
Trainer (etjax.algorithms.recipe.Stage). Its hyperparameters are the defaults of its
gin/algorithms file (`settings_file`), which the caller reads and the user overrides.

    method = METHODS['drss']
    stages = method.build(materials, settings)     # [Stage(...)]
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from etjax.algorithms import feature_based, instance_based, metaft
from etjax.algorithms import metadtl as metadtl_lib
from etjax.algorithms import metakd as metakd_lib
from etjax.algorithms.distill import distill
from etjax.algorithms.distilbert import distilbert
from etjax.algorithms.finetune import finetune, init_params, with_pretrained
from etjax.algorithms.pkd import pkd
from etjax.algorithms.tinybert import tinybert_stages
from etjax.algorithms.recipe import Stage
from etjax.data import streams as streams_lib
from etjax.train import fit as fit_lib
from etjax.train import ruder_plank as ruder_plank_search
from etjax.transfer import search_recipe
from etjax.transfer.roles import Roles

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Materials:
  """What every method builds from.

  Attributes:
    roles: the rows by role.
    encode: list of Examples -> encoded data (dict of arrays [N, ...]).
    make_classifier: () -> a fresh SequenceClassifier (encoder + head over the labels).
    make_encoder: () -> a fresh encoder of the backbone's architecture.
    pretrained_encoder: the backbone's plain encoder params, or None (random init).
    make_tx: (total steps, regexes of pretrained parameter paths) -> the optimizer
      (optimizer.new_params_learning_rate gives the other parameters their own rate).
    steps_for: rows of a stage's training data -> that stage's number of updates
      (train.num_steps, or num_epochs passes over those rows).
    batch_size: rows per update (per stream for multi-stream methods).
    seed: shuffling seed.
    eval_data: evaluation batches of the target model (given to the last stage).
    teacher: (classifier module, params) of transfer.teacher, for distillation.
    vocab_size: the tokenizer's (Ruder & Plank's term distributions).
    workdir: the job's directory (Ruder & Plank keeps its selection there, so a
      resumed run does not search again).
    source_task: MetaDTL's cross-task source (rows with labels in its own label set,
      its number of labels), or None.
  """
  roles: Roles
  encode: Callable[[Sequence[Any]], Arrays]
  make_classifier: Callable[[], Any]
  make_encoder: Callable[[], Any]
  pretrained_encoder: Optional[Mapping[str, Any]]
  make_tx: Callable[[int, Sequence[str]], Any]
  steps_for: Callable[[int], int]
  batch_size: int
  seed: int
  eval_data: Any = None
  teacher: Optional[tuple[Any, Any]] = None
  vocab_size: int = 0
  workdir: Optional[str] = None
  source_task: Optional[tuple[list, int]] = None

  def batches(self, rows: Sequence[Any]) -> Callable[[], Any]:
    """() -> fresh resumable batches of `rows`, encoded when a stage trains (a job
    that only restores, e.g. predict, encodes nothing)."""
    return lambda: fit_lib.train_batches(self.encode(rows), self.batch_size, self.seed)

  def encoder_pretrained(self) -> Optional[dict]:
    """{'encoder': the backbone's params} for a classifier's `pretrained`, or None."""
    return {"encoder": self.pretrained_encoder} if self.pretrained_encoder else None

  def dev_rows(self) -> tuple[list, list]:
    """(target training rows, dev rows): the dev file's rows, or without one a fifth
    of the target rows held out (never the eval file)."""
    target = self.roles.target
    if self.roles.dev:
      return target, self.roles.dev
    held = np.random.default_rng([self.seed, 17]).permutation(len(target))
    cut = max(1, len(target) // 5)
    if len(target) - cut < 1:
      raise ValueError(f"{len(target)} target row(s): too few to hold out dev rows; "
                       "give data.dev_path")
    return ([target[i] for i in sorted(held[cut:])],
            [target[i] for i in sorted(held[:cut])])


@dataclasses.dataclass(frozen=True)
class Method:
  """A transfer method.

  Attributes:
    name: its `transfer.method` value.
    family: 'baseline', 'feature', 'instance', 'meta' or 'distill'.
    summary: one line for `etjax methods`.
    build: (materials, settings) -> the stages.
    settings_file: the gin/algorithms file of its defaults (None: none).
    needs_source: fails without source rows.
    needs_teacher: fails without transfer.teacher.
  """
  name: str
  family: str
  summary: str
  build: Callable[[Materials, dict], list]
  settings_file: Optional[str] = None
  needs_source: bool = False
  needs_teacher: bool = False


ENCODER = (r"^encoder/",)


def _finetune_stage(m: Materials, name: str, rows: Sequence[Any], *,
                    eval_data: Any = None, carry=None) -> Stage:
  steps = m.steps_for(len(rows))
  pretrained = m.encoder_pretrained()
  step = finetune(m.make_classifier(), m.make_tx(steps, ENCODER), pretrained=pretrained)
  return Stage(name, step, steps, m.batches(rows), eval_data, carry)


def _target_only(m: Materials, settings: dict) -> list:
  del settings
  return [_finetune_stage(m, "target", m.roles.target, eval_data=m.eval_data)]


def _source_only(m: Materials, settings: dict) -> list:
  del settings
  return [_finetune_stage(m, "source", m.roles.source, eval_data=m.eval_data)]


def _mixed(m: Materials, settings: dict) -> list:
  del settings
  return [_finetune_stage(m, "mixed", m.roles.source + m.roles.target,
                          eval_data=m.eval_data)]


def _source_then_target(m: Materials, settings: dict) -> list:
  del settings
  return [_finetune_stage(m, "source", m.roles.source),
          _finetune_stage(m, "target", m.roles.target, eval_data=m.eval_data)]


FEATURE = (r"^(shared|private_\d+)/",)


def _feature(method: str) -> Callable[[Materials, dict], list]:
  def build(m: Materials, settings: dict) -> list:
    kwargs = dict(settings)
    kwargs.pop("method", None)
    rows = m.roles.source + m.roles.target
    steps = m.steps_for(len(rows))
    private = method != "fully_shared"
    pretrained = (feature_based.encoders_pretrained(
        m.pretrained_encoder, m.roles.num_domains if private else 0)
                  if m.pretrained_encoder else None)
    step = feature_based.build_feature_step(
        method, m.make_encoder, m.make_tx(steps, FEATURE),
        num_domains=m.roles.num_domains, num_labels=m.make_classifier().num_labels,
        pretrained=pretrained, domain_blocked=private, **kwargs)
    # Private encoders: domain-blocked batches, so each row passes through its own
    # domain's private encoder only (not all K of them).
    if private:
      streams_lib.check_block_size(m.batch_size, m.roles.num_domains, "train.batch_size")
    batches = (m.batches(rows) if not private else
               lambda: streams_lib.domain_blocked_stream(
                   m.encode(rows), m.batch_size, num_domains=m.roles.num_domains,
                   seed=m.seed, batch_size_name="train.batch_size", process_index=0,
                   process_count=1))
    return [Stage(method, step, steps, batches, m.eval_data)]
  return build


SELECTION = (r"^classifier/encoder/",)


def _instance(method: str) -> Callable[[Materials, dict], list]:
  def build(m: Materials, settings: dict) -> list:
    kwargs = dict(settings)
    kwargs.pop("method", None)
    steps = m.steps_for(len(m.roles.source))
    pretrained = ({"classifier": {"encoder": m.pretrained_encoder}}
                  if m.pretrained_encoder else None)
    step = instance_based.build_instance_step(
        method, m.make_classifier(), m.make_tx(steps, SELECTION), pretrained=pretrained,
        **kwargs)
    return [Stage(method, step, steps, lambda: _instance_streams(m), m.eval_data)]
  return build


def _instance_streams(m: Materials):
  """{'source', 'target', 'dev'} batches: the dev rows give the selector's reward."""
  target, dev = m.dev_rows()
  streams = {"source": m.encode(m.roles.source), "target": m.encode(target),
             "dev": m.encode(dev)}
  sizes = {"source": m.batch_size, "target": m.batch_size,
           "dev": min(m.batch_size, len(dev))}
  return fit_lib.train_batches(streams, sizes, m.seed)


META = (r"^model/encoder/",)


def _carry_meta_model(previous, fresh):
  """The fine-tuning stage starts from the meta-learner's classifier ('model')."""
  model = jax.tree.map(lambda x: np.array(x, copy=True),
                       jax.device_get(nn.meta.unbox(previous.params)["model"]))
  return fresh.replace(params=with_pretrained(fresh.params, model))


def _metaft(m: Materials, settings: dict) -> list:
  kwargs = dict(settings)
  kwargs["num_domains"] = m.roles.num_domains  # derived, never typed by the user
  rows = m.roles.source + m.roles.target
  steps = m.steps_for(len(rows))
  pretrained = m.encoder_pretrained()
  meta = metaft.metaft(m.make_classifier(), m.make_tx(steps, META),
                       pretrained=pretrained, **kwargs)
  return [Stage("meta", meta, steps, m.batches(rows)),
          _finetune_stage(m, "target", m.roles.target, eval_data=m.eval_data,
                          carry=_carry_meta_model)]


SELECTION_FILE = "ruder_plank_selection.json"


def _selected_source_rows(m: Materials, settings: dict) -> list:
  """The source rows Ruder & Plank's search chooses (each trial a fresh target model
  trained through the Trainer and scored on the dev rows); the choice is written to
  the workdir once and read back by a resumed run."""
  path = os.path.join(m.workdir, SELECTION_FILE) if m.workdir else None
  if path and os.path.exists(path):
    with open(path) as f:
      chosen = json.load(f)["selected"]
  else:
    kwargs = dict(settings)
    wanted = kwargs.pop("num_selected")
    target, dev = m.dev_rows()
    trial_steps = kwargs.pop("train_steps")
    pretrained = m.encoder_pretrained()
    trial = finetune(m.make_classifier(), m.make_tx(trial_steps, ENCODER),
                     pretrained=pretrained)
    search = ruder_plank_search.search(
        m.encode(m.roles.source), m.encode(target), m.encode(dev), step=trial,
        vocab_size=m.vocab_size, num_selected=wanted, train_steps=trial_steps,
        seed=m.seed, **kwargs)
    chosen = sorted(int(i) for i in search.selected)
    if path:
      os.makedirs(m.workdir, exist_ok=True)
      with open(path + ".tmp", "w") as f:
        json.dump({"selected": chosen, "dev_value": float(search.value)}, f)
      os.replace(path + ".tmp", path)
  return [m.roles.source[i] for i in chosen]


def _ruder_plank(m: Materials, settings: dict) -> list:
  wanted, available = settings["num_selected"], len(m.roles.source)
  if available and not 0 < wanted <= available:  # (no rows: a restore, e.g. predict)
    raise ValueError(f"ruder_plank: num_selected = {wanted} for {available} source "
                     "rows; set transfer.method_args={'num_selected': N} with N in "
                     f"1..{available}")
  steps = m.steps_for(len(m.roles.target) + settings["num_selected"])
  pretrained = m.encoder_pretrained()
  step = finetune(m.make_classifier(), m.make_tx(steps, ENCODER), pretrained=pretrained)
  data = lambda: fit_lib.train_batches(
      m.encode(m.roles.target + _selected_source_rows(m, settings)), m.batch_size,
      m.seed)
  return [Stage("ruder_plank", step, steps, data, m.eval_data)]


STUDENT = (r"^student/encoder/",)


def _distillation(kind: str) -> Callable[[Materials, dict], list]:
  """KD, PKD or DistilBERT from transfer.teacher into the student
  (classifier.model / classifier.pretrained; DistilBERT derives its student from the
  teacher), on every training row (the transfer set)."""
  def build(m: Materials, settings: dict) -> list:
    rows = m.roles.source + m.roles.target
    steps = m.steps_for(len(rows))
    tx = m.make_tx(steps, STUDENT)
    student = m.make_classifier()
    if kind == "kd":
      step = distill(student, m.teacher, tx, pretrained=m.encoder_pretrained(),
                     **settings)
    elif kind == "pkd":
      step = pkd(student, m.teacher, tx, **settings)
    else:
      _, step = distilbert(m.teacher, tx, **settings)
    return [Stage(kind, step, steps, m.batches(rows), m.eval_data)]
  return build


def _tinybert(m: Materials, settings: dict) -> list:
  """TinyBERT as a recipe on every training row: stage 'intermediate' (embedding,
  hidden-state and attention MSE; intermediate_steps updates, None: as many as the
  next stage, 0: none), then stage 'prediction' (soft logits) starting from the
  student it leaves (carry_params; its projections stay behind)."""
  kwargs = dict(settings)
  first = kwargs.pop("intermediate_steps")
  rows = m.roles.source + m.roles.target
  steps = m.steps_for(len(rows))
  first = steps if first is None else first
  if first < 0:
    raise ValueError(f"tinybert: intermediate_steps = {first}; give a count >= 0 (or "
                     "None: as many as the prediction stage)")
  student, pretrained = m.make_classifier(), m.encoder_pretrained()
  step = tinybert_stages(student, m.teacher, m.make_tx(max(first, 1), STUDENT),
                         m.make_tx(steps, STUDENT),
                         student_init=lambda rng, batch: init_params(student, rng, batch,
                                                                     pretrained),
                         **kwargs)
  prediction = Stage("prediction", step["prediction"], steps, m.batches(rows),
                     m.eval_data)
  if not first:
    return [prediction]
  return [Stage("intermediate", step["intermediate"], first, m.batches(rows)),
          prediction]


def _metadtl(m: Materials, settings: dict) -> list:
  """MetaDTL across tasks: a meta-learner over the source task's and the target's
  label sets (one head over both, 'domain' = task id), then the target's head cut out
  (metadtl.task_params) and fine-tuned on the target rows."""
  if m.source_task is None:
    raise ValueError("transfer.method = 'metadtl' needs data.source_task_path: a file "
                     "of another task (its own label column and label set)")
  source_rows, source_labels = m.source_task
  target_labels = m.make_classifier().num_labels
  num_labels = (source_labels, target_labels)
  kwargs = dict(settings, num_labels=num_labels)  # derived from the two files
  rows = _task_rows(source_rows, m.roles.target)
  steps = m.steps_for(len(rows))
  meta_model = m.make_classifier().clone(num_labels=source_labels + target_labels)
  pretrained = m.encoder_pretrained()
  meta = metadtl_lib.metadtl(meta_model, m.make_tx(steps, META), pretrained=pretrained,
                             **kwargs)

  def carry(previous, fresh):
    head = metadtl_lib.task_params(previous.params["model"], num_labels, task=1)
    return fresh.replace(params=with_pretrained(fresh.params, head))
  return [Stage("meta", meta, steps, m.batches(rows)),
          _finetune_stage(m, "target", m.roles.target, eval_data=m.eval_data,
                          carry=carry)]


def _task_rows(source: Sequence[Any], target: Sequence[Any]) -> list:
  """Both tasks' rows, 'domain' = task (0 source, 1 target; labels stay within their
  task); the target's rows repeated to the source's count, so the meta-learner's
  batches hold both tasks."""
  repeat = max(1, round(len(source) / max(len(target), 1)))
  as_task = lambda ex, task: dataclasses.replace(ex, domain=task)
  return [as_task(ex, 0) for ex in source] + [as_task(ex, 1) for ex in target] * repeat


def _metakd(m: Materials, settings: dict) -> list:
  """MetaKD: stage 1 trains the meta-teacher (MetaFT's meta-learner) from
  transfer.teacher on every domain; stage 2 distils it into the student, each row
  weighted by the teacher's domain expertise (prototypes of its features)."""
  teacher_model, teacher_params = m.teacher
  rows = m.roles.source + m.roles.target
  steps = m.steps_for(len(rows))
  k = m.roles.num_domains
  meta = metakd_lib.meta_teacher(
      teacher_model, m.make_tx(steps, META), pretrained=teacher_params,
      **dict(settings["meta_teacher"], num_domains=k))  # K: derived from the data
  classes, width = teacher_model.num_labels, teacher_model.encoder.config.hidden_size
  student = metakd_lib.metakd(
      m.make_classifier(), m.teacher, m.make_tx(steps, STUDENT),
      prototypes=(np.zeros((k, classes, width), np.float32),
                  np.zeros((k, classes), np.float32)),
      pretrained=m.encoder_pretrained(), **settings["metakd"])

  def carry(previous, fresh):
    """The student's stage starts with the meta-teacher and its prototypes."""
    teacher = jax.device_get(nn.meta.unbox(previous.params["model"]))
    protos, counts = metakd_lib.teacher_prototypes(
        teacher_model, teacher, fit_lib.eval_batches(m.encode(rows))(), num_domains=k)
    return fresh.replace(teacher_params=with_pretrained(fresh.teacher_params, teacher),
                         prototypes_kcd=jnp.asarray(protos),
                         counts_kc=jnp.asarray(counts))
  return [Stage("meta_teacher", meta, steps, m.batches(rows)),
          Stage("student", student, steps, m.batches(rows), m.eval_data, carry)]


def _methods() -> dict[str, Method]:
  feature = {"fs": ("fully_shared", "FullyShared: one encoder and head on source and "
                    "target rows"),
             "sp": ("shared_private", "SharedPrivate: shared and per-domain private "
                    "encoders, orthogonality loss"),
             "sp_adv": ("shared_private_adv", "SharedPrivate plus a domain adversary "
                        "(gradient reversal)"),
             "drss": ("drss", "DRSS: per-domain heads tied by a learned domain "
                      "covariance"),
             "drss_adv": ("drss_adv", "DRSS plus the domain adversary")}
  methods = [
      Method("target_only", "baseline", "fine-tune on the target rows only",
             _target_only),
      Method("source_only", "baseline", "fine-tune on the source rows only",
             _source_only, needs_source=True),
      Method("mixed", "baseline", "fine-tune on source and target rows together",
             _mixed, needs_source=True),
      Method("finetune", "baseline", "fine-tune on the source rows, then on the target",
             _source_then_target, needs_source=True),
      *(Method(name, "feature", summary, _feature(file), settings_file=file,
               needs_source=True) for name, (file, summary) in feature.items()),
      Method("rtl", "instance", "reinforced selection of source rows by dev reward",
             _instance("rtl"), settings_file="rtl", needs_source=True),
      Method("mgtl", "instance", "RTL plus a source/target discriminator's rewards",
             _instance("mgtl"), settings_file="mgtl", needs_source=True),
      Method("ruder_plank", "instance", "target rows plus the source rows chosen by "
             "Bayesian-optimised similarity weights (scored on dev)", _ruder_plank,
             settings_file="ruder_plank", needs_source=True),
      Method("metaft", "meta", "meta-learner over every domain (typicality weights), "
             "then fine-tune on the target", _metaft, settings_file="metaft"),
      Method("metadtl", "meta", "meta-learner across tasks with different label "
             "sets (data.source_task_path), then fine-tune on the target", _metadtl,
             settings_file="metadtl"),
      Method("kd", "distill", "Hinton distillation of transfer.teacher into the "
             "student", _distillation("kd"), settings_file="kd", needs_teacher=True),
      Method("pkd", "distill", "BERT-PKD: patient distillation from the teacher's "
             "intermediate layers", _distillation("pkd"), settings_file="pkd_skip",
             needs_teacher=True),
      Method("distilbert", "distill", "DistilBERT: a half-depth student from every "
             "other teacher layer", _distillation("distilbert"),
             settings_file="distilbert", needs_teacher=True),
      Method("tinybert", "distill", "TinyBERT: intermediate-layer, then prediction-layer "
             "distillation (two stages)", _tinybert, settings_file="tinybert",
             needs_teacher=True),
      Method("metakd", "distill", "MetaKD: a meta-teacher from transfer.teacher over "
             "every domain, then distillation weighted by its domain expertise",
             _metakd, settings_file="metakd", needs_teacher=True),
      Method("adabert", "distill", "AdaBERT: a differentiable search of a small "
             "convolutional student's cells distilled from transfer.teacher, then the "
             "chosen cells retrained (two stages)", search_recipe.build,
             settings_file="adabert", needs_teacher=True),
  ]
  return {m.name: m for m in methods}


METHODS: dict[str, Method] = _methods()


def get(name: str) -> Method:
  """The method of `transfer.method`; an unknown name fails listing them."""
  if name not in METHODS:
    raise ValueError(f"transfer.method = {name!r}: unknown; the methods are "
                     f"{', '.join(METHODS)} (etjax methods lists them)")
  return METHODS[name]


def check_roles(method: Method, roles: Roles) -> None:
  """A method that needs source rows fails saying so when there are none."""
  if method.needs_source and not roles.source:
    targets = [roles.domain_names[i] for i in roles.target_ids] if roles.domain_names \
        else []
    raise ValueError(f"transfer.method = {method.name!r} needs source rows, but every "
                     f"training row is of a target domain {targets}: name fewer "
                     "data.target_domains, or use 'target_only'")

