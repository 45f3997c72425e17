"""Layout rules of etjax.pallas.rsa.make_layout (see rsa_layout's docstring)."""

from __future__ import annotations

import numpy as np
import pytest

from etjax.pallas.rsa import expand_layout, make_layout
from etjax.pallas.rsa_layout import make_tables


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,seq,bs,k", [(4, 256, 16, 4), (12, 512, 32, 4),
                                            (3, 128, 16, 2), (16, 256, 16, 8)])
def test_shape_diagonal_and_distinct(heads, seq, bs, k, causal):
  lay = make_layout(heads, seq, bs, k, seed=3, causal=causal)
  n = seq // bs
  assert lay.shape == (heads, n, n // k) and lay.dtype == np.int32
  for h in range(heads):
    for i in range(n):
      row = lay[h, i][lay[h, i] >= 0]
      assert i in row                                   # diagonal kept
      assert len(set(row.tolist())) == len(row)         # no repeats
      assert np.all(np.diff(row) > 0)                   # sorted
      assert np.all(lay[h, i, len(row):] == -1)         # fillers last
      if not causal:
        assert len(row) == n // k                       # every slot used


@pytest.mark.parametrize("heads,seq,bs,k", [(5, 256, 16, 4), (8, 256, 16, 4),
                                            (3, 128, 16, 2), (17, 256, 16, 8),
                                            (12, 512, 64, 4)])
def test_heads_cover_every_key_block(heads, seq, bs, k):
  n = seq // bs
  width = n // k
  # The documented condition under which the dealt heads cover every block.
  assert heads * (width - 1) >= n - 1
  for causal in (False, True):
    lay = make_layout(heads, seq, bs, k, seed=11, causal=causal)
    for i in range(n):
      union = set(lay[:, i].ravel().tolist()) - {-1}
      assert union == set(range(i + 1) if causal else range(n)), (causal, i)


def test_heads_deal_disjoint_blocks_when_permutation_lasts():
  heads, seq, bs, k = 4, 512, 16, 8     # 32 blocks, width 4: 4 * 3 <= 31 others.
  lay = make_layout(heads, seq, bs, k, seed=0)
  for i in range(seq // bs):
    others = [set(lay[h, i].tolist()) - {i} for h in range(heads)]
    for a in range(heads):
      for b in range(a + 1, heads):
        assert not others[a] & others[b]


def test_causal_only_looks_back():
  lay = make_layout(6, 256, 16, 4, seed=5, causal=True)
  i = np.arange(lay.shape[1])[None, :, None]
  assert np.all((lay <= i) | (lay == -1))
  mask = np.asarray(expand_layout(lay, 16, 256))
  assert not np.any(np.triu(mask, k=16)[:, :, :])       # nothing above the diagonal block


def test_determinism_by_seed():
  a = make_layout(8, 256, 16, 4, seed=7)
  assert np.array_equal(a, make_layout(8, 256, 16, 4, seed=7))
  assert not np.array_equal(a, make_layout(8, 256, 16, 4, seed=8))


def test_k1_is_dense_and_expand_matches_rows():
  lay = make_layout(2, 64, 16, 1, seed=0)
  assert np.asarray(expand_layout(lay, 16, 64)).all()
  causal = np.asarray(expand_layout(make_layout(2, 64, 16, 1, 0, causal=True), 16, 64))
  blocks = np.tril(np.ones((4, 4), bool))
  assert np.array_equal(causal[0], np.kron(blocks, np.ones((16, 16), bool)))


def test_inverse_table_lists_the_choosers():
  lay = make_layout(3, 256, 16, 4, seed=2, causal=True)
  t = make_tables(lay, 16)
  lay_c, inv, icnt = (np.asarray(x) for x in (t.layout, t.inverse, t.inverse_counts))
  assert np.array_equal(np.sort(np.where(lay_c < 0, 99, lay_c), -1),
                        np.sort(np.where(lay < 0, 99, lay), -1))
  for h in range(3):
    for j in range(16):
      expect = [i for i in range(16) if j in lay[h, i]]
      assert inv[h, j, :icnt[h, j, 0]].tolist() == expect
      assert np.all(inv[h, j, icnt[h, j, 0]:] == -1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=2, seq_len=100, block_size=16, k=2, seed=0), "not divisible"),
    (dict(num_heads=2, seq_len=64, block_size=16, k=8, seed=0), "k must be"),
    (dict(num_heads=0, seq_len=64, block_size=16, k=2, seed=0), "num_heads"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_layout(**kwargs)
