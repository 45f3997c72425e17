"""`etjax export` and `etjax serve` end to end: train with the CLI, export, compare with
`etjax predict`, then serve over a real socket on the loopback interface."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from etjax import main
from etjax.serving import loader
from tests.test_main import TINY  # the tiny training job of the CLI tests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_LENGTH = int(next(a.rsplit("=", 1)[1] for a in TINY if "train.max_length" in a))
TEXTS = ["the plot is gripping , i love it", "the kettle is flimsy , avoid it"]


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  workdir, out = str(tmp / "run"), str(tmp / "export")
  args = TINY + [f"--gin.train.workdir='{workdir}'"]
  assert main.run(["train"] + args) == 0
  with open(os.path.join(workdir, "model.json")) as f:
    assert json.load(f)["max_length"] == MAX_LENGTH
  assert main.run(["export", f"--workdir={workdir}", f"--output={out}"]) == 0
  inputs, outputs = tmp / "in.tsv", tmp / "out.tsv"
  inputs.write_text("\n".join(TEXTS) + "\n")
  assert main.run(["predict", "--input", str(inputs), "--output", str(outputs)] + args) == 0
  return out, outputs.read_text().splitlines()[1:]


@pytest.mark.slow
def test_export_command_agrees_with_predict_command(cli_export, capsys):
  out, predicted = cli_export
  model = loader.load_export(out)
  assert model.version == 1 and model.lengths[-1] == MAX_LENGTH
  result = model.predict(TEXTS)
  with open(os.path.join(os.path.dirname(out), "run", "model.json")) as f:
    dtype = json.load(f)["config"]["dtype"]
  # predict prints 4 decimals; in bfloat16 the two jitted programs may round apart.
  tolerance = 1e-2 if dtype == "bfloat16" else 6e-5
  for row, probs in zip(predicted, result["probabilities"]):
    _, label, probability = row.split("\t")
    assert abs(float(probability) - probs.max()) <= tolerance
    if tolerance < 1e-3:
      assert label == model.label_names[int(probs.argmax())]


def test_export_command_names_missing_flags(capsys):
  assert main.run(["export", "--workdir=/nonexistent"]) == 2
  assert "export needs --workdir and --output" in capsys.readouterr().err
  assert main.run(["serve"]) == 2
  assert "serve needs --export_dir" in capsys.readouterr().err


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_serve_command_answers_on_loopback(cli_export):
  out, _ = cli_export
  port = _free_port()
  env = dict(os.environ, ETJAX_TEST_KEY="k3y", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
      [sys.executable, "-m", "etjax.main", "serve", f"--export_dir={out}",
       f"--port={port}", "--max_batch_size=4", "--api_key_env=ETJAX_TEST_KEY"],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
      assert proc.poll() is None, proc.stdout.read().decode()
      try:
        if httpx.get(f"{url}/health", timeout=5).status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert time.monotonic() < deadline, "etjax serve did not come up"
      time.sleep(0.5)
    body = {"instances": [{"text_a": t} for t in TEXTS]}
    assert httpx.post(f"{url}/v1/predict", json=body, timeout=60).status_code == 401
    response = httpx.post(f"{url}/v1/predict", json=body, timeout=60,
                          headers={"Authorization": "Bearer k3y"})
    assert response.status_code == 200, response.text
    want = loader.load_export(out).predict(TEXTS)["probabilities"]
    got = [p["probabilities"] for p in response.json()["predictions"]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    metadata = httpx.get(f"{url}/v1/metadata", headers={"X-API-Key": "k3y"}).json()
    assert metadata["limits"]["max_batch_size"] == 4
  finally:
    proc.terminate()
    proc.wait(timeout=30)
