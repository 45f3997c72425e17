"""Transfer learning on a user's data: the roles of the rows (source, target, dev,
eval), the methods of `transfer.method` as recipes, and the job that runs them."""
