"""/v1/adapters: upload (streamed multipart), list, get, delete. Parsing and storage are the
engine's (adapters_store's); this module only frames the upload and maps the record."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from server.api.deps import EngineDep, ListScopeDep, SettingsDep, TenantDep, get_access
from server.api.errors import InvalidUploadError, StorageQuotaError, error_responses
from server.api.quotas import Quotas, check_storage, quotas_for
from server.api.schemas import ADAPTER_ID_PATTERN, AdapterListResponse, AdapterResponse
from server.api.uploads import SpooledUpload, spool_multipart
from server.engine.errors import InvalidAdapterIdError
from server.engine.interface import AdapterRecord, AdapterUpload, EngineClient
from server.engine.prompt_layout import MAX_TEMPLATE_CHARS

router = APIRouter(tags=["adapters"])
_ID_RE = re.compile(ADAPTER_ID_PATTERN)

_UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["adapter_id"],
        "properties": {
            "adapter_id": {"type": "string", "pattern": ADAPTER_ID_PATTERN},
            "config": {"type": "string", "format": "binary",
                       "description": "adapter_config.json (with `weights`)"},
            "weights": {"type": "string", "format": "binary",
                        "description": "adapter_model.safetensors or adapter_model.bin"},
            "archive": {"type": "string", "format": "binary",
                        "description": "instead of config + weights: one .tar.gz/.tgz/.zip "
                                       "of a PEFT output directory"},
            "template": {"type": "string", "maxLength": MAX_TEMPLATE_CHARS,
                         "description": "optional P-tuning template placing the rows around "
                                        "the text: {soft:N} (N in ASCII digits), {soft}, "
                                        "{text} (once), {{ and }} for braces, anything else "
                                        "anchor text (no control characters but tab, newline "
                                        "and carriage return, no bidi overrides); default "
                                        "{soft}{text}"},
        },
    }}},
}


def check_adapter_id(adapter_id: str) -> str:
    if not _ID_RE.fullmatch(adapter_id):
        raise InvalidAdapterIdError(f"invalid adapter id {adapter_id!r}: must match "
                                    f"{ADAPTER_ID_PATTERN}")
    return adapter_id


def _to_upload(spooled: SpooledUpload) -> AdapterUpload:
    files = spooled.files
    template = spooled.fields.get("template")
    if "archive" in files:
        if "config" in files or "weights" in files:
            raise InvalidUploadError("send either 'archive' or 'config' + 'weights', not both")
        archive = files["archive"]
        return AdapterUpload(archive_path=archive.path, archive_name=archive.filename or None,
                             template=template)
    missing = [name for name in ("config", "weights") if name not in files]
    if missing:
        raise InvalidUploadError(
            f"missing file part(s) {', '.join(missing)}: send 'config' (adapter_config.json) "
            "and 'weights' (adapter_model.safetensors or .bin), or one 'archive'")
    weights = files["weights"]
    return AdapterUpload(config_path=files["config"].path, weights_path=weights.path,
                         weights_name=weights.filename or None, template=template)


async def _add_within_quota(engine: EngineClient, namespace: str, adapter_id: str,
                           upload: AdapterUpload, spooled: SpooledUpload, *, quotas: Quotas,
                           overwrite: bool) -> AdapterRecord:
    """Check max_adapters and max_stored_bytes before storing and again with the stored size
    (a new adapter over the limit is deleted again). A replacement cannot be undone, so it is
    checked beforehand against its uploaded size, an estimate of the stored one."""
    records = await engine.list_adapters(namespace)
    others = [r for r in records if r.adapter_id != adapter_id]
    replacing = overwrite and len(others) < len(records)
    stored = sum(r.stored_bytes or r.size_bytes for r in others)
    estimate = sum(f.size for f in spooled.files.values())
    check_storage(quotas, count=len(others), stored_bytes=stored,
                  new_bytes=estimate if replacing else 0, replacing=replacing)
    record = await engine.add_adapter(namespace, adapter_id, upload, overwrite=overwrite)
    try:
        check_storage(quotas, count=len(others), stored_bytes=stored,
                      new_bytes=record.stored_bytes or record.size_bytes, replacing=True)
    except StorageQuotaError:
        if not replacing:  # a replaced adapter's old version is gone; keep the new one
            await engine.delete_adapter(namespace, adapter_id)
            raise
    return record


@router.post(
    "/v1/adapters", status_code=201, response_model=AdapterResponse, summary="Upload an adapter",
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses=error_responses(400, 401, 409, 413, 422, 503),
)
async def upload_adapter(
    request: Request, engine: EngineDep, settings: SettingsDep, namespace: TenantDep,
    overwrite: Annotated[bool, Query(description="Replace an adapter with the same id.")] = False,
) -> JSONResponse:
    access = get_access(request)
    async with spool_multipart(request, max_file_bytes=settings.max_upload_bytes,
                               max_body_bytes=settings.max_upload_body_bytes,
                               max_parts=settings.max_upload_parts) as spooled:
        adapter_id = spooled.fields.get("adapter_id")
        if adapter_id is None:
            raise InvalidAdapterIdError("missing form field 'adapter_id'")
        access.adapter_id = check_adapter_id(adapter_id)
        upload = _to_upload(spooled)
        manager, quotas = quotas_for(request, namespace)
        async with manager.upload_lock(namespace):
            record = await _add_within_quota(engine, namespace, adapter_id, upload, spooled,
                                             quotas=quotas, overwrite=overwrite)
    return JSONResponse(AdapterResponse.from_record(record).model_dump(),
                        status_code=201)


@router.get("/v1/adapters", response_model=AdapterListResponse, summary="List adapters",
            responses=error_responses(401, 422, 503))
async def list_adapters(engine: EngineDep, scope: ListScopeDep) -> AdapterListResponse:
    """A tenant's own adapters; an admin without ?tenant= gets every tenant's, each with
    its `tenant`."""
    records = await engine.list_adapters(scope)
    adapters = sorted((AdapterResponse.from_record(r, with_tenant=scope is None)
                       for r in records), key=lambda a: (a.tenant or "", a.adapter_id))
    return AdapterListResponse(adapters=adapters)


@router.get("/v1/adapters/{adapter_id}", response_model=AdapterResponse,
            summary="Get an adapter's record",
            responses=error_responses(401, 404, 422, 503))
async def get_adapter(adapter_id: str, request: Request,
                      engine: EngineDep,
                      namespace: TenantDep) -> AdapterResponse:
    get_access(request).adapter_id = check_adapter_id(adapter_id)
    return AdapterResponse.from_record(await engine.get_adapter(namespace, adapter_id))


@router.delete("/v1/adapters/{adapter_id}", status_code=204, response_class=Response,
               summary="Delete an adapter", responses=error_responses(401, 404, 422, 503))
async def delete_adapter(adapter_id: str, request: Request,
                         engine: EngineDep,
                         namespace: TenantDep) -> Response:
    get_access(request).adapter_id = check_adapter_id(adapter_id)
    await engine.delete_adapter(namespace, adapter_id)
    return Response(status_code=204)
