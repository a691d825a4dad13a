"""A frontend can generate a typed TypeScript client from the gateway's merged OpenAPI document, and it type-checks.

The npm tools are installed once, at exact versions, into ``.cache/tsclient/`` (git-ignored) and reused; nothing is
written to a ``package.json`` or a lock file outside that folder.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any, NoReturn

import pytest

from strata.common.testing import in_ci
from strata.gateway.openapi import merge_specs

OPENAPI_TYPESCRIPT = "7.13.0"
TYPESCRIPT = "5.9.3"  # openapi-typescript 7 wants typescript ^5 (its API); 6 and 7 are other majors
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "tsclient"
SERVICES = ("auth", "datasets", "execution", "schemas")
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "ECONNREFUSED", "ECONNRESET", "ENETUNREACH")


def unavailable(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the TypeScript client check must run)", pytrace=False)
    pytest.skip(reason)


def toolchain() -> tuple[str, Path]:
    """``node`` and a folder whose ``node_modules`` holds the pinned openapi-typescript and typescript."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        unavailable("node and npm are needed to generate and type-check the TypeScript client")
    home = CACHE / f"openapi-typescript-{OPENAPI_TYPESCRIPT}_typescript-{TYPESCRIPT}"
    if (home / "node_modules" / "typescript" / "bin" / "tsc").is_file():
        return node, home
    # Install beside it and move into place at the end, so an interrupted install is never mistaken for a good one.
    staging = CACHE / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    (staging / "package.json").write_text('{"private": true}\n')  # anchors npm here, not in a parent folder
    try:
        result = subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(staging),
                "--no-save",
                "--no-package-lock",
                "--ignore-scripts",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                f"openapi-typescript@{OPENAPI_TYPESCRIPT}",
                f"typescript@{TYPESCRIPT}",
            ],
            cwd=staging,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            output = result.stdout + result.stderr
            if any(code in output for code in NETWORK_ERRORS):
                unavailable(f"npm registry not reachable: {output[-500:]}")
            pytest.fail(f"npm install failed ({result.returncode}):\n{output[-3000:]}", pytrace=False)
        try:
            staging.rename(home)
        except OSError:  # another run got there first
            if not home.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return node, home


def merged_spec(tmp_path: Path) -> dict[str, Any]:
    """The gateway's merged document, from the real apps (built, not started)."""
    docs: dict[str, dict[str, Any]] = {}
    for name in ("gateway", *SERVICES):
        app_module = importlib.import_module(f"strata.{name}.app")
        config = importlib.import_module(f"strata.{name}.config")
        settings = config.Settings(data_dir=tmp_path / "data" / name, nats_url="nats://127.0.0.1:1")
        docs[name] = app_module.create_app(settings).openapi()
    gateway = docs.pop("gateway")
    return merge_specs(gateway, docs, title="Strata API", version="1.0")


def client_source(spec: dict[str, Any]) -> str:
    """A small client that uses the generated types, with checks that fail to compile if the types are too loose."""
    lines = [
        'import type { paths } from "./strata-api";',
        "",
        "type JsonOk<Op> =",
        '  Op extends { responses: { 200: { content: { "application/json": infer B } } } } ? B : never;',
        "",
        "// A typed request to one service's route through the gateway.",
        'const infoPath = "/api/v1/system/datasets/info" satisfies keyof paths;',
        'type DatasetsInfo = JsonOk<paths[typeof infoPath]["get"]>;',
        "export async function datasetsInfo(baseUrl: string, token: string): Promise<DatasetsInfo> {",
        "  const resp = await fetch(baseUrl + infoPath, { headers: { Authorization: `Bearer ${token}` } });",
        "  const body: DatasetsInfo = await resp.json();",
        "  return body;",
        "}",
        "",
        "// Every service is in the one document.",
        "export const infoPaths: (keyof paths)[] = [",
        *(f'  "/api/v1/system/{name}/info",' for name in (*SERVICES, "gateway")),
        '  "/api/v1/system/instances",',
        "];",
        "",
        "// @ts-expect-error: a path no service declares is not in the type",
        'export type NoSuchPath = paths["/api/v1/no/such/path"];',
    ]
    token = spec["paths"].get("/api/v1/auth/token", {}).get("post", {})
    if "application/x-www-form-urlencoded" in token.get("requestBody", {}).get("content", {}):
        lines += [
            "",
            "// The OAuth2 password flow's form, typed.",
            'type TokenForm = NonNullable<paths["/api/v1/auth/token"]["post"]["requestBody"]>["content"]'
            '["application/x-www-form-urlencoded"];',
            'export const username: TokenForm["username"] = "ada";',
            'export const password: TokenForm["password"] = "correct horse";',
            "// @ts-expect-error: the username is a string",
            'export const notAString: TokenForm["username"] = 42;',
        ]
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(600)  # a cold cache downloads the tools; warm, this takes a few seconds
def test_generated_typescript_client_type_checks(tmp_path: Path) -> None:
    node, home = toolchain()
    spec = merged_spec(tmp_path)
    (tmp_path / "openapi.json").write_text(json.dumps(spec))
    env = {**os.environ, "NO_COLOR": "1", "NODE_NO_WARNINGS": "1"}

    generate = subprocess.run(
        [
            node,
            str(home / "node_modules" / "openapi-typescript" / "bin" / "cli.js"),
            "openapi.json",
            "--output",
            "strata-api.d.ts",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert generate.returncode == 0, generate.stdout + generate.stderr
    generated = (tmp_path / "strata-api.d.ts").read_text()
    assert "export interface paths" in generated
    assert '"/api/v1/system/datasets/info"' in generated

    (tmp_path / "client.ts").write_text(client_source(spec))
    check = subprocess.run(
        [
            node,
            str(home / "node_modules" / "typescript" / "bin" / "tsc"),
            "--noEmit",
            "--strict",
            "--target",
            "es2022",
            "--lib",
            "es2022,dom",
            "--module",
            "esnext",
            "--moduleResolution",
            "bundler",
            "client.ts",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert check.returncode == 0, (
        f"tsc --strict failed:\n{check.stdout}{check.stderr}\n--- client.ts:\n" + (tmp_path / "client.ts").read_text()
    )
