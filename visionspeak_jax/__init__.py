"""VisionSpeak-JAX: "Show, Attend and Tell" image captioning in JAX/Flax."""

__version__ = "0.1.0"
