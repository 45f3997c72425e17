"""etjax.jobs: job assembly from plain settings, above train and transfer.

The pieces a run is put together from: labelled splits (synthetic, files, Debian,
seqio), the tokenizer, the classifier and its pretrained backbone, model.json and the
job's assets (`tasks`); a trained workdir read back as a classifier (`trained`); the
Trainer or transfer recipe of `etjax train/eval/predict` (`runs`). The command line
(etjax/cli) passes its gin settings here as plain values; apps, serving and
experiments build on the same pieces. Nothing here reads gin or flags.
"""
