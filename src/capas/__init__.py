"""capas: a lab for the effect of layers in convolutional networks."""

__version__ = "0.1.0"
