"""etjax.sharding."""
