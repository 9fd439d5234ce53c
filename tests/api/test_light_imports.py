"""The HTTP layer loads without torch or transformers: the engine is imported where it is
built, so answering errors and health checks does not wait on (or pay for) the model's
libraries, and a process that only relays to an engine elsewhere need not carry them."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import server.api.app, server.api.errors, server.api.health
print(json.dumps(sorted(m for m in ("torch", "transformers") if m in sys.modules)))
"""


def test_the_api_package_imports_neither_torch_nor_transformers():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


REMOTE_PROBE = """
import json, sys
from server.config import Settings
from server.engine.factory import build_engine
build_engine(Settings(engine_process=True))  # built, not started: no child yet
print(json.dumps(sorted(m for m in ("server.engine.engine", "server.engine.model_loader",
                                    "server.engine.scheduler", "transformers.modeling_utils")
                        if m in sys.modules)))
"""


def test_the_http_process_of_an_engine_process_imports_no_model_code():
    """With --engine-process the HTTP process needs the tokenizer, not the in-process engine
    or the model classes (about 2 s of each start on a small machine)."""
    out = subprocess.run([sys.executable, "-c", REMOTE_PROBE], capture_output=True, text=True,
                         check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
