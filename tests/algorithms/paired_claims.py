"""Issue 10's form of a learning claim, shared by the meta-learning tests: a method
against its baseline on the same seeds and data, the mean of the paired gains beyond
k standard errors of those gains, with the seeds and k fixed before measuring."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

SEEDS, K_SE = (0, 1, 2, 3, 4), 2.0


def paired_gains(seeds: Iterable[int],
                 arms: Callable[[int], tuple[float, float]]) -> np.ndarray:
  """[len(seeds)] gains method - baseline, where arms(seed) = (baseline, method)."""
  return np.array([method - baseline for baseline, method in map(arms, seeds)])


def standard_error(gains: np.ndarray) -> float:
  return float(np.std(gains, ddof=1) / np.sqrt(len(gains)))


def assert_paired_gain(gains: np.ndarray, k: float = K_SE, context=None) -> None:
  """mean(gains) > k standard errors of the gains (context shown on failure)."""
  gains = np.asarray(gains, np.float64)
  assert len(gains) >= 5, f"a paired claim needs >= 5 seeds, got {len(gains)}"
  assert gains.mean() > k * standard_error(gains), (
      f"mean paired gain {gains.mean():.4f} <= {k} x SE {standard_error(gains):.4f}; "
      f"gains {np.round(gains, 4).tolist()}", context)
