"""etjax.pallas."""
