"""tl_distill: the methods' settings come from gin/algorithms (with a run file's
overrides), and a student trained through the Trainer learns from the teacher swapped
into its state, without consuming the teacher's own parameters."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from etjax import main
from etjax.algorithms.step import unbox
from etjax.experiments import tl_distill as td


def test_method_settings_are_the_gin_files_with_overrides():
  settings = main.algorithm_settings()
  got = td.method_settings(settings, "adabert", "adabert_search",
                           {"adabert_search": {"beta": 0.0}, "tinybert": {"x": 1}})
  assert got == {**settings["adabert"]["adabert_search"], "beta": 0.0}
  assert td.method_settings(settings, "tinybert", "tinybert") == (
      settings["tinybert"]["tinybert"])
  with pytest.raises(ValueError, match=r"no tinybert\.\* bindings of "
                                       r"gin/algorithms/tinybert\.gin"):
    td.method_settings({}, "tinybert", "tinybert")


@pytest.mark.slow
def test_student_trains_under_the_swapped_in_teacher():
  data, _ = td.encoded_domains(0, train_size=40, test_size=40)
  train, test = data["books"]["train"], data["books"]["test"]
  teacher = td.train(td.teacher_step(3)[1], train, 3, seed=0)
  teacher_params = unbox(teacher[1].params)
  before = jax.device_get(teacher_params)
  student = td.train(td.tinybert_step(main.algorithm_settings(), None, 2), train, 2,
                     seed=0, teacher_params=teacher_params)
  # The student's frozen teacher is the trained one (not the zero placeholder) ...
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(
      unbox(student[1].teacher_params)), before)
  assert any(np.abs(x).sum() > 0 for x in jax.tree.leaves(before))
  # ... and the teacher's own arrays are still readable after the student's donated
  # updates (with_teacher copies them; here jax did not alias them either way, so this
  # guards against a device_put that would).
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(teacher_params), before)
  assert 0.0 <= td.accuracy(teacher, test) <= 100.0
  assert int(student[1].step) == 2
