"""etjax.models."""
