"""jaxssl: large-batch self-supervised pretraining of image encoders in JAX/Flax."""

__version__ = '0.1.0'
