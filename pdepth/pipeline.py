"""The old import path of the protocol: everything now lives in :mod:`pdepth.protocol`
(docs/protocol.md). Kept so that ``from pdepth.pipeline import ...`` keeps working."""

from __future__ import annotations

from .protocol import *  # noqa: F403 (the public names, the same list)
from .protocol import __all__  # noqa: F401 (re-exported as this module's)
