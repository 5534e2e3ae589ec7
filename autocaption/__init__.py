"""autocaption: describe photos with a local vision-language model."""

__version__ = "0.1.0"
