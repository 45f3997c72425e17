"""Experiments: the paper's transfer-learning tables as plain functions.

Each table function takes plain arguments (seeds, sizes, steps), runs every row of
the table on synthetic data and returns it as markdown. `etjax run` runs one from a gin
file under gin/runs/ (`experiment.fn = @feature_table8` plus its arguments), and
benchmarks/tl_tables.py runs them all for benchmarks/RESULTS.md.
"""
