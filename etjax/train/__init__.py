"""etjax.train: the trainer loop, orbax checkpoints, metrics and logging sinks."""

from etjax.train.checkpoints import Checkpointer, CorruptCheckpointError
from etjax.train.metrics import accuracy, auc, classification_metrics, macro_f1
from etjax.train.trainer import FitResult, NonFiniteLossError, Trainer
