"""Session-cached tiny models (one per architecture) so the suite builds each only once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Lazily built: tiny_model_dirs["llama"] builds the Llama-shaped model on first access."""

    class _Lazy(dict):
        def __missing__(self, arch: str) -> Path:
            path = build_tiny_model(arch, tmp_path_factory.mktemp(f"model-{arch}"))
            self[arch] = path
            return path

    return _Lazy()
