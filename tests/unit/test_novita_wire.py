"""Every request the clients send, pinned to provider-apis.md: method, path, headers, body."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import respx

from gpufleet.providers.base import InstanceState, RetryPolicy
from gpufleet.providers.novita import NovitaProvider
from gpufleet.providers.surf import SurfProvider
from gpufleet.settings import NovitaSettings, PoolSpec, SurfSettings

BASE = "https://api.novita.ai/gpu-instance/openapi/v1"
SURF = "https://gw.live.surfresearchcloud.nl/v1/workspace"
KEY = "nv-secret-key-123"
TOKEN = "surf-secret-token-456"
POOL = PoolSpec(name="comfy", provider="novita", engine="comfyui", product_id="4090.18c.60g",
                image="ghcr.io/example/comfyui:latest", gpu_num=2, rootfs_gb=80,
                envs={"CLI_ARGS": "--listen 0.0.0.0"}, command="python main.py",
                cluster_id="5")
SURF_POOL = PoolSpec(name="gpu", provider="surf", engine="ollama", name_filter="LMSTUDIO")


def _instance(**over: Any) -> dict[str, Any]:
    data = {"id": "9f2c41d07ab35e18", "name": "gpufleet-comfy-1", "status": "running",
            "productId": "4090.18c.60g", "productName": "RTX 4090 24GB", "gpuNum": "2",
            "createdAt": "1732262400", "statusError": {"state": "", "message": ""},
            "portMappings": [
                {"port": 8188, "type": "http",
                 "endpoint": "https://9f2c41d07ab35e18-8188.us-ca-1.gpu-instance.novita.ai"},
                {"port": 22, "type": "tcp",
                 "endpoint": "proxy.us-ca-1.gpu-instance.novita.ai:31022"}]}
    return data | over


@pytest.fixture
async def novita() -> AsyncIterator[NovitaProvider]:
    provider = NovitaProvider(NovitaSettings(api_key=KEY), pools=[POOL],
                              retry=RetryPolicy(attempts=1))
    yield provider
    await provider.aclose()


def _check_novita_headers(request: httpx.Request) -> None:
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"


@respx.mock
async def test_create_body_and_lookup_first(novita: NovitaProvider) -> None:
    listing = respx.get(f"{BASE}/gpu/instances").respond(json={"instances": [], "total": 0})
    create = respx.post(f"{BASE}/gpu/instance/create").respond(json={"id": "3560b7fec915bbf9"})
    inst = await novita.create(POOL, "comfy-1")
    assert inst.id == "3560b7fec915bbf9"
    assert inst.state is InstanceState.pending
    assert listing.calls.last.request.url.params["name"] == "gpufleet-comfy-1"
    request = create.calls.last.request
    _check_novita_headers(request)
    assert json.loads(request.content) == {
        "name": "gpufleet-comfy-1", "productId": "4090.18c.60g", "gpuNum": 2, "rootfsSize": 80,
        "imageUrl": "ghcr.io/example/comfyui:latest", "ports": "8188/http",
        # The worker gate's secret, one per instance (issue 19 point 6).
        "envs": [{"key": "CLI_ARGS", "value": "--listen 0.0.0.0"},
                 {"key": "GPUFLEET_WORKER_TOKEN", "value": inst.worker_token}],
        "command": "python main.py",
        "clusterId": "5", "kind": "gpu", "billingMode": "onDemand", "month": 0,
    }
    assert len(inst.worker_token) >= 32


@respx.mock
async def test_create_finds_existing_instance_and_posts_nothing(novita: NovitaProvider) -> None:
    respx.get(f"{BASE}/gpu/instances").respond(json={"instances": [_instance()], "total": 1})
    create = respx.post(f"{BASE}/gpu/instance/create").respond(json={"id": "other"})
    inst = await novita.create(POOL, "gpufleet-comfy-1")
    assert inst.id == "9f2c41d07ab35e18"
    assert not create.called


@respx.mock
async def test_list_params_and_parsing(novita: NovitaProvider) -> None:
    route = respx.get(f"{BASE}/gpu/instances").respond(json={"instances": [
        _instance(), _instance(id="aaaaaaaaaaaaaaaa", name="someone-else"),
        _instance(id="bbbbbbbbbbbbbbbb", name="gpufleet-comfy-2", status="removed")],
        "total": 3})
    [inst] = await novita.list()
    request = route.calls.last.request
    _check_novita_headers(request)
    assert request.method == "GET"
    assert dict(request.url.params) == {"pageSize": "100", "pageNum": "0", "name": "gpufleet-"}
    assert inst.base_url == "https://9f2c41d07ab35e18-8188.us-ca-1.gpu-instance.novita.ai"
    assert inst.endpoints == {8188: inst.base_url}
    assert inst.gpu_name == "RTX 4090 24GB"
    assert inst.created_at == 1732262400.0
    assert inst.state is InstanceState.running


@respx.mock
async def test_get_tolerates_missing_scheme_unknown_status_and_status_error(
    novita: NovitaProvider,
) -> None:
    route = respx.get(f"{BASE}/gpu/instance")
    route.respond(json=_instance(portMappings=[
        {"port": 8188, "endpoint": "x-8188.us-ca-1.gpu-instance.novita.ai", "type": "http"}]))
    inst = await novita.get("9f2c41d07ab35e18")
    assert route.calls.last.request.url.params["instanceId"] == "9f2c41d07ab35e18"
    assert inst.base_url == "https://x-8188.us-ca-1.gpu-instance.novita.ai"
    route.respond(json=_instance(status="hibernating"))
    assert (await novita.get("9f2c41d07ab35e18")).state is InstanceState.pending
    route.respond(json=_instance(status="creating", portMappings=[],
                                 statusError={"state": "pullFailed", "message": "image not found"}))
    failed = await novita.get("9f2c41d07ab35e18")
    assert failed.state is InstanceState.failed
    assert failed.last_error == "image not found"
    assert failed.base_url is None


@pytest.mark.parametrize("action", ["start", "stop", "delete"])
@respx.mock
async def test_actions_post_instance_id(novita: NovitaProvider, action: str) -> None:
    route = respx.post(f"{BASE}/gpu/instance/{action}").respond(
        json={"instanceId": "9f2c41d07ab35e18", "state": "toStop"})
    await getattr(novita, action)("9f2c41d07ab35e18")
    request = route.calls.last.request
    _check_novita_headers(request)
    assert json.loads(request.content) == {"instanceId": "9f2c41d07ab35e18"}


@respx.mock
async def test_products_prices_from_hundred_thousandths(novita: NovitaProvider) -> None:
    respx.get(f"{BASE}/products").respond(json={"data": [
        {"id": "4090.18c.60g", "name": "RTX 4090 24GB", "price": 67000, "spotPrice": "35000",
         "availableDeploy": True, "inventoryState": "normal", "regions": ["US-CA-06"],
         "cpuPerGpu": 18, "memoryPerGpu": 60}]})
    [product] = await novita.products()
    assert product.price_per_hour == pytest.approx(0.67)
    assert product.spot_price_per_hour == pytest.approx(0.35)
    assert product.regions == ("US-CA-06",)
    # Once products are known, an instance without a pool price gets price x gpuNum.
    respx.get(f"{BASE}/gpu/instance").respond(json=_instance(name="gpufleet-unknown-pool"))
    assert (await novita.get("9f2c41d07ab35e18")).price_per_hour == pytest.approx(1.34)


@respx.mock
async def test_clusters(novita: NovitaProvider) -> None:
    respx.get(f"{BASE}/clusters").respond(json={"data": [{"id": "5", "name": "EU-01"}]})
    assert await novita.clusters() == [{"id": "5", "name": "EU-01"}]


@respx.mock
async def test_one_log_line_per_call_and_no_key(
    novita: NovitaProvider, assert_logs: Callable[..., None]
) -> None:
    respx.post(f"{BASE}/gpu/instance/stop").respond(
        400, json={"code": 400, "reason": "CONFLICT", "message": "invalid state change",
                   "metadata": {}})
    with pytest.raises(Exception, match="invalid state change"):
        await novita.stop("9f2c41d07ab35e18")
    assert_logs([r"novita POST /gpu/instance/stop -> 400 \(\d+ ms\)"], prohibited=[KEY])


# -- SURF ------------------------------------------------------------------------------------


def _workspace(**over: Any) -> dict[str, Any]:
    return {"id": "451226aa-5ca5-460a-a6d1-5718fcc10e3c", "name": "LMSTUDIO-gpu-01",
            "status": "running", "resource_meta": {"ip": "145.38.190.17"},
            "meta": {"flavours": [{"name": "1 GPU - A10", "category": "size"}]},
            "workspace_actions": [], "time_created": "2025-01-01T00:00:00Z"} | over


@pytest.fixture
async def surf() -> AsyncIterator[SurfProvider]:
    provider = SurfProvider(SurfSettings(api_token=TOKEN, csrf_token="csrf-1"), pools=[SURF_POOL],
                            retry=RetryPolicy(attempts=1))
    yield provider
    await provider.aclose()


@respx.mock
async def test_surf_list_headers_params_and_paging(
    surf: SurfProvider, assert_logs: Callable[..., None]
) -> None:
    route = respx.get(f"{SURF}/workspaces/")
    route.side_effect = [
        httpx.Response(200, json={"count": 2, "previous": None, "results": [_workspace()],
                                  "next": f"{SURF}/workspaces/?deleted=false&limit=1&offset=1"}),
        httpx.Response(200, json={"count": 2, "next": None, "previous": None,
                                  "results": [_workspace(id="2", name="other-desktop")]}),
    ]
    [ws] = await surf.list()
    first, second = (c.request for c in route.calls)
    assert first.headers["authorization"] == TOKEN  # bare token, no "Bearer"
    assert first.headers["x-csrftoken"] == "csrf-1"
    assert first.headers["accept"] == "application/json;Compute"
    assert dict(first.url.params) == {"application_type": "Compute", "deleted": "false",
                                      "limit": "100", "offset": "0", "name": "LMSTUDIO"}
    assert second.url.params["offset"] == "1"
    assert ws.base_url == "http://145.38.190.17:11434"
    assert ws.gpu_name == "1 GPU - A10"
    assert_logs([r"surf GET /workspaces/ -> 200"], prohibited=[TOKEN, "csrf-1"])


@pytest.mark.parametrize("action", ["pause", "resume"])
@respx.mock
async def test_surf_actions(surf: SurfProvider, action: str) -> None:
    ws_id = "451226aa-5ca5-460a-a6d1-5718fcc10e3c"
    route = respx.post(f"{SURF}/workspaces/{ws_id}/actions/{action}/").respond(
        json=_workspace(status="pausing" if action == "pause" else "resuming"))
    inst = await surf.__getattribute__(action)(ws_id)
    request = route.calls.last.request
    assert json.loads(request.content) == {}
    assert request.headers["content-type"].startswith("application/json")
    assert request.headers["authorization"] == TOKEN
    assert inst.state in (InstanceState.stopping, InstanceState.booting)


@respx.mock
async def test_surf_failed_resume_reads_result_error(surf: SurfProvider) -> None:
    ws_id = "451226aa-5ca5-460a-a6d1-5718fcc10e3c"
    history = [
        {"type": "resume", "status": "success", "time_created": "2025-05-01T08:00:00Z"},
        {"type": "pause", "status": "success", "time_created": "2025-05-01T09:00:00Z"},
        {"type": "resume", "status": "failed", "time_created": "2025-05-02T08:00:00Z",
         "reason": "API", "result": {"error": "No capacity for flavour"}},
    ]
    respx.get(f"{SURF}/workspaces/{ws_id}/").respond(
        json=_workspace(status="paused", workspace_actions=history))
    inst = await surf.get(ws_id)
    assert inst.state is InstanceState.paused
    assert inst.last_error == "resume failed: No capacity for flavour"
