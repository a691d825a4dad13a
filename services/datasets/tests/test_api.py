"""The datasets API as a user sees it: upload each format, watch it become ready, preview, filter, profile,
download, version, share; bad input refused and nothing left behind; other users see only what is shared."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import time
import uuid
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xlsxwriter
from pydantic import BaseModel, ConfigDict

from strata.common.contracts.auth import Role
from strata.common.contracts.datasets import ResolveRequest, ResolveResponse
from strata.common.contracts.realtime import ReadCheck, ReadVerdict, SharedWith, SharedWithRequest
from strata.common.errors import RemoteError
from strata.common.rpc import RpcClient
from strata.common.testing import TokenFactory, app_client
from strata.datasets.app import create_app
from strata.datasets.config import Settings

TOKENS = TokenFactory()
OWNER = TOKENS.headers(user_id="11111111-1111-1111-1111-111111111111", role="analyst", ttl_s=3600)
OTHER = TOKENS.headers(user_id="22222222-2222-2222-2222-222222222222", role="analyst", ttl_s=3600)
VIEWER = TOKENS.headers(user_id="33333333-3333-3333-3333-333333333333", role="viewer", ttl_s=3600)
ADMIN = TOKENS.headers(user_id="44444444-4444-4444-4444-444444444444", role="admin", ttl_s=3600)
OWNER_ID = "11111111-1111-1111-1111-111111111111"
OTHER_ID = "22222222-2222-2222-2222-222222222222"
VIEWER_ID = "33333333-3333-3333-3333-333333333333"
ADMIN_ID = "44444444-4444-4444-4444-444444444444"


def calls_csv(n: int = 500) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["agent", "region", "issue_type", "duration_s", "rating", "resolved", "started_at"])
    for i in range(n):
        writer.writerow(
            [
                f"agent{i % 7}",
                ["eu", "us", "apac"][i % 3],
                ["billing", "tech"][i % 2],
                30 + i % 300,
                i % 5 + 1,
                "true" if i % 4 else "false",
                f"2026-01-{1 + i % 28:02d} 10:{i % 60:02d}:00",
            ]
        )
    return out.getvalue().encode()


@dataclass
class Ctx:
    client: httpx.AsyncClient
    settings: Settings
    storage_objects: Any  # () -> set of keys in storage

    async def upload(
        self, filename: str, data: bytes, headers: dict[str, str] = OWNER, **fields: str
    ) -> httpx.Response:
        files = {"file": (filename, data, "application/octet-stream")}
        return await self.client.post("/api/v1/datasets", data=fields, files=files, headers=headers)

    async def profile(self, dataset_id: str, timeout_s: float = 30) -> dict[str, Any]:
        """The profile, which follows ``ready`` (409 PROFILE_NOT_READY with Retry-After until then)."""
        deadline = time.monotonic() + timeout_s
        while True:
            resp = await self.client.get(f"/api/v1/datasets/{dataset_id}/profile", headers=OWNER)
            if resp.status_code == 200:
                body: dict[str, Any] = resp.json()
                return body
            assert resp.status_code == 409 and resp.json()["error"]["code"] == "PROFILE_NOT_READY", resp.text
            assert resp.headers["retry-after"] == "2"
            assert time.monotonic() < deadline, "no profile"
            await asyncio.sleep(0.1)

    async def wait(self, dataset_id: str, headers: dict[str, str] = OWNER, timeout_s: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            body: dict[str, Any] = (await self.client.get(f"/api/v1/datasets/{dataset_id}", headers=headers)).json()
            if body.get("status") in ("ready", "failed"):
                return body
            await asyncio.sleep(0.1)
        raise AssertionError(f"dataset {dataset_id} still processing after {timeout_s}s")


@pytest.fixture(params=["local", "s3"])
async def ctx(request: pytest.FixtureRequest, tmp_path: Path, nats_url: str) -> AsyncIterator[Ctx]:
    extra: dict[str, Any] = {}
    if request.param == "s3":
        endpoint: str = request.getfixturevalue("s3_server")
        bucket = f"strata-{uuid.uuid4().hex[:10]}"
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
        )
        s3.create_bucket(Bucket=bucket)
        extra = {"storage_url": f"s3://{bucket}/strata", "s3_endpoint_url": endpoint, "s3_region": "us-east-1"}

        def objects() -> set[str]:
            listed = s3.list_objects_v2(Bucket=bucket, Prefix="strata/")
            return {o["Key"].removeprefix("strata/") for o in listed.get("Contents", [])}
    else:
        root = tmp_path / "storage"

        def objects() -> set[str]:
            return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()

    settings = Settings(data_dir=tmp_path, nats_url=nats_url, max_upload_bytes=2 * 1024 * 1024, **extra)
    app = create_app(settings)
    TOKENS.install(app)
    import os

    if request.param == "s3":
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    async with app_client(app, timeout=30) as client:
        yield Ctx(client, settings, objects)


async def test_csv_upload_to_ready_preview_profile_download(ctx: Ctx) -> None:
    data = calls_csv()
    resp = await ctx.upload("calls.csv", data, name="Support calls", description="Q1")
    assert resp.status_code == 202, resp.text
    created = resp.json()
    assert created["status"] == "processing" and created["permission"] == "owner"
    ready = await ctx.wait(created["id"])
    assert ready["status"] == "ready", ready
    assert ready["row_count"] == 500
    assert [c["name"] for c in ready["columns"]][:3] == ["agent", "region", "issue_type"]
    base = f"/api/v1/datasets/{created['id']}"

    manifest = (await ctx.client.get(base + "/manifest", headers=OWNER)).json()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() and manifest["rows"] == 500
    assert "@" not in manifest["storage_url"] and "secret" not in manifest["storage_url"].lower()  # no credentials

    profile = await ctx.profile(created["id"])
    assert profile["rows"] == 500

    preview = await ctx.client.get(
        base + "/preview",
        headers=OWNER,
        params=[
            ("filter", "region:eq:eu"),
            ("filter", "rating:gte:4"),
            ("sort", "-duration_s,agent"),
            ("limit", "10"),
            ("columns", "agent,region,rating,duration_s"),
        ],
    )
    assert preview.status_code == 200, preview.text
    body = preview.json()
    assert [c["name"] for c in body["columns"]] == ["agent", "region", "rating", "duration_s"]
    assert len(body["data"]) == 10
    assert all(row[1] == "eu" and row[2] >= 4 for row in body["data"])
    durations = [row[3] for row in body["data"]]
    assert durations == sorted(durations, reverse=True)

    options = (await ctx.client.get(base + "/options", headers=OWNER, params={"column": "region"})).json()
    assert {o["value"]: o["count"] for o in options["data"]} == {"eu": 167, "us": 167, "apac": 166}

    original = await ctx.client.get(base + "/download", headers=OWNER, params={"format": "original"})
    assert original.content == data
    parquet = await ctx.client.get(base + "/download", headers=OWNER, params={"format": "parquet"})
    assert pq.read_table(io.BytesIO(parquet.content)).num_rows == 500
    as_csv = await ctx.client.get(base + "/download", headers=OWNER, params={"format": "csv"})
    assert as_csv.status_code == 200 and len(as_csv.text.strip().splitlines()) == 501
    as_json = await ctx.client.get(base + "/download", headers=OWNER, params={"format": "json"})
    assert len(json.loads(as_json.content)) == 500


def xlsx_bytes() -> bytes:
    buffer = io.BytesIO()
    book = xlsxwriter.Workbook(buffer, {"in_memory": True})
    sheet = book.add_worksheet("calls")
    sheet.write_row(0, 0, ["agent", "rating"])
    for i in range(1, 51):
        sheet.write_row(i, 0, [f"a{i}", i % 5])
    book.close()
    return buffer.getvalue()


def parquet_bytes() -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"x": list(range(100)), "y": [f"v{i}" for i in range(100)]}), sink)
    return sink.getvalue()


@pytest.mark.parametrize(
    "filename, data, rows",
    [
        ("calls.tsv", b"agent\trating\na\t1\nb\t2\n", 2),
        ("calls.json", json.dumps([{"agent": "a", "rating": 1}, {"agent": "b", "rating": None}]).encode(), 2),
        ("calls.ndjson", b'{"agent": "a", "rating": 1}\n{"agent": "b", "rating": 2}\n{"agent": "c"}\n', 3),
        ("calls.parquet", parquet_bytes(), 100),
        ("calls.xlsx", xlsx_bytes(), 50),
        ("semicolons.csv", b"a;b\n1;x\n2;y\n", 2),
    ],
)
async def test_every_format_becomes_ready(ctx: Ctx, filename: str, data: bytes, rows: int) -> None:
    resp = await ctx.upload(filename, data)
    assert resp.status_code == 202, resp.text
    ready = await ctx.wait(resp.json()["id"])
    assert ready["status"] == "ready", ready
    assert ready["row_count"] == rows


def zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("xl/worksheets/sheet1.xml", b"0" * 50_000_000)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "filename, data, line, words",
    [
        ("ragged.csv", b"a,b,c\n1,2,3\n4,5\n6,7,8\n", 3, "fields"),
        ("latin.csv", "name,city\nJosé,Zürich\n".encode("latin-1"), None, "encoding"),
        ("cut.json", b'[{"a": 1}, {"a": 2}', None, "cut off"),
        ("bomb.xlsx", zip_bomb(), None, "zip bomb"),
    ],
)
async def test_bad_content_fails_with_a_reason(
    ctx: Ctx, filename: str, data: bytes, line: int | None, words: str
) -> None:
    resp = await ctx.upload(filename, data)
    assert resp.status_code == 202, resp.text
    failed = await ctx.wait(resp.json()["id"])
    assert failed["status"] == "failed"
    assert words in failed["error"]["message"]
    if line is not None:
        assert failed["error"]["line"] == line
    preview = await ctx.client.get(f"/api/v1/datasets/{failed['id']}/preview", headers=OWNER)
    assert preview.status_code == 409 and preview.json()["error"]["code"] == "DATASET_NOT_READY"


@pytest.mark.parametrize(
    "filename, data, fields, status, code",
    [
        ("empty.csv", b"", {}, 400, "EMPTY_FILE"),
        ("binary.csv", b"\x00\x01\x02\x03" * 100, {}, 415, "CONTENT_DOES_NOT_MATCH_FORMAT"),
        ("../../etc/passwd.csv", b"a\n1\n", {}, 400, "INVALID_FILENAME"),
        ("big.csv", b"a\n" + b"1\n" * 1_100_000, {}, 413, "FILE_TOO_LARGE"),
        ("ok.csv", b"a\n1\n", {"name": "x" * 201}, 400, "BAD_REQUEST"),
        ("ok.csv", b"a\n1\n", {"options": "{not json"}, 422, "VALIDATION_ERROR"),
        ("ok.csv", b"a\n1\n", {"options": '{"evil": 1}'}, 422, "VALIDATION_ERROR"),
        ("data.exe", b"MZ", {}, 415, "UNSUPPORTED_FORMAT"),
    ],
)
async def test_bad_uploads_are_refused_and_leave_nothing(
    ctx: Ctx, filename: str, data: bytes, fields: dict[str, str], status: int, code: str
) -> None:
    resp = await ctx.upload(filename, data, **fields)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    assert ctx.storage_objects() == set()
    listed = (await ctx.client.get("/api/v1/datasets", headers=OWNER)).json()
    assert listed["data"] == []


async def test_filters_refuse_bad_columns_and_values_and_bind_sql(ctx: Ctx) -> None:
    created = (await ctx.upload("calls.csv", calls_csv(60))).json()
    await ctx.wait(created["id"])
    base = f"/api/v1/datasets/{created['id']}/preview"
    for params, code in [
        ({"filter": "nope:eq:1"}, "UNKNOWN_COLUMN"),
        ({"filter": "rating:gte:high"}, "INVALID_FILTER_VALUE"),
        ({"sort": "nope"}, "UNKNOWN_COLUMN"),
    ]:
        resp = await ctx.client.get(base, headers=OWNER, params=params)
        assert resp.status_code == 422 and resp.json()["error"]["code"] == code, resp.text
    injected = await ctx.client.get(base, headers=OWNER, params={"filter": "agent:eq:'; DROP TABLE x; --"})
    assert injected.status_code == 200 and injected.json()["data"] == []
    assert (await ctx.client.get(base, headers=OWNER)).status_code == 200


async def test_other_users_see_only_what_is_shared(ctx: Ctx) -> None:
    created = (await ctx.upload("calls.csv", calls_csv(30), name="private calls")).json()
    await ctx.wait(created["id"])
    base = f"/api/v1/datasets/{created['id']}"
    for method, path in [
        ("GET", ""),
        ("GET", "/preview"),
        ("GET", "/download"),
        ("GET", "/profile"),
        ("DELETE", ""),
        ("PATCH", ""),
        ("GET", "/shares"),
    ]:
        resp = await ctx.client.request(
            method, base + path, headers=OTHER, json={"name": "x"} if method == "PATCH" else None
        )
        assert resp.status_code == 404, (method, path, resp.text)
        assert resp.json()["error"]["code"] == "DATASET_NOT_FOUND"
    assert (await ctx.client.get("/api/v1/datasets", headers=OTHER)).json()["data"] == []

    share = await ctx.client.post(base + "/shares", headers=OWNER, json={"user_id": OTHER_ID, "permission": "read"})
    assert share.status_code == 201, share.text
    listed = (await ctx.client.get("/api/v1/datasets", headers=OTHER)).json()["data"]
    assert [d["id"] for d in listed] == [created["id"]] and listed[0]["permission"] == "read"
    assert (await ctx.client.get(base + "/preview", headers=OTHER)).status_code == 200
    assert (await ctx.client.delete(base, headers=OTHER)).status_code == 403
    assert (await ctx.client.patch(base, headers=OTHER, json={"name": "mine now"})).status_code == 403
    # A share to a role reaches everyone with that role (or a stronger one); viewers stay out of analyst shares.
    await ctx.client.post(base + "/shares", headers=OWNER, json={"role": "analyst", "permission": "write"})
    assert (await ctx.client.get(base, headers=VIEWER)).status_code == 404
    assert (await ctx.client.patch(base, headers=OTHER, json={"tags": ["shared"]})).status_code == 200
    bad = await ctx.client.post(base + "/shares", headers=OWNER, json={"user_id": OTHER_ID, "role": "viewer"})
    assert bad.status_code == 422


async def test_versions_and_delete(ctx: Ctx) -> None:
    created = (await ctx.upload("calls.csv", calls_csv(10))).json()
    await ctx.wait(created["id"])
    base = f"/api/v1/datasets/{created['id']}"
    v2 = await ctx.client.post(
        base + "/versions", headers=OWNER, files={"file": ("calls.csv", calls_csv(20), "text/csv")}
    )
    assert v2.status_code == 202 and v2.json()["version"] == 2
    deadline = time.monotonic() + 30
    while (await ctx.client.get(base, headers=OWNER)).json()["version"] != 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert (await ctx.client.get(base, headers=OWNER)).json()["row_count"] == 20
    old = await ctx.client.get(base + "/preview", headers=OWNER, params={"version": 1, "limit": 100})
    assert len(old.json()["data"]) == 10
    versions = (await ctx.client.get(base + "/versions", headers=OWNER)).json()["data"]
    assert [v["version"] for v in versions] == [2, 1]
    assert any(k.startswith(f"datasets/{created['id']}/") for k in ctx.storage_objects())

    assert (await ctx.client.delete(base, headers=OWNER)).status_code == 204
    assert (await ctx.client.get(base, headers=OWNER)).status_code == 404
    deadline = time.monotonic() + 20
    while any(k.startswith(f"datasets/{created['id']}/") for k in ctx.storage_objects()):
        assert time.monotonic() < deadline, ctx.storage_objects()
        await asyncio.sleep(0.1)


async def test_resolve_over_nats(ctx: Ctx, bus: Any) -> None:
    from strata.common.rpc import RpcClient

    created = (await ctx.upload("calls.csv", calls_csv(10), name="calls")).json()
    await ctx.wait(created["id"])
    client = RpcClient(bus)
    mine = await client.call(
        "datasets",
        "resolve",
        ResolveRequest(user_id=OWNER_ID, role=Role.analyst, refs=["calls", created["id"], "nope"]),
        ResolveResponse,
        timeout_s=5,
    )
    assert [t.dataset_id for t in mine.tables] == [created["id"], created["id"]] and mine.missing == ["nope"]
    assert mine.tables[0].rows == 10 and mine.tables[0].columns
    theirs = await client.call(
        "datasets",
        "resolve",
        ResolveRequest(user_id=OTHER_ID, role=Role.analyst, refs=[created["id"], f"{OWNER_ID}.calls"]),
        ResolveResponse,
        timeout_s=5,
    )
    assert theirs.tables == [] and len(theirs.missing) == 2


class RawRequest(BaseModel):
    """Any JSON object, to send what the real request models would refuse to build."""

    model_config = ConfigDict(extra="allow")


@pytest.mark.parametrize("ctx", ["local"], indirect=True)  # the subject is who may read, not where the files are
async def test_can_read_over_nats_agrees_with_the_api(ctx: Ctx, bus: Any) -> None:
    """``rpc.datasets.can_read`` (the WebSocket's ``dataset:<id>`` channel) answers as ``GET /datasets/{id}`` does."""
    created = (await ctx.upload("calls.csv", calls_csv(10), name="calls")).json()
    await ctx.wait(created["id"])
    dataset_id, base = created["id"], f"/api/v1/datasets/{created['id']}"
    client = RpcClient(bus)

    async def verdict(user_id: str, role: Role, resource_id: str = dataset_id) -> ReadVerdict:
        check = ReadCheck(user_id=user_id, role=role, resource_id=resource_id)
        return await client.call("datasets", "can_read", check, ReadVerdict, timeout_s=5)

    async def api_status(headers: dict[str, str]) -> int:
        return (await ctx.client.get(base, headers=headers)).status_code

    readable = ReadVerdict(readable=True, owner_id=OWNER_ID)
    refused = ReadVerdict(readable=False)
    assert await verdict(OWNER_ID, Role.analyst) == readable
    assert await verdict(ADMIN_ID, Role.admin) == readable and await api_status(ADMIN) == 200
    assert await verdict(OTHER_ID, Role.analyst) == refused and await api_status(OTHER) == 404
    assert await verdict(VIEWER_ID, Role.viewer) == refused and await api_status(VIEWER) == 404

    to_other = await ctx.client.post(base + "/shares", headers=OWNER, json={"user_id": OTHER_ID, "permission": "read"})
    assert to_other.status_code == 201, to_other.text
    assert await verdict(OTHER_ID, Role.analyst) == readable and await api_status(OTHER) == 200
    # A role share reaches that role and stronger ones: a viewer share reaches analysts, an analyst share not viewers.
    await ctx.client.post(base + "/shares", headers=OWNER, json={"role": "analyst", "permission": "read"})
    assert await verdict(VIEWER_ID, Role.viewer) == refused and await api_status(VIEWER) == 404
    assert await verdict("55555555-5555-5555-5555-555555555555", Role.analyst) == readable
    to_viewers = await ctx.client.post(base + "/shares", headers=OWNER, json={"role": "viewer", "permission": "read"})
    assert await verdict(VIEWER_ID, Role.viewer) == readable and await api_status(VIEWER) == 200
    # Removing a share takes the access away (the gateway asks again then).
    removed = await ctx.client.delete(f"{base}/shares/{to_viewers.json()['id']}", headers=OWNER)
    assert removed.status_code == 204
    assert await verdict(VIEWER_ID, Role.viewer) == refused and await api_status(VIEWER) == 404

    for unknown in ("not-a-uuid", str(uuid.uuid4()), "x" * 64):
        assert await verdict(OWNER_ID, Role.analyst, unknown) == refused
        assert await verdict(ADMIN_ID, Role.admin, unknown) == refused
    assert (await ctx.client.delete(base, headers=OWNER)).status_code == 204
    for user_id, role in ((OWNER_ID, Role.analyst), (OTHER_ID, Role.analyst), (ADMIN_ID, Role.admin)):
        assert await verdict(user_id, role) == refused  # deleted

    for bad in (
        RawRequest(user_id=OWNER_ID, resource_id=dataset_id),
        RawRequest(user_id=OWNER_ID, role="superuser", resource_id=dataset_id),
        RawRequest(user_id=OWNER_ID, role="analyst", resource_id=""),
    ):
        with pytest.raises(RemoteError) as caught:
            await client.call("datasets", "can_read", bad, ReadVerdict, timeout_s=5)
        assert caught.value.status == 422 and caught.value.code == "VALIDATION_ERROR", caught.value


@pytest.mark.parametrize("ctx", ["local"], indirect=True)
async def test_shared_with_over_nats(ctx: Ctx, bus: Any) -> None:
    """``rpc.datasets.shared_with`` (the WebSocket's ``user`` channel): what is shared with the user or a role they
    hold or exceed, never their own or deleted ones, by id, at most ``limit``."""
    ids: dict[str, str] = {}
    for name, headers in (
        ("to_other", OWNER),
        ("to_viewers", OWNER),
        ("to_admins", OWNER),
        ("deleted", OWNER),
        ("private", OWNER),
        ("others_own", OTHER),
    ):
        ids[name] = (await ctx.upload("calls.csv", calls_csv(5), headers=headers, name=name)).json()["id"]
    for name, dataset_id in ids.items():
        await ctx.wait(dataset_id, headers=OTHER if name == "others_own" else OWNER)
    shares = [
        ("to_other", OWNER, {"user_id": OTHER_ID}),
        ("to_viewers", OWNER, {"role": "viewer"}),
        ("to_admins", OWNER, {"role": "admin"}),
        ("deleted", OWNER, {"user_id": OTHER_ID}),
        ("others_own", OTHER, {"role": "analyst"}),  # reaches its owner's role: still not "shared with" them
    ]
    for name, headers, grantee in shares:
        resp = await ctx.client.post(
            f"/api/v1/datasets/{ids[name]}/shares", headers=headers, json={**grantee, "permission": "read"}
        )
        assert resp.status_code == 201, resp.text
    assert (await ctx.client.delete(f"/api/v1/datasets/{ids['deleted']}", headers=OWNER)).status_code == 204
    client = RpcClient(bus)

    async def shared(user_id: str, role: Role, **extra: int) -> SharedWith:
        request = SharedWithRequest(user_id=user_id, role=role, **extra)
        return await client.call("datasets", "shared_with", request, SharedWith, timeout_s=5)

    expected = sorted([ids["to_other"], ids["to_viewers"]])
    assert await shared(OTHER_ID, Role.analyst) == SharedWith(dataset_ids=expected, truncated=False)
    assert await shared(VIEWER_ID, Role.viewer) == SharedWith(dataset_ids=[ids["to_viewers"]])
    assert await shared(OWNER_ID, Role.analyst) == SharedWith(dataset_ids=[ids["others_own"]])
    admin = await shared(ADMIN_ID, Role.admin)
    assert admin.dataset_ids == sorted([ids["to_viewers"], ids["to_admins"], ids["others_own"]])
    assert await shared(OTHER_ID, Role.analyst, limit=1) == SharedWith(dataset_ids=expected[:1], truncated=True)
    assert await shared(OTHER_ID, Role.analyst, limit=2) == SharedWith(dataset_ids=expected, truncated=False)
    # The API lists the same shared datasets (and the user's own).
    listed = (await ctx.client.get("/api/v1/datasets", headers=OTHER)).json()["data"]
    assert sorted(d["id"] for d in listed if d["permission"] != "owner") == expected

    for bad in (
        RawRequest(user_id=OTHER_ID),
        RawRequest(user_id=OTHER_ID, role="superuser"),
        RawRequest(user_id=OTHER_ID, role="analyst", limit=0),
        RawRequest(user_id=OTHER_ID, role="analyst", limit=10_001),
    ):
        with pytest.raises(RemoteError) as caught:
            await client.call("datasets", "shared_with", bad, SharedWith, timeout_s=5)
        assert caught.value.status == 422 and caught.value.code == "VALIDATION_ERROR", caught.value


async def test_presigned_upload_straight_to_storage(ctx: Ctx) -> None:
    data = calls_csv(50)
    begin = await ctx.client.post(
        "/api/v1/datasets/uploads", headers=OWNER, json={"filename": "big.csv", "size": len(data), "name": "direct"}
    )
    if not ctx.settings.storage_url.startswith("s3://"):
        assert begin.status_code == 409 and begin.json()["error"]["code"] == "PRESIGNED_UNSUPPORTED"
        assert (await ctx.client.get("/api/v1/datasets", headers=OWNER)).json()["data"] == []
        return
    assert begin.status_code == 201, begin.text
    started = begin.json()
    complete = started["complete_url"]
    early = await ctx.client.post(complete, headers=OWNER)
    assert early.status_code == 409 and early.json()["error"]["code"] == "UPLOAD_NOT_RECEIVED"
    async with httpx.AsyncClient() as s3:
        assert (await s3.put(started["url"], content=data)).status_code == 200
    assert (await ctx.client.post(complete, headers=OTHER)).status_code == 404  # not theirs
    done = await ctx.client.post(complete, headers=OWNER)
    assert done.status_code == 202 and done.json()["status"] == "processing"
    ready = await ctx.wait(started["dataset_id"])
    assert ready["status"] == "ready" and ready["row_count"] == 50
    manifest = (await ctx.client.get(f"/api/v1/datasets/{started['dataset_id']}/manifest", headers=OWNER)).json()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert (await ctx.client.post(complete, headers=OWNER)).status_code == 404  # completed once


async def test_presigned_upload_bad_input(ctx: Ctx) -> None:
    too_big = await ctx.client.post(
        "/api/v1/datasets/uploads", headers=OWNER, json={"filename": "x.csv", "size": 10**12}
    )
    assert too_big.status_code == 413
    for body in ({"filename": "../x.csv", "size": 10}, {"filename": "x.exe", "size": 10}, {"filename": "x.csv"}):
        resp = await ctx.client.post("/api/v1/datasets/uploads", headers=OWNER, json=body)
        assert resp.status_code in (400, 415, 422), (body, resp.text)
    if not ctx.settings.storage_url.startswith("s3://"):
        return
    started = (
        await ctx.client.post("/api/v1/datasets/uploads", headers=OWNER, json={"filename": "small.csv", "size": 10})
    ).json()
    async with httpx.AsyncClient() as s3:
        await s3.put(started["url"], content=calls_csv(50))  # larger than declared: a presigned PUT cannot stop it
    resp = await ctx.client.post(started["complete_url"], headers=OWNER)
    assert resp.status_code == 413
    assert ctx.storage_objects() == set()
    assert (await ctx.client.get(f"/api/v1/datasets/{started['dataset_id']}", headers=OWNER)).status_code == 404


async def test_an_upload_cut_off_mid_stream_leaves_nothing(tmp_path: Path, nats_url: str) -> None:
    from strata.common.testing import serve_app

    settings = Settings(data_dir=tmp_path, nats_url=nats_url)
    app = create_app(settings)
    TOKENS.install(app)
    boundary = "cutoffboundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="calls.csv"\r\n\r\n').encode()
    body = head + calls_csv(20000)  # never finished: no closing boundary
    async with serve_app(app) as base:
        host, port = base.removeprefix("http://").split(":")
        _reader, writer = await asyncio.open_connection(host, int(port))
        request = (
            f"POST /api/v1/datasets HTTP/1.1\r\nHost: {host}\r\nAuthorization: {OWNER['Authorization']}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body) + 1000}\r\n\r\n"
        ).encode()
        writer.write(request + body[: len(body) // 2])
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()  # the client goes away mid-upload
        await writer.wait_closed()
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=base) as client:
            listed = await client.get("/api/v1/datasets", headers=OWNER)
    assert listed.json()["data"] == []
    storage = tmp_path / "storage"
    assert not storage.exists() or [p for p in storage.rglob("*") if p.is_file()] == []


async def test_ingestion_publishes_progress_and_state_events(ctx: Ctx, bus: Any) -> None:
    from strata.common.events import CloudEvent
    from strata.common.testing import stream_messages

    data = calls_csv(100)
    created = (await ctx.upload("calls.csv", data)).json()
    await ctx.wait(created["id"])

    async def events(subject: str) -> list[CloudEvent]:
        msgs = await stream_messages(bus.js, f"{subject}.>")
        found = [CloudEvent.model_validate_json(m.data) for m in msgs]
        return [e for e in found if e.data.get("dataset_id") == created["id"]]

    await ctx.profile(created["id"])
    progress = await events("strata.datasets.dataset.progress")
    assert [e.data["stage"] for e in progress] == ["reading", "storing", "ready", "profiling", "profiled"]
    assert all(e.data["bytes"] == len(data) for e in progress[:3])
    assert progress[2].data["rows"] == 100
    deadline = time.monotonic() + 10
    while not await events("strata.datasets.dataset.ready"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert len(await events("strata.datasets.dataset.uploaded")) == 1
    ready = (await events("strata.datasets.dataset.ready"))[0]
    assert ready.data["rows"] == 100 and ready.subject == created["id"]
    deadline = time.monotonic() + 10
    while not await events("strata.datasets.dataset.profiled"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_list_search_sort_and_cursor_paging(ctx: Ctx) -> None:
    ids = {}
    for name in ("bravo", "alpha", "charlie"):
        ids[name] = (await ctx.upload("calls.csv", calls_csv(5), name=name)).json()["id"]
    for dataset_id in ids.values():
        await ctx.wait(dataset_id)
    seen: list[str] = []
    cursor = None
    for _ in range(3):
        params: dict[str, Any] = {"sort": "name", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await ctx.client.get("/api/v1/datasets", headers=OWNER, params=params)).json()
        seen += [d["name"] for d in page["data"]]
        cursor = page["meta"]["next_cursor"]
        if cursor is None:
            break
    assert seen == ["alpha", "bravo", "charlie"]
    newest = (await ctx.client.get("/api/v1/datasets", headers=OWNER, params={"limit": 1})).json()
    older = (
        await ctx.client.get(
            "/api/v1/datasets", headers=OWNER, params={"limit": 5, "cursor": newest["meta"]["next_cursor"]}
        )
    ).json()
    assert [d["id"] for d in newest["data"] + older["data"]] == [ids["charlie"], ids["alpha"], ids["bravo"]]
    found = (await ctx.client.get("/api/v1/datasets", headers=OWNER, params={"q": "rating"})).json()  # a column
    assert len(found["data"]) == 3
    for params in (
        {"cursor": "garbage!"},
        {"sort": "size"},
        {"cursor": newest["meta"]["next_cursor"][:-4]},  # truncated
    ):
        resp = await ctx.client.get("/api/v1/datasets", headers=OWNER, params=params)
        assert resp.status_code in (400, 422), (params, resp.text)
