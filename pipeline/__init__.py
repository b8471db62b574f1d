"""Data flow of greedy training: prepare, loaders, cache, train, eval."""
