"""Tables 8 and 9 run as their documented gin jobs (tiny: one seed, two steps, one
row of each kind), every model through the Trainer and every method's settings from
gin/algorithms/*.gin with the run file's overrides over them."""

from __future__ import annotations

import pytest

from etjax import main
from etjax.experiments import rows


def test_method_settings_are_the_algorithm_file_with_overrides():
  settings = main.algorithm_settings()
  # Tables 8 and 9 key their overrides by file stem, the distillation tables by
  # selector (the default).
  got = rows.method_settings(settings, "drss", "feature_tl",
                             {"drss": {"drss_weight": 0.5}, "rtl": {"x": 1}},
                             override_key="drss")
  assert got == {**settings["drss"]["feature_tl"], "drss_weight": 0.5}
  assert settings["drss"]["feature_tl"]["drss_weight"] == 1e-3  # not modified
  got = rows.method_settings(settings, "metakd", "metakd",
                             {"metakd": {"temperature": 3.0}, "meta_teacher": {"x": 1}})
  assert got == {**settings["metakd"]["metakd"], "temperature": 3.0}
  with pytest.raises(ValueError, match=r"no instance_tl.\* bindings of "
                                       r"gin/algorithms/rtl.gin"):
    rows.method_settings({}, "rtl", "instance_tl")


# (run file, bindings, header, rows shown, a row not shown, a line on stderr)
JOBS = [
    ("table8_feature_tl", {"rows": "['DRSS-Adv']",
                           "overrides": "{'drss_adv': {'grl_warmup_steps': 1}}"},
     "| Method | Prec | Rec | F1 | ACC | AUC |", ("DRSS-Adv",), "FS",
     "seed 0 DRSS-Adv Omega correlations"),
    ("table9_instance_tl", {"rows": "['Ruder & Plank', 'MGTL']",
                            "overrides": "{'ruder_plank': {'num_trials': 2, "
                                         "'train_steps': 2}}"},
     "| Method | ACC | AUC |", ("Ruder & Plank", "MGTL"), "RTL",
     "seed 0 MGTL: expected precision of selection"),
]


@pytest.mark.slow
def test_one_seed_of_tables_8_and_9_runs_as_gin_jobs(capsys):
  for name, bindings, header, shown, hidden, err_line in JOBS:
    selector = "feature_table8" if name.startswith("table8") else "instance_table9"
    bindings = {"seeds": "(0,)", "steps": "2", **bindings}
    assert main.run(["run", f"--gin_file=gin/runs/{name}.gin"] + [
        f"--gin.{selector}.{k}={v}" for k, v in bindings.items()]) == 0
    out = capsys.readouterr()
    assert header in out.out
    assert all(f"| {row} |" in out.out for row in shown)
    assert f"| {hidden} |" not in out.out
    assert err_line in out.err
