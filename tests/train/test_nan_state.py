"""The NaN stop checks what is saved (issue 16, defect 4): the loss of an update is
computed on the weights before it, a checkpoint stores the weights after it, so an
update that makes the state non-finite while its loss is finite must not be saved."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import toy_task
from etjax.train.trainer import NonFiniteLossError, Trainer

BASE = toy_task.make_train_step(total_steps=20)


def _poisoned(at_step: int, where: str):
  """BASE whose update `at_step` leaves inf in `where` ('params' or 'opt_state')
  and reports BASE's (finite) loss."""
  def update(state, batch):
    new, metrics = BASE.update(state, batch)
    poison = lambda x: jnp.where(new.step >= at_step, jnp.inf, x)  # pylint: disable=unnecessary-lambda-assignment
    tree = jax.tree.map(lambda x: poison(x) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, getattr(new, where))
    return new.replace(**{where: tree}), metrics
  return BASE._replace(update=update)


@pytest.mark.parametrize("where", ["params", "opt_state"])
def test_a_non_finite_state_is_never_saved(tmp_path, where):
  trainer = Trainer(_poisoned(3, where), workdir=str(tmp_path), num_steps=6,
                    checkpoint_every=1, log_every=1, progress=False, keep_last=10)
  with pytest.raises(NonFiniteLossError, match=r"non-finite parameters or optimizer "
                     r"state at step 3; .*checkpoint, step 2, is kept"):
    trainer.fit(toy_task.ToyIterator())
  assert trainer.checkpointer.all_steps() == [1, 2]
  for step in (1, 2):
    saved = ocp.StandardCheckpointer().restore(
        str(tmp_path / "checkpoints" / str(step) / "state"))
    for leaf in jax.tree.leaves(saved):
      leaf = np.asarray(leaf)
      if np.issubdtype(leaf.dtype, np.floating):
        assert np.isfinite(leaf).all()
