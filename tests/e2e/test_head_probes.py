"""HEAD on the operational GET routes, through the real server: load and monitoring tools
probe with it (aiperf looks for the Prometheus scrape with HEAD /metrics), and a 405 there
reads as a server error in their reports."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("path", ["/metrics", "/health", "/healthz", "/readyz", "/version"])
def test_head_answers_as_get_does_without_a_body(client, path):
    get = client.get(path)
    head = client.head(path)
    assert (head.status_code, get.status_code) == (200, 200)
    assert head.content == b""
    assert head.headers.get("content-type") == get.headers.get("content-type")


def test_head_is_counted_as_such_and_not_documented(client):
    client.head("/metrics")
    scrape = client.get("/metrics").text
    assert 'endpoint="/metrics",method="HEAD",status="200"' in scrape
    assert 'method="HEAD",status="405"' not in scrape
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/metrics"]) == {"get"}
