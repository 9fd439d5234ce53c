"""adapters_store depends on torch, safetensors and the standard library only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "adapters_store"
ALLOWED = {"torch", "safetensors", "adapters_store", "__future__"}


def test_only_allowed_top_level_imports():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                if top not in ALLOWED and top not in sys.stdlib_module_names:
                    bad.append(f"{path.name}: {name}")
    assert bad == []


def test_importing_the_package_pulls_in_no_server_code():
    code = ("import sys, adapters_store; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'server', 'fastapi', 'starlette', 'transformers', 'peft', 'pydantic'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
