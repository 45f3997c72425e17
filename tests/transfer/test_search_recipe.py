"""AdaBERT's hand-over on the road: the retraining reads its cells from the workdir's
record, and fails naming what is missing or wrong (the derivation from the search's
checkpoint is checked end to end in test_transfer_cli.py)."""

from __future__ import annotations

import json

import pytest

from etjax.algorithms import adabert as ab
from etjax.transfer import search_recipe

CONFIG = ab.AdaBertConfig(vocab_size=20, num_cells=1, num_nodes=2)


def test_recorded_cells_are_read_back_and_checked(tmp_path):
  path = tmp_path / search_recipe.ARCHITECTURE_FILE
  cells = ["conv3", "identity", "zero", "maxpool3", "dilconv7"]
  path.write_text(json.dumps({"genotype": cells}))
  # The search's directory is not read when the record exists.
  assert search_recipe.searched_genotype(str(tmp_path), str(tmp_path / "0_search"), 5,
                                         CONFIG) == tuple(cells)
  path.write_text(json.dumps({"genotype": ["conv3", "identity", "zero", "zero",
                                           "zero"]}))
  with pytest.raises(ValueError, match=rf"{path}: genotype leaves node 1 without "
                                       "inputs"):
    search_recipe.searched_genotype(str(tmp_path), "unused", 5, CONFIG)


def test_a_search_without_its_last_checkpoint_is_named(tmp_path):
  search = tmp_path / "0_search"
  (search / "checkpoints" / "2").mkdir(parents=True)  # stopped before its step 5
  with pytest.raises(ValueError, match=rf"{search} has no checkpoint of the search's "
                                       r"last step 5, so no architecture was chosen"):
    search_recipe.searched_genotype(str(tmp_path), str(search), 5, CONFIG)
  assert not (tmp_path / search_recipe.ARCHITECTURE_FILE).exists()
