"""The device side of serving: the one batch loop that merges every request's images into batches,
the models it loads for them, and where it runs (a thread of a single server, or the model process
for all workers)."""
