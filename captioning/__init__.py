"""Core library of the captioning service: data formats, models, decoding, metrics, model store.

Import layering (see docs/ARCHITECTURE.md): ``captioning`` imports neither ``training`` nor ``service``.
"""

__version__ = "0.1.0"
