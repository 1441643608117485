"""Getting usage events into the store: the shared write path and the sources that feed it."""
