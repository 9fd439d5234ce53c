"""Property-based fuzzing of the OpenAPI schema against the real server: never a 5xx.

Bodies for POST /v1/generate are drawn from the schema the server publishes (/openapi.json):
each property either a value of its declared type (including out-of-range ones) or any JSON
value at all, plus unknown properties. Adapter ids in paths and query strings are arbitrary
text. Bounded by max_examples so the test stays well under a minute on 2 cores.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.server_process import ServerProcess

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                                      allow_infinity=False) \
    | st.text(max_size=50)
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def fuzz_server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    with ServerProcess(model_dir, root / "store", root / "server.log",
                       "--max-new-tokens-limit", "4", "--max-input-tokens", "64",
                       "--log-level", "warning") as proc:
        yield proc


@pytest.fixture(scope="module")
def fclient(fuzz_server):
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as c:
        yield c


def _typed(prop: dict) -> st.SearchStrategy:
    """A value of the property's declared JSON type, ignoring its bounds on purpose."""
    kinds = [p.get("type") for p in prop.get("anyOf", [prop])]
    options: list[st.SearchStrategy] = []
    for kind in kinds:
        options.append({"string": st.text(max_size=80), "integer": st.integers(-2**70, 2**70),
                        "number": st.floats(allow_nan=False, allow_infinity=False),
                        "boolean": st.booleans(), "null": st.none(),
                        "array": st.lists(st.text(max_size=10), max_size=20)}.get(kind, ANY_JSON))
    return st.one_of(options) if options else ANY_JSON


def _body_strategy(schema: dict) -> st.SearchStrategy:
    props = schema["properties"]
    fields = {name: st.one_of(_typed(prop), ANY_JSON) for name, prop in props.items()}
    known = st.fixed_dictionaries({}, optional=fields)
    return st.one_of(known, st.builds(lambda k, extra: extra | k, known,
                                      st.dictionaries(st.text(max_size=8), ANY_JSON,
                                                      max_size=3)), ANY_JSON)


def test_generate_bodies_from_the_schema_never_5xx(fclient):
    spec = fclient.get("/openapi.json").json()
    schema = spec["components"]["schemas"]["GenerateRequest"]

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(body=_body_strategy(schema))
    def check(body):
        r = fclient.post("/v1/generate", json=body)
        assert r.status_code < 500, (body, r.text[:300])
        if r.status_code >= 400:
            assert set(r.json()) == {"error"}

    check()


def test_adapter_paths_and_queries_never_5xx(fclient):
    @settings(max_examples=120, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(adapter_id=st.text(min_size=1, max_size=200), method=st.sampled_from(["GET", "DELETE"]),
           query=st.dictionaries(st.sampled_from(["tenant", "overwrite", "x"]),
                                 st.text(max_size=20), max_size=2))
    def check(adapter_id, method, query):
        r = fclient.request(method, "/v1/adapters/" + quote(adapter_id, safe=""), params=query)
        assert r.status_code < 500, (adapter_id, r.text[:300])
        r = fclient.get("/v1/adapters", params=query)
        assert r.status_code < 500, (query, r.text[:300])

    check()
