"""The AppZoo's apps by --modelName (EasyTransfer's names)."""

from __future__ import annotations

import importlib

# --modelName -> (module, class). Modules are imported when an app is used.
APPS = {
    "text_classify_bert": ("etjax.apps.classify", "TextClassifyBert"),
    "text_classify_bert_multilabel": ("etjax.apps.classify", "TextClassifyBertMultiLabel"),
    "sequence_labeling_bert": ("etjax.apps.tagging", "SequenceLabelingBert"),
    "sequence_labeling_bert_crf": ("etjax.apps.tagging", "SequenceLabelingBertCrf"),
    "sequence_labeling_bert_bilstm_crf": ("etjax.apps.tagging",
                                          "SequenceLabelingBertBilstmCrf"),
    "text_comprehension_bert": ("etjax.apps.comprehension", "TextComprehensionBert"),
    "text_comprehension_bert_hae": ("etjax.apps.comprehension",
                                    "TextComprehensionBertHae"),
    "text_match_bert": ("etjax.apps.matching", "TextMatchBert"),
    "text_match_bert_two_tower": ("etjax.apps.matching", "TextMatchBertTwoTower"),
    "text_classify_cnn": ("etjax.apps.matching", "TextClassifyCnn"),
    "text_match_bicnn": ("etjax.apps.matching", "TextMatchBicnn"),
    "text_match_hcnn": ("etjax.apps.matching", "TextMatchHcnn"),
    "text_match_dam": ("etjax.apps.matching", "TextMatchDam"),
    "text_match_damplus": ("etjax.apps.matching", "TextMatchDamPlus"),
    "feat_ext_bert": ("etjax.apps.features", "FeatExtBert"),
}


def get_app(name: str):
  """The app named `name`; an unknown name fails listing the known ones."""
  if name not in APPS:
    raise ValueError(f"--modelName={name!r} is not an app; known apps: "
                     f"{', '.join(sorted(APPS))}")
  module, cls = APPS[name]
  return getattr(importlib.import_module(module), cls)()


def describe_apps() -> str:
  """One line per app: its name and what it does (for `etjax app --help`)."""
  return "\n".join(f"  {name:32s} {get_app(name).description}" for name in sorted(APPS))
