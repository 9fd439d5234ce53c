"""Dies (os._exit) right after a put has written its version objects, before the pointer.

Run as ``python s3_crash_writer.py ENDPOINT BUCKET PREFIX``: the S3 client it hands the store
forwards every call to moto over HTTP, except that the first PUT of a pointer kills the process,
as a node failure between the two steps would.
"""

from __future__ import annotations

import os
import sys

import boto3

from adapters_store.s3 import S3AdapterStore
from tests.adapters_store.helpers import make_parsed


class DieBeforePointer:
    def __init__(self, client) -> None:
        self._client = client

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def put_object(self, **kwargs):
        if "/adapters/" in kwargs["Key"]:
            os._exit(17)
        return self._client.put_object(**kwargs)


def main() -> None:
    endpoint, bucket, prefix = sys.argv[1:4]
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    store = S3AdapterStore(bucket, prefix, client=DieBeforePointer(client))
    store.put("t", "a", make_parsed(seed=99), overwrite=True)
    os._exit(0)  # not reached: the pointer PUT kills the process


if __name__ == "__main__":
    main()
