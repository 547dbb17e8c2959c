"""capfilt: BLIP-style CapFilt for web-scale image-text data."""

__version__ = "0.1.0"
