"""Commands beside training: caption images, the web demo, feature extraction."""
