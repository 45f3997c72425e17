"""etjax.algorithms."""
