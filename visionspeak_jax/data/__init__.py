"""Where batches come from: data sources, the TFDS pipeline, the feature cache,
image files."""
