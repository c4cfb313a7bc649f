"""The errors of ``pdepth run`` / ``pdepth report`` that a user can fix, and the check for
optional dependencies (the CLI reports these as one line, exit status 2)."""

from __future__ import annotations

import importlib

__all__ = ["INSTALL_HINT", "DiskSpaceError", "MissingDependencyError", "ModelFileError", "OutputExistsError",
           "require_modules"]

INSTALL_HINT = 'pip install "pdepth[run]"'


class OutputExistsError(RuntimeError):
    """The output directory cannot be used as it is: it holds results, other settings or
    files pdepth did not write."""


class ModelFileError(OutputExistsError):
    """A per-model file of an unfinished run is unreadable or is not the model its name
    says."""


class DiskSpaceError(OSError):
    """The embedding cache of a run would not fit the free disk space (checked before any
    training)."""


class MissingDependencyError(ImportError):
    """An optional dependency of ``pdepth run`` / ``pdepth report`` is not installed."""


def require_modules(modules, what: str, hint: str = INSTALL_HINT) -> None:
    """Raises :class:`MissingDependencyError` naming every module of ``modules`` that cannot
    be imported (and ``hint``, how to install them), so that a run fails before any work
    instead of half-way."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"{what} needs {', '.join(missing)}, not installed: {hint}")
