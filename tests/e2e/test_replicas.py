"""Two replicas share one S3 bucket (a moto server on loopback): what one writes, the other
serves — uploads, overwrites and deletes — within the --store-refresh-s bound."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.conftest import upload
from tests.e2e.server_process import ServerProcess, metric
from tests.moto_s3 import moto_s3_server

REFRESH_S = 1.0
BOUND_S = REFRESH_S + 1.5  # the setting plus a request's own latency on a loaded 2-core box
STORE = "s3://shared-adapters/e2e"


@pytest.fixture(scope="module")
def replicas(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    with moto_s3_server() as moto:
        moto.client().create_bucket(Bucket="shared-adapters")
        mp = pytest.MonkeyPatch()
        for name, value in moto.env().items():
            mp.setenv(name, value)
        try:
            extra = ("--store-refresh-s", str(REFRESH_S))
            a = ServerProcess(model_dir, STORE, root / "a.log", *extra)  # type: ignore[arg-type]
            b = ServerProcess(model_dir, STORE, root / "b.log", *extra)  # type: ignore[arg-type]
            with a, b:
                yield a, b
        finally:
            mp.undo()


def _generate(url: str, adapter_id: str) -> httpx.Response:
    body = {"adapter_id": adapter_id, "text": "Tweet: fine. Label:", "max_new_tokens": 6}
    return httpx.post(url + "/v1/generate", json=body, timeout=30)


def _until(check, what: str, since: float) -> float:
    """Poll check() until true; the seconds it took since `since` (fails past BOUND_S)."""
    while True:
        if check():
            return time.monotonic() - since
        assert time.monotonic() - since < BOUND_S, f"{what} not seen within {BOUND_S} s"
        time.sleep(0.05)


def test_writes_through_one_replica_are_served_by_the_other(replicas, adapter_dirs):
    a, b = replicas
    assert _generate(b.url, "shared").status_code == 404  # B has now looked, and cached that
    with httpx.Client(base_url=a.url, timeout=60) as client:
        first_dir, second_dir = adapter_dirs["prompt_tuning"][0], adapter_dirs["p_tuning_mlp"][0]

        assert upload(client, "shared", first_dir).status_code == 201
        uploaded = time.monotonic()
        first = _generate(a.url, "shared").json()["token_ids"]
        _until(lambda: _generate(b.url, "shared").status_code == 200, "upload", uploaded)
        assert _generate(b.url, "shared").json()["token_ids"] == first

        assert upload(client, "shared", second_dir, overwrite=True).status_code == 201
        replaced = time.monotonic()
        second = _generate(a.url, "shared").json()["token_ids"]
        assert second != first  # else the overwrite check below proves nothing
        _until(lambda: _generate(b.url, "shared").json()["token_ids"] == second, "overwrite",
               replaced)

        assert client.delete("/v1/adapters/shared").status_code == 204
        deleted = time.monotonic()
        _until(lambda: _generate(b.url, "shared").status_code == 404, "delete", deleted)
        # and it stays gone: the deleted adapter is never served again
        for _ in range(5):
            assert _generate(b.url, "shared").status_code == 404
            assert httpx.get(b.url + "/v1/adapters/shared").status_code == 404


def test_stored_count_follows_the_other_replica(replicas, adapter_dirs):
    a, b = replicas
    with httpx.Client(base_url=a.url, timeout=60) as client:
        for i in range(3):
            assert upload(client, f"count-{i}", adapter_dirs["prompt_tuning"][0]).status_code \
                == 201
    done = time.monotonic()
    _until(lambda: metric(httpx.get(b.url + "/metrics").text,
                          "softprompt_stored_adapters") == 3.0, "stored count", done - REFRESH_S)
    assert {r["adapter_id"] for r in httpx.get(b.url + "/v1/adapters").json()["adapters"]} \
        == {"count-0", "count-1", "count-2"}
