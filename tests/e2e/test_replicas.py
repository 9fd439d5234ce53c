"""Two replicas share one S3 bucket (a moto server on loopback): what one writes, the other
serves — uploads, overwrites and deletes — within the --store-refresh-s bound.

The bound is checked without timing anything: B's last read of a record came before A's
write began, so once --store-refresh-s has passed since the write was answered, B's very next
request must see it. Waiting longer (a slow machine) only makes that more certain."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.conftest import upload
from tests.e2e.server_process import ServerProcess, metric
from tests.moto_s3 import moto_s3_server

REFRESH_S = 1.0
HANG_S = 60  # a bound on each wait that only a hang reaches
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
    return httpx.post(url + "/v1/generate", json=body, timeout=HANG_S)


def _past_refresh(since: float) -> None:
    """Sleep until REFRESH_S has passed since `since` (a write's answer): every record B
    read before that write has expired by then."""
    time.sleep(max(0.0, since + REFRESH_S - time.monotonic()))


def _until(check, what: str) -> None:
    """Poll check() until true, bounded only against a hang."""
    deadline = time.monotonic() + HANG_S
    while not check():
        assert time.monotonic() < deadline, f"{what} not seen within {HANG_S} s"
        time.sleep(0.05)


def test_writes_through_one_replica_are_served_by_the_other(replicas, adapter_dirs):
    a, b = replicas
    assert _generate(b.url, "shared").status_code == 404  # B has now looked, and cached that
    with httpx.Client(base_url=a.url, timeout=HANG_S) as client:
        first_dir, second_dir = adapter_dirs["prompt_tuning"][0], adapter_dirs["p_tuning_mlp"][0]

        assert upload(client, "shared", first_dir).status_code == 201
        uploaded = time.monotonic()
        first = _generate(a.url, "shared").json()["token_ids"]
        _past_refresh(uploaded)
        served = _generate(b.url, "shared")
        assert served.status_code == 200, served.text
        assert served.json()["token_ids"] == first

        assert upload(client, "shared", second_dir, overwrite=True).status_code == 201
        replaced = time.monotonic()
        second = _generate(a.url, "shared").json()["token_ids"]
        assert second != first  # else the overwrite check below proves nothing
        _past_refresh(replaced)
        assert _generate(b.url, "shared").json()["token_ids"] == second

        assert client.delete("/v1/adapters/shared").status_code == 204
        deleted = time.monotonic()
        _past_refresh(deleted)
        # gone at once, and it stays gone: the deleted adapter is never served again
        for _ in range(5):
            assert _generate(b.url, "shared").status_code == 404
            assert httpx.get(b.url + "/v1/adapters/shared", timeout=HANG_S).status_code == 404


def test_stored_count_follows_the_other_replica(replicas, adapter_dirs):
    a, b = replicas
    with httpx.Client(base_url=a.url, timeout=HANG_S) as client:
        for i in range(3):
            assert upload(client, f"count-{i}", adapter_dirs["prompt_tuning"][0]).status_code \
                == 201
    # B's refresher counts once a period: the next count after the uploads is 3.
    _until(lambda: metric(httpx.get(b.url + "/metrics", timeout=HANG_S).text,
                          "softprompt_stored_adapters") == 3.0, "stored count")
    listed = httpx.get(b.url + "/v1/adapters", timeout=HANG_S).json()["adapters"]
    assert {r["adapter_id"] for r in listed} == {"count-0", "count-1", "count-2"}
