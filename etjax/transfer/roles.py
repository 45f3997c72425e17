"""Roles of a user's rows in a transfer job: source domains, target domains, dev, eval.

`data.target_domains` names the domain values that are the target; every other domain
of the training file is a source. The domain and label vocabularies are the training
file's (fixed once, reused for dev, eval and predict), so a domain id means the same
thing in every file of the job.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from etjax.data import readers

Example = readers.Example


@dataclasses.dataclass(frozen=True)
class Roles:
  """The rows of a transfer job by role (lists of etjax.data.Example).

  Attributes:
    source: training rows of the source domains (empty when every domain is a target).
    target: training rows of the target domains.
    dev: target rows for model choices and keep-best (None without a dev file).
    eval: the eval file's rows (target rows).
    domain_names: the training file's domains; Example.domain indexes them.
    target_ids: ids of the target domains, sorted.
    source_task_labels: the label count of MetaDTL's cross-task source (0: none).
  """
  source: list
  target: list
  dev: Optional[list]
  eval: list
  domain_names: tuple[str, ...]
  target_ids: tuple[int, ...]
  source_task_labels: int = 0  # MetaDTL's cross-task source label count (0: none)

  @property
  def num_domains(self) -> int:
    return max(len(self.domain_names), 1)

  @property
  def source_ids(self) -> tuple[int, ...]:
    return tuple(i for i in range(len(self.domain_names)) if i not in self.target_ids)


def target_ids_of(domain_names: Sequence[str], target_domains: Optional[Sequence[str]],
                  where: str) -> tuple[int, ...]:
  """Ids of `target_domains` in the training file's domains.

  Args:
    domain_names: the training file's domain vocabulary.
    target_domains: domain values (None or empty: every row is a target row).
    where: the training file, for messages.

  Raises:
    ValueError: a name that is not a domain of the file, or domains asked of a file
      without a domain column.
  """
  if not target_domains:
    return tuple(range(len(domain_names))) or (0,)
  if isinstance(target_domains, str):
    raise ValueError(f"data.target_domains = {target_domains!r}: give a list of domain "
                     f"values, e.g. ['{target_domains}']")
  if not domain_names:
    raise ValueError(f"data.target_domains = {list(target_domains)} but {where} has no "
                     "domain column: set data.domain to the column holding each row's "
                     "domain")
  missing = [d for d in target_domains if d not in domain_names]
  if missing:
    raise ValueError(f"data.target_domains: {missing} not among the domains of {where}: "
                     f"{list(domain_names)}")
  return tuple(sorted(domain_names.index(d) for d in dict.fromkeys(target_domains)))


def assign(train: Sequence[Example], evaluation: Sequence[Example],
           dev: Optional[Sequence[Example]], *, domain_names: Sequence[str],
           target_domains: Optional[Sequence[str]], where: str = "the training file"
           ) -> Roles:
  """Splits the training rows into source and target rows by domain."""
  targets = target_ids_of(tuple(domain_names), target_domains, where)
  is_target = np.isin([ex.domain for ex in train], targets)
  target = [ex for ex, t in zip(train, is_target) if t]
  if not target:
    raise ValueError(f"{where} has no rows of the target domains "
                     f"{[domain_names[i] for i in targets] if domain_names else []}")
  return Roles(source=[ex for ex, t in zip(train, is_target) if not t], target=target,
               dev=list(dev) if dev is not None else None, eval=list(evaluation),
               domain_names=tuple(domain_names), target_ids=targets)


def saved(domain_names: Sequence[str], target_ids: Sequence[int]) -> Roles:
  """The roles of a trained job without its rows (predict, export): its domains and
  target domains, as roles.json holds them."""
  return Roles(source=[], target=[], dev=None, eval=[], domain_names=tuple(domain_names),
               target_ids=tuple(target_ids))


def as_json(roles: Roles, method: str, domain_column: Optional[str]) -> dict:
  """What roles.json holds."""
  return {"method": method, "domains": list(roles.domain_names),
          "target_domains": [roles.domain_names[i] for i in roles.target_ids]
                            if roles.domain_names else [],
          "domain_column": domain_column,
          "source_task_labels": roles.source_task_labels}


def from_json(spec: dict, where: str) -> Roles:
  """The Roles of roles.json (`as_json`)."""
  domains = tuple(spec.get("domains") or ())
  ids = target_ids_of(domains, spec.get("target_domains") or None, where)
  return dataclasses.replace(saved(domains, ids),
                             source_task_labels=int(spec.get("source_task_labels", 0)))


def with_domains(examples: Sequence[Example], inputs, spec: dict, roles: Roles,
                 where: str) -> list:
  """Prediction rows with their domain ids: from the input's domain column when it
  has the trained one (`spec['domain_column']`), else the (first) target domain.

  Args:
    examples: the input's non-blank rows (etjax.train.predict_io.Inputs.examples()).
    inputs: the Inputs (their carried columns).
    spec: roles.json.
    roles: its Roles.
    where: the input file, for messages.
  """
  column = spec.get("domain_column")
  default = roles.target_ids[0]
  if not column or column not in inputs.carried_names:
    return [dataclasses.replace(ex, domain=default) for ex in examples]
  index = inputs.carried_names.index(column)
  values = [c[index] for t, c in zip(inputs.texts, inputs.carried) if t is not None]
  out = []
  for ex, value, line in zip(examples, values,
                             [n for t, n in zip(inputs.texts, inputs.lines) if t]):
    if value not in roles.domain_names:
      raise ValueError(f"{where}:{line}: column {column!r}: unknown domain {value!r}; "
                       f"the trained domains are {list(roles.domain_names)}")
    out.append(dataclasses.replace(ex, domain=roles.domain_names.index(value)))
  return out
