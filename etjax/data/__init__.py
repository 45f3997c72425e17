"""etjax.data."""
