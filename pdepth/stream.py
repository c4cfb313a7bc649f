"""The former module of :func:`pdepth.stream_prediction_depth`, now
:mod:`pdepth.depth.stream`: ``pdepth.stream`` is that module (registered under this name,
so ``from pdepth.stream import ...`` and patches of its attributes reach the one copy)."""

import sys

from .depth import stream as _stream

sys.modules[__name__] = _stream
