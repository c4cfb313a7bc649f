"""The old import path of the protocol: everything now lives in :mod:`pdepth.protocol`
(docs/protocol.md). Kept so that ``from pdepth.pipeline import ...`` keeps working."""

from __future__ import annotations

from ._atomic import TMP_NAME as _TMP_NAME
from ._atomic import json_default as _json_default
from ._atomic import savez as _atomic_savez
from ._atomic import write_bytes as _atomic_write_bytes
from ._atomic import write_json as _atomic_json
from .protocol import *  # noqa: F403 (the public names, the same list)
from .protocol import __all__  # noqa: F401 (re-exported as this module's)
from .protocol.config import DEVICE as _DEVICE
from .protocol.config import RUNTIME_KEYS as _RUNTIME_KEYS
from .protocol.config import rank_settings as _rank_settings
from .protocol.config import resolve_device as _resolve_device
from .protocol.outdir import MODEL_ARRAYS as _MODEL_ARRAYS
from .protocol.outdir import MODEL_NAME as _MODEL_NAME
from .protocol.outdir import check_output as _check_output
from .protocol.outdir import foreign_entries as _foreign_entries
from .protocol.outdir import is_pdepth_name as _is_pdepth_name
from .protocol.outdir import load_model_file as _load_model_file
from .protocol.outdir import model_path as _model_path
from .protocol.outdir import read_marker as _read_marker
from .protocol.outdir import remove_pdepth_files as _remove_pdepth_files
from .protocol.runner import load_run_data as _load_run_data
from .protocol.train import predict as _predict

# The private names the old module had, for code that reached into it.
_PRIVATE = (_TMP_NAME, _json_default, _atomic_savez, _atomic_write_bytes, _atomic_json, _DEVICE,
            _RUNTIME_KEYS, _rank_settings, _resolve_device, _MODEL_ARRAYS, _MODEL_NAME,
            _check_output, _foreign_entries, _is_pdepth_name, _load_model_file, _model_path,
            _read_marker, _remove_pdepth_files, _load_run_data, _predict)
