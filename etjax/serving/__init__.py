"""etjax.serving: export of trained classifiers (jax.export), a loader over jax alone,
and the HTTP prediction service.

Submodules are imported on use: `etjax.serving.loader` needs neither flax nor the model
code, `export` needs the training stack, `server` needs starlette and uvicorn.
"""
