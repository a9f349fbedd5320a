"""The simulator's ``/v1/files``: ``POST /v1/files`` (multipart, ``purpose`` and ``file``),
``GET /v1/files`` (cursor pages: ``after``, ``limit``; ``order``, ``purpose``),
``GET /v1/files/{id}`` and ``GET /v1/files/{id}/content``; an upload over
``SimConfig.batch_max_file_bytes`` is refused (400). Batches (``dfbatch.sim.batches``) read
their input files here and write their output and error files here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dfbatch.sim.config import SimConfig


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data),
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed"}


class FileStore:
    """``/v1/files``: uploaded input files and the output / error files batches write."""

    def __init__(self, config: SimConfig, check_key: Callable[[web.Request], None]) -> None:
        self.config = config
        self._check_key = check_key
        self.by_id: dict[str, StoredFile] = {}

    def add(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        file = StoredFile(f"file-sim-{len(self.by_id) + 1}", filename, purpose, data,
                     int(time.time()))
        self.by_id[file.id] = file
        return file

    def get(self, file_id: str) -> StoredFile | None:
        return self.by_id.get(file_id)

    async def upload(self, request: web.Request, t: float) -> web.Response:
        self._check_key(request)
        form = await request.post()
        purpose, upload = form.get("purpose"), form.get("file")
        if not isinstance(upload, web.FileField):
            return error(400, "a multipart field 'file' is required", param="file")
        data = upload.file.read()
        limit = self.config.batch_max_file_bytes
        if len(data) > limit:
            msg = f"File is too large: {len(data)} bytes, the limit is {limit} bytes."
            return error(400, msg, param="file", code="file_too_large")
        file = self.add(upload.filename or "upload.jsonl", str(purpose or "batch"), data)
        return web.json_response(file.view())

    async def list_files(self, request: web.Request, t: float) -> web.Response:
        """Files, newest first (``order=asc``: oldest first), of one ``purpose`` if asked."""
        self._check_key(request)
        purpose = request.query.get("purpose")
        views = [f.view() for f in self.by_id.values() if purpose in (None, f.purpose)]
        if request.query.get("order", "desc") != "asc":
            views.reverse()
        return page(request, views)

    async def file(self, request: web.Request, t: float) -> web.Response:
        self._check_key(request)
        found = self.by_id.get(request.match_info["id"])
        return web.json_response(found.view()) if found else missing("file", request)

    async def content(self, request: web.Request, t: float) -> web.Response:
        self._check_key(request)
        found = self.by_id.get(request.match_info["id"])
        if found is None:
            return missing("file", request)
        return web.Response(body=found.data, content_type="application/octet-stream")


def error_body(message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": code}}


def error(status: int, message: str, *, param: str | None = None,
           code: str | None = None) -> web.Response:
    body = error_body(message, code)
    body["error"]["param"] = param
    return web.json_response(body, status=status)


def missing(kind: str, request: web.Request) -> web.Response:
    return error(404, f"No such {kind}: {request.match_info['id']}")


def page(request: web.Request, items: list[dict[str, Any]]) -> web.Response:
    """One cursor page (``after`` = the last id seen, ``limit``), OpenAI's list shape."""
    after = request.query.get("after")
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    limit = int(request.query.get("limit") or 20)
    page = items[:limit]
    return web.json_response({"object": "list", "data": page, "has_more": len(items) > limit,
                              "first_id": page[0]["id"] if page else None,
                              "last_id": page[-1]["id"] if page else None})

