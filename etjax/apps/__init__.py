"""The AppZoo: NLP applications behind `etjax app` (see etjax.apps.registry)."""
