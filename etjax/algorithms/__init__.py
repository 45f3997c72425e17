"""The step contract and the transfer-learning algorithms as train-step transforms."""

from etjax.algorithms.finetune import (LossFn, classifier_loss, finetune, init_params,
                                       step_from_loss, weighted_accuracy,
                                       weighted_cross_entropy, with_pretrained)
from etjax.algorithms.optim import make_optimizer
from etjax.algorithms.step import TrainState, TrainStep, apply_gradients, next_rng, unbox
