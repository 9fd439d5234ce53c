"""The built-in models' names, apart from the code that builds them: checking --model at
startup must not import torch and transformers first (seconds before a typo is reported)."""

from __future__ import annotations

BUILTIN_PREFIX = "builtin:"
# Each built-in kind and the cache directory of its recipe: bump the suffix when the recipe
# changes.
BUILTIN_VERSIONS = {"tiny": "builtin-tiny-v1"}


def builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + k for k in sorted(BUILTIN_VERSIONS)]
