"""The prediction service in-process (starlette's TestClient): answers equal the
loader's, every error is a JSON body with the right code, batched answers equal single
ones, a new version is picked up without dropping requests, the API key is enforced."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
from starlette.testclient import TestClient

from etjax.serving import export, loader, server
from tests.serving.serving_testlib import MAX_LENGTH, TEXTS

FAST = dict(warm_up=False, poll_interval_s=0)


def _client(root, **config):
  return TestClient(server.create_app(str(root), server.ServerConfig(**{**FAST, **config})))


def _probabilities(response):
  return np.asarray([p["probabilities"] for p in response.json()["predictions"]])


def test_predict_answers_as_the_loader(exported):
  model = loader.load_export(exported)
  instances = [{"text_a": TEXTS[0]}, {"text_a": TEXTS[3], "text_b": TEXTS[1]},
               {"text_a": TEXTS[2], "text_b": None}]
  with _client(exported) as client:
    response = client.post("/v1/predict", json={"instances": instances})
  assert response.status_code == 200, response.text
  body = response.json()
  want = model.predict([i["text_a"] for i in instances],
                       [i.get("text_b") for i in instances])
  np.testing.assert_allclose(_probabilities(response), want["probabilities"], rtol=1e-5,
                             atol=1e-6)
  assert body["label_names"] == model.label_names
  assert body["model_version"] == 1 and body["model_name"] == "bert-tiny"
  assert [p["label"] for p in body["predictions"]] == [
      model.label_names[i] for i in want["probabilities"].argmax(-1)]
  assert [p["truncated"] for p in body["predictions"]] == want["truncated"].tolist()
  assert body["predictions"][1]["truncated"]
  assert body["warnings"] == [f"instances[1]: longer than {MAX_LENGTH} tokens; "
                              f"truncated to {MAX_LENGTH}"]


def _chunks(data, size=1000):
  for i in range(0, len(data), size):
    yield data[i:i + size]


BAD_REQUESTS = [
    # (name, request kwargs, status, text the message or a detail field must hold)
    ("malformed_json", dict(content=b'{"instances": [}'), 400, "malformed JSON at line 1"),
    ("not_utf8", dict(content=b'{"instances": "\xff"}'), 400, "not UTF-8"),
    ("deep_nesting", dict(content=b"[" * 4000), 400, "unreadable JSON"),
    ("not_an_object", dict(json=[1, 2]), 422, "$"),
    ("no_instances", dict(json={"texts": ["a"]}), 422, "instances"),
    ("instances_not_list", dict(json={"instances": "a"}), 422, "instances"),
    ("empty_instances", dict(json={"instances": []}), 422, "instances"),
    ("instance_not_object", dict(json={"instances": ["a"]}), 422, "instances[0]"),
    ("missing_text_a", dict(json={"instances": [{"text_a": "a"}, {"text_b": "b"}]}), 422,
     "instances[1].text_a"),
    ("text_a_number", dict(json={"instances": [{"text_a": 5}]}), 422,
     "instances[0].text_a"),
    ("text_b_list", dict(json={"instances": [{"text_a": "a", "text_b": ["b"]}]}), 422,
     "instances[0].text_b"),
    ("unknown_field", dict(json={"instances": [{"text_a": "a", "txet_b": "b"}]}), 422,
     "instances[0].txet_b"),
    ("too_many_instances", dict(json={"instances": [{"text_a": "a"}] * 9}), 413,
     "9 instances; at most 8"),
    ("declared_too_long", dict(content=b" " * 5000), 413, "body of 5000 bytes"),
    ("chunked_too_long", dict(content=_chunks(b" " * 5000)), 413, "body over 4096 bytes"),
]


def test_bad_requests_get_json_errors_and_the_service_stays_up(exported):
  with _client(exported, max_instances=8, max_body_bytes=4096) as client:
    for name, kwargs, status, needle in BAD_REQUESTS:
      if name == "chunked_too_long":  # a generator is consumed once
        kwargs = dict(content=_chunks(b" " * 5000))
      response = client.post("/v1/predict", **kwargs)
      assert response.status_code == status, (name, response.text)
      error = response.json()["error"]
      assert error["code"] == status
      fields = [d["field"] for d in error.get("details", [])]
      assert needle in error["message"] or needle in fields, (name, error)
    for method, path, status in (("GET", "/v1/predict", 405), ("GET", "/nope", 404)):
      response = client.request(method, path)
      assert response.status_code == status
      assert response.json()["error"]["code"] == status
    good = client.post("/v1/predict", json={"instances": [{"text_a": TEXTS[0]}]})
    assert good.status_code == 200
    assert client.get("/health").json() == {"status": "ok", "model_version": 1}


def test_every_bad_field_is_named(exported):
  with _client(exported) as client:
    response = client.post("/v1/predict", json={"instances": [
        {"text_a": 1}, {"text_b": "x"}, {"text_a": "ok"}, "no"], "extra": 1})
  fields = [d["field"] for d in response.json()["error"]["details"]]
  assert response.status_code == 422
  assert fields == ["extra", "instances[0].text_a", "instances[1].text_a",
                    "instances[3]"]


def _post_concurrently(client, texts, results):
  def one(i):
    results[i] = client.post("/v1/predict", json={"instances": [{"text_a": texts[i]}]})
  threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()


def test_batched_answers_equal_single_answers(exported):
  texts = [TEXTS[i % len(TEXTS)] + f" number {i}" for i in range(12)]
  with _client(exported, max_batch_size=8, max_wait_ms=300, warm_up=True) as client:
    singles = [_probabilities(client.post("/v1/predict", json={
        "instances": [{"text_a": t}]}))[0] for t in texts]
    service = client.app.state.service
    assert service.batcher.stats["largest_batch"] == 1
    results = [None] * len(texts)
    _post_concurrently(client, texts, results)
    stats = dict(service.batcher.stats)
    metadata = client.get("/v1/metadata").json()
  assert all(r.status_code == 200 for r in results)
  for single, response in zip(singles, results):
    np.testing.assert_allclose(_probabilities(response)[0], single, rtol=1e-5, atol=1e-6)
  # 12 concurrent requests, 8 at most per batch: fewer batches than requests.
  assert 1 < stats["largest_batch"] <= 8
  assert stats["batches"] < 12 + len(texts)
  assert metadata["batching"] == stats
  assert metadata["length_buckets"] == [16, MAX_LENGTH]
  assert metadata["limits"]["max_batch_size"] == 8


def test_a_request_larger_than_the_batch_is_answered_whole(exported):
  texts = [TEXTS[i % len(TEXTS)] for i in range(11)]
  with _client(exported, max_batch_size=4) as client:
    response = client.post("/v1/predict", json={"instances": [{"text_a": t}
                                                              for t in texts]})
  np.testing.assert_allclose(_probabilities(response),
                             loader.load_export(exported).predict(texts)["probabilities"],
                             rtol=1e-5, atol=1e-6)


def test_new_version_is_picked_up_without_dropping_requests(trained, exported, tmp_path):
  root = tmp_path / "root"
  shutil.copytree(os.path.join(exported, "1"), root / "1")
  with open(root / "1" / "manifest.json") as f:
    first_step = json.load(f)["source"]["checkpoint_step"]
  other_step = next(s for s in trained.trainer.checkpointer.all_steps() if s != first_step)
  responses, stop = [], threading.Event()

  def client_loop(client):
    deadline = time.monotonic() + 300
    while not stop.is_set() and time.monotonic() < deadline:
      responses.append(client.post("/v1/predict",
                                   json={"instances": [{"text_a": TEXTS[0]}]}))

  with _client(root, poll_interval_s=0.05) as client:
    threads = [threading.Thread(target=client_loop, args=(client,)) for _ in range(3)]
    for t in threads:
      t.start()
    export.export_workdir(trained.workdir, str(root), step=other_step,
                          platforms=("cpu",))
    deadline = time.monotonic() + 120
    while (client.app.state.service.store.current.version != 2 and
           time.monotonic() < deadline):
      time.sleep(0.05)
    time.sleep(0.5)  # a few more requests on the new version
    stop.set()
    for t in threads:
      t.join()
  assert responses and all(r.status_code == 200 for r in responses)
  versions = [r.json()["model_version"] for r in responses]
  assert versions[0] == 1 and versions[-1] == 2
  new = loader.load_export(str(root / "2")).predict([TEXTS[0]])["probabilities"]
  old = loader.load_export(str(root / "1")).predict([TEXTS[0]])["probabilities"]
  assert not np.allclose(new, old, rtol=1e-5, atol=1e-6)  # the versions differ
  for r in responses:
    want = new if r.json()["model_version"] == 2 else old
    np.testing.assert_allclose(_probabilities(r), want, rtol=1e-5, atol=1e-6)


def test_a_broken_newer_version_is_refused_and_the_old_one_kept(exported, tmp_path):
  root = tmp_path / "root"
  shutil.copytree(os.path.join(exported, "1"), root / "1")
  shutil.copytree(root / "1", root / "2")
  (root / "2" / "weights.npz").write_bytes(b"garbage")
  with _client(root) as client:
    store = client.app.state.service.store
    assert store.current.version == 1
    assert "weights.npz has 7 bytes" in store.refused[2]
    assert not store.refresh()
    assert client.post("/v1/predict", json={"instances": [{"text_a": "a"}]}).json()[
        "model_version"] == 1
  shutil.rmtree(root / "1")
  with pytest.raises(loader.ExportError, match="no loadable export version"):
    server.create_app(str(root), server.ServerConfig(**FAST))


def test_api_key_is_required_and_compared_in_constant_time(exported, monkeypatch):
  compared = []
  real = server.hmac.compare_digest

  def spy(a, b):
    compared.append((a, b))
    return real(a, b)
  monkeypatch.setattr(server.hmac, "compare_digest", spy)
  body = {"instances": [{"text_a": "a"}]}
  with _client(exported, api_key="s3cret-key") as client:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cret-kez"}):
      response = client.post("/v1/predict", json=body, headers=headers)
      assert response.status_code == 401
      assert response.json()["error"]["message"] == "missing or wrong API key"
    assert client.get("/v1/metadata").status_code == 401
    assert client.post("/v1/predict", json=body, headers={
        "Authorization": "Bearer s3cret-key"}).status_code == 200
    assert client.post("/v1/predict", json=body, headers={
        "X-API-Key": "s3cret-key"}).status_code == 200
    assert client.get("/health").status_code == 200  # probes need no key
  assert (b"s3cret-kez", b"s3cret-key") in compared and len(compared) == 4


def test_api_key_env_must_name_a_set_variable(monkeypatch):
  monkeypatch.delenv("ETJAX_TEST_KEY", raising=False)
  with pytest.raises(ValueError, match="ETJAX_TEST_KEY is not set"):
    server.api_key_from_env("ETJAX_TEST_KEY")
  monkeypatch.setenv("ETJAX_TEST_KEY", "k")
  assert server.api_key_from_env("ETJAX_TEST_KEY") == "k"
  assert server.api_key_from_env(None) is None
