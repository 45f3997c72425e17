"""The HTTP prediction service over an export directory: an ASGI app (starlette) served
by uvicorn.

    POST /v1/predict   {"instances": [{"text_a": "...", "text_b": "..."}, ...]}
                       -> {"predictions": [{"label", "label_id", "probabilities",
                           "truncated"}], "label_names", "model_name", "model_version",
                           "warnings"}
    GET  /v1/metadata  model name and version, labels, lengths, inputs/outputs, limits
    GET  /health       {"status": "ok", "model_version": n}

Why starlette + uvicorn: starlette is the small, well-kept ASGI toolkit that FastAPI is
built on (one dependency, anyio); the request checks here are hand-written so that each
error names its field, which needs no schema library; uvicorn is the reference ASGI
server (h11 here; uvloop when installed).

Bad input never takes the service down and every error is a JSON body
{"error": {"code", "message", "details"}}: malformed JSON 400; a wrong or missing API
key 401; missing fields or wrong types 422, each named ("instances[2].text_a");
too many instances or too long a body 413. Texts longer than the model's length are
truncated, and the answer says so per instance. The API key (when set) is compared in
constant time (hmac.compare_digest) and guards /v1/*; /health stays open for probes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import os
from typing import Any, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from etjax.serving import batching

log = logging.getLogger("etjax.serving")
INSTANCE_FIELDS = ("text_a", "text_b")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """Limits and batching of the service.

  Attributes:
    max_batch_size: instances run together at most (per length bucket).
    max_wait_ms: how long a batch smaller than that waits for more requests.
    max_instances: instances one request may hold (more: 413).
    max_body_bytes: request body size limit (more: 413).
    poll_interval_s: how often the export directory is checked for a new version
      (0: never).
    warm_up: compile every batch and length shape before serving a version.
    api_key: when set, /v1/* requests must send it ("Authorization: Bearer KEY" or
      "X-API-Key: KEY").
  """
  max_batch_size: int = 32
  max_wait_ms: float = 5.0
  max_instances: int = 256
  max_body_bytes: int = 1 << 20
  poll_interval_s: float = 5.0
  warm_up: bool = True
  api_key: Optional[str] = None


class RequestError(Exception):
  """A client error: HTTP status, message and per-field details."""

  def __init__(self, status: int, message: str, details: Optional[list] = None):
    super().__init__(message)
    self.status, self.message, self.details = status, message, details or []


def error_response(status: int, message: str, details: Optional[list] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
  body = {"error": {"code": status, "message": message}}
  if details:
    body["error"]["details"] = details
  return JSONResponse(body, status_code=status, headers=headers)


def parse_instances(payload: Any, max_instances: int
                    ) -> tuple[list[str], list[Optional[str]]]:
  """(texts_a, texts_b) of a decoded request body; RequestError 422 naming every bad
  field (at most 20), or 413 for more than `max_instances` instances."""
  if not isinstance(payload, dict):
    raise RequestError(422, f"the body must be a JSON object with 'instances', got a "
                       f"{_json_type(payload)}", [{"field": "$", "problem": "not an object"}])
  problems = [{"field": k, "problem": "unknown field"} for k in payload
              if k != "instances"]
  instances = payload.get("instances")
  if "instances" not in payload:
    problems.append({"field": "instances", "problem": "missing"})
  elif not isinstance(instances, list):
    problems.append({"field": "instances",
                     "problem": f"expected a list, got a {_json_type(instances)}"})
  elif not instances:
    problems.append({"field": "instances", "problem": "empty: give at least one"})
  elif len(instances) > max_instances:
    raise RequestError(413, f"{len(instances)} instances; at most {max_instances} per "
                       "request", [{"field": "instances", "problem": "too many"}])
  texts_a, texts_b = [], []
  for i, instance in enumerate(instances if isinstance(instances, list) else []):
    where = f"instances[{i}]"
    if not isinstance(instance, dict):
      problems.append({"field": where, "problem": f"expected an object, got a "
                       f"{_json_type(instance)}"})
      continue
    problems += [{"field": f"{where}.{k}", "problem": "unknown field"}
                 for k in instance if k not in INSTANCE_FIELDS]
    a, b = instance.get("text_a"), instance.get("text_b")
    if "text_a" not in instance:
      problems.append({"field": f"{where}.text_a", "problem": "missing"})
    elif not isinstance(a, str):
      problems.append({"field": f"{where}.text_a",
                       "problem": f"expected a string, got a {_json_type(a)}"})
    if b is not None and not isinstance(b, str):
      problems.append({"field": f"{where}.text_b",
                       "problem": f"expected a string or null, got a {_json_type(b)}"})
    texts_a.append(a)
    texts_b.append(b)
  if problems:
    raise RequestError(422, "invalid request: " + "; ".join(
        f"{p['field']}: {p['problem']}" for p in problems[:5]) +
        (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""), problems[:20])
  return texts_a, texts_b


def _json_type(value: Any) -> str:
  return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
          float: "number", type(None): "null"}.get(type(value), type(value).__name__)


async def read_json(request: Request, max_bytes: int) -> Any:
  """The request's JSON body, refusing bodies over `max_bytes` (413) before reading
  them whole, and malformed JSON (400, with line and column)."""
  declared = request.headers.get("content-length")
  if declared is not None:
    if not declared.isdigit():
      raise RequestError(400, f"bad Content-Length header {declared!r}")
    if int(declared) > max_bytes:
      raise RequestError(413, f"body of {declared} bytes; at most {max_bytes}")
  body = bytearray()
  async for chunk in request.stream():
    body += chunk
    if len(body) > max_bytes:
      raise RequestError(413, f"body over {max_bytes} bytes")
  try:
    return json.loads(body.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise RequestError(400, f"the body is not UTF-8: {e}") from None
  except json.JSONDecodeError as e:
    raise RequestError(400, f"malformed JSON at line {e.lineno} column {e.colno}: "
                       f"{e.msg}") from None
  except (ValueError, RecursionError) as e:  # huge numbers, absurd nesting
    raise RequestError(400, f"unreadable JSON: {e}") from None


class Service:
  """The model store, batcher and limits behind the routes."""

  def __init__(self, export_dir: str, config: ServerConfig):
    self.config = config
    self.store = batching.ModelStore(export_dir, max_batch_size=config.max_batch_size,
                                     warm_up=config.warm_up)
    self.batcher = batching.Batcher(self.store, max_batch_size=config.max_batch_size,
                                    max_wait_s=config.max_wait_ms / 1000)
    self._key = config.api_key.encode() if config.api_key else None

  def authorized(self, request: Request) -> bool:
    if self._key is None:
      return True
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
      given = auth[7:].strip()
    # compare_digest takes as long for every wrong key of a length: no timing oracle.
    return given is not None and hmac.compare_digest(given.encode(), self._key)

  async def predict(self, request: Request) -> JSONResponse:
    texts_a, texts_b = parse_instances(
        await read_json(request, self.config.max_body_bytes), self.config.max_instances)
    result = await self.batcher.submit(texts_a, texts_b)
    model = result.model
    names = model.label_names
    predictions, warnings = [], []
    for i, (probs, truncated) in enumerate(zip(result.probabilities, result.truncated)):
      label_id = int(probs.argmax())
      predictions.append({"label": names[label_id], "label_id": label_id,
                          "probabilities": [float(p) for p in probs],
                          "truncated": bool(truncated)})
      if truncated:
        warnings.append(f"instances[{i}]: longer than {model.max_length} tokens; "
                        f"truncated to {model.max_length}")
    return JSONResponse({"model_name": model.manifest.get("model_name"),
                         "model_version": model.version, "label_names": names,
                         "predictions": predictions, "warnings": warnings})

  def metadata(self) -> dict:
    model, manifest = self.store.current, self.store.current.manifest
    keys = ("model_name", "etjax_version", "jax_version", "created", "source",
            "platforms", "inputs", "outputs", "num_parameters")
    return {**{k: manifest.get(k) for k in keys}, "model_version": model.version,
            "label_names": model.label_names, "max_length": model.max_length,
            "length_buckets": model.lengths,
            "limits": {"max_batch_size": self.config.max_batch_size,
                       "max_wait_ms": self.config.max_wait_ms,
                       "max_instances": self.config.max_instances,
                       "max_body_bytes": self.config.max_body_bytes},
            "batching": dict(self.batcher.stats)}


def create_app(export_dir: str, config: ServerConfig = ServerConfig()) -> Starlette:
  """The ASGI app serving the newest complete version under `export_dir`.

  Raises:
    etjax.serving.loader.ExportError: no loadable version there.
  """
  service = Service(export_dir, config)

  def guarded(handler):
    async def endpoint(request: Request):
      if not service.authorized(request):
        return error_response(401, "missing or wrong API key",
                              headers={"WWW-Authenticate": "Bearer"})
      try:
        return await handler(request)
      except RequestError as e:
        return error_response(e.status, e.message, e.details)
      except Exception:  # pylint: disable=broad-except
        log.exception("request failed")
        return error_response(500, "internal error while predicting; see the server log")
    return endpoint

  async def predict(request: Request):
    return await service.predict(request)

  async def metadata(request: Request):  # pylint: disable=unused-argument
    return JSONResponse(service.metadata())

  async def health(request: Request):  # pylint: disable=unused-argument
    return JSONResponse({"status": "ok", "model_version": service.store.current.version})

  async def http_error(request: Request, exc: HTTPException):  # pylint: disable=unused-argument
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

  @contextlib.asynccontextmanager
  async def lifespan(app):  # pylint: disable=unused-argument
    if config.poll_interval_s > 0:
      service.store.start_polling(config.poll_interval_s)
    try:
      yield
    finally:
      service.store.stop()
      await service.batcher.close()

  app = Starlette(routes=[Route("/v1/predict", guarded(predict), methods=["POST"]),
                          Route("/v1/metadata", guarded(metadata), methods=["GET"]),
                          Route("/health", health, methods=["GET"])],
                  exception_handlers={HTTPException: http_error}, lifespan=lifespan)
  app.state.service = service
  return app


def api_key_from_env(name: Optional[str]) -> Optional[str]:
  """The API key in environment variable `name` (None when no name is given)."""
  if not name:
    return None
  key = os.environ.get(name)
  if not key:
    raise ValueError(f"--api_key_env={name}: the environment variable {name} is not "
                     "set or empty")
  return key


def serve(export_dir: str, *, host: str = "127.0.0.1", port: int = 8080,
          config: ServerConfig = ServerConfig(), log_level: str = "info") -> None:
  """Serves `export_dir` with uvicorn until interrupted (binds loopback by default)."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  app = create_app(export_dir, config)
  log.info("serving %s on http://%s:%d", export_dir, host, port)
  uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
