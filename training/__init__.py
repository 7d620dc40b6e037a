"""The training package. It imports ``captioning`` first: that sets torch's OpenMP spin before any module here loads
torch (``captioning/__init__.py``)."""

import captioning  # noqa: F401
