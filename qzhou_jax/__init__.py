"""qzhou-jax: QZhou-Embedding training in JAX/Flax NNX."""

__version__ = "0.1.0"
