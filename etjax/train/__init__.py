"""etjax.train."""
