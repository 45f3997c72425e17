"""etjax.cli: the `etjax` command line below its entry point (etjax/main.py).

`configurables` (the gin configurables users' gin files bind: data, classifier,
optimizer, mesh, transfer, train, experiment, appzoo), `gin_config` (the --gin
arguments, search roots and binding), `algorithm_files` (the methods' defaults in
gin/algorithms), `commands` (the command table) and `job_commands` (train, eval,
predict, demo). Only etjax/main.py and this package import gin or define flags; the
run itself is assembled by etjax.jobs from plain settings.
"""
