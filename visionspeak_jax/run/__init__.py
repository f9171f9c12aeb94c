"""A run as a durable object: workdir, checkpoints, restore, config checks,
summaries."""
