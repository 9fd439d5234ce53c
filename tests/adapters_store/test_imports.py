"""adapters_store depends on torch, safetensors and the standard library only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "adapters_store"
ALLOWED = {"torch", "safetensors", "adapters_store", "__future__"}
# The S3 backend may use boto3, and only lazily (inside functions): see test below.
ALLOWED_LAZY = {"s3.py": {"boto3", "botocore"}}


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
                if top in ALLOWED_LAZY.get(path.name, ()):
                    continue
                if top not in ALLOWED and top not in sys.stdlib_module_names:
                    bad.append(f"{path.name}: {name}")
    assert bad == []


def test_importing_the_package_pulls_in_no_server_code():
    code = ("import sys, adapters_store; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'server', 'fastapi', 'starlette', 'transformers', 'peft', 'pydantic'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_boto3_is_imported_lazily_by_the_s3_backend_only():
    tree = ast.parse((PACKAGE / "s3.py").read_text())
    top_level = [a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names]
    top_level += [node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert not [n for n in top_level if n.split(".")[0] in ALLOWED_LAZY["s3.py"]]
    code = "import sys, adapters_store, adapters_store.s3; print('boto3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
