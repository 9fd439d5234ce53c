"""Which AdapterStore `--store` names: ``s3://bucket/prefix`` or a local directory."""

from __future__ import annotations

from adapters_store import LocalAdapterStore
from adapters_store.store import AdapterStore


def open_store(spec: str, *, refresh_s: float) -> AdapterStore:
    """S3 for ``s3://`` (endpoint and credentials from the usual AWS_* variables; boto3 is the
    optional extra ``s3``), else a local directory. ``refresh_s`` is how long an S3 replica
    may reuse an adapter record it read: the bound on seeing other replicas' writes."""
    if spec.startswith("s3://"):
        try:
            from adapters_store.s3 import S3AdapterStore, parse_s3_url
        except ImportError as e:  # pragma: no cover - only without the extra
            raise RuntimeError("--store s3://... needs boto3: pip install "
                               "'softprompt-server[s3]'") from e
        bucket, prefix = parse_s3_url(spec)
        return S3AdapterStore(bucket, prefix, record_ttl_s=refresh_s)
    return LocalAdapterStore(spec)
