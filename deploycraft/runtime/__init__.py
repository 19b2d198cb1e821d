"""One interface over the runtimes: load a model, run a batch, time it."""
