"""The patches of other libraries' internals (service/patches.py), on the installed versions: each probe
recognises the code it patches, each defect is shown present without its patch and gone with it, and a
target of unknown shape fails with a message naming the patch, the library and its version."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from cnnserve.core.config import Settings
from cnnserve.service import http_server, patches, probes

BY_NAME = {p.name: p for p in patches.PATCHES}


@pytest.fixture
def clean():
    """Every test starts and ends with the libraries unpatched and no drain under way."""
    patches.revert_patches()
    yield
    patches.revert_patches()
    http_server.DRAIN.active = False


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_each_probe_knows_the_installed_code(name, clean):
    """Fails, naming the patch, the library and its version, when an upgrade changed a patched target."""
    patch = BY_NAME[name]
    try:
        found = patch.check()
    except patches.UnknownShape as e:
        pytest.fail(str(e))
    assert found in (probes.DEFECT, probes.FIXED)


def test_timeout_middleware_leak_shown_and_fixed(clean):
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    if BY_NAME["bentoml-timeout-timers"].check() == probes.FIXED:
        assert probes.live_timers_after_one_request(TimeoutMiddleware) == 0
        assert patches.apply_patches(Settings())["bentoml-timeout-timers"].startswith(patches.NOT_NEEDED)
        pytest.skip("the installed BentoML no longer leaks its timers: the patch steps aside (checked above)")
    assert probes.live_timers_after_one_request(TimeoutMiddleware) == 1  # the defect, on the installed code
    assert patches.apply_patches(Settings())["bentoml-timeout-timers"].startswith(patches.APPLIED)
    assert probes.live_timers_after_one_request(TimeoutMiddleware) == 0

    async def slow(scope, receive, send):  # a slow request still gets BentoML's 504, with a JSON reason
        await asyncio.sleep(5)

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    asyncio.run(TimeoutMiddleware(slow, timeout=0.2)({"type": "http", "path": "/", "method": "GET",
                                                      "headers": []}, receive, send))
    assert sent[0]["status"] == 504 and json.loads(sent[1]["body"])["code"] == "timeout"


def test_head_limits_shown_and_fixed(clean):
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert BY_NAME["uvicorn-head-limits"].check() == probes.DEFECT
    assert not probes.head_refused(HttpToolsProtocol, 1 << 20)  # uvicorn reads a 1 MB head to its end
    assert patches.apply_patches(Settings(max_header_kb=64))["uvicorn-head-limits"].startswith(patches.APPLIED)
    import uvicorn.config as uc

    assert uc.HTTP_PROTOCOLS["auto"].endswith(":GuardedHttpTools")
    assert http_server.GuardedHttpTools.max_head_bytes == 64 * 1024
    assert probes.head_refused(http_server.GuardedHttpTools, 1 << 20)
    patches.revert_patches()
    assert not uc.HTTP_PROTOCOLS["auto"].endswith(":GuardedHttpTools")


def test_sigterm_drain_shown_and_fixed(clean):
    import uvicorn

    assert BY_NAME["uvicorn-sigterm-drain"].check() == probes.DEFECT
    assert probes.stops_at_once(uvicorn.Server.handle_exit)  # uvicorn stops at the first SIGTERM
    patches.apply_patches(Settings(drain_s=30, grace_s=5))
    assert not probes.stops_at_once(uvicorn.Server.handle_exit)  # now it drains first
    assert http_server.DRAIN.active


def test_unknown_shape_fails_with_the_patch_library_and_version(clean, monkeypatch, caplog):
    """A release whose middleware still leaks but was rewritten: the probe refuses to apply a fix written for
    other code, the service logs it and leaves the library alone, and the check names what to read."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    async def rewritten(self, scope, receive, send):  # leaks its timer, but is not the code the fix mirrors
        asyncio.get_running_loop().call_later(self.timeout, lambda: None)
        await self.app(scope, receive, send)

    monkeypatch.setattr(TimeoutMiddleware, "__call__", rewritten)
    with pytest.raises(patches.UnknownShape) as err:
        BY_NAME["bentoml-timeout-timers"].check()
    message = str(err.value)
    assert "'bentoml-timeout-timers'" in message and f"bentoml {patches.version_of('bentoml')}" in message
    assert "service/patches.py" in message
    with caplog.at_level(logging.INFO, logger="cnnserve.service"):
        outcome = patches.apply_patches(Settings())
    assert outcome["bentoml-timeout-timers"].startswith(patches.REFUSED)
    assert TimeoutMiddleware.__call__ is rewritten and "left as it is" in caplog.text


def test_fixed_upstream_steps_aside(clean, monkeypatch, caplog):
    """A release that cancels its timers: the probe sees no leak and the patch is not applied."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    async def fixed(self, scope, receive, send):
        timer = asyncio.get_running_loop().call_later(self.timeout, lambda: None)
        try:
            await self.app(scope, receive, send)
        finally:
            timer.cancel()

    monkeypatch.setattr(TimeoutMiddleware, "__call__", fixed)
    with caplog.at_level(logging.INFO, logger="cnnserve.service"):
        outcome = patches.apply_patches(Settings())
    assert outcome["bentoml-timeout-timers"].startswith(patches.NOT_NEEDED)
    assert TimeoutMiddleware.__call__ is fixed and "not needed" in caplog.text


def test_metric_labels_shown_and_fixed(clean, monkeypatch):
    """BentoML's request metrics label by the raw path (a series per made-up path); patched, the label is the
    route's template or ``other``."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    from cnnserve.service.metrics import ROUTES

    # the route added here, and the paths it labels (remembered by ROUTES), are this test's only: the
    # process's route table is put back afterwards
    monkeypatch.setattr(ROUTES, "exact", dict(ROUTES.exact))
    monkeypatch.setattr(ROUTES, "patterns", list(ROUTES.patterns))

    paths = ["/nope/1", "/nope/2", "/models/abc", "/models/def"]
    if BY_NAME["bentoml-metric-labels"].check() == probes.FIXED:
        pytest.skip("the installed BentoML no longer labels its metrics by raw path: the patch steps aside")
    assert probes.endpoint_labels(RunnerTrafficMetricsMiddleware, paths) == set(paths)  # the defect
    ROUTES.add("/models/{name}")
    assert patches.apply_patches(Settings())["bentoml-metric-labels"].startswith(patches.APPLIED)
    assert probes.endpoint_labels(RunnerTrafficMetricsMiddleware, paths) == {"other", "/models/{name}"}
    patches.revert_patches()
    assert probes.endpoint_labels(RunnerTrafficMetricsMiddleware, paths) == set(paths)


def test_the_readings_know_the_installed_code(clean):
    """What the service reads of BentoML's internals (click's context of `bentoml serve`, the worker's ``--fd``)
    is the shape the readings assume on the locked BentoML; a command without it is refused, reported, and read
    as nothing. The serve command is built in a process of its own: building BentoML's CLI sets its context."""
    import subprocess
    import sys

    from _bentoml_impl.worker.service import main as worker_command

    patches.WORKER_SOCKET.probe(worker_command)
    probe = ("from bentoml_cli.cli import cli; from cnnserve.service.patches import SERVE_ADDRESS; "
             "SERVE_ADDRESS.probe(cli.commands['serve']); print('ok')")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]

    class Bare:
        params = ()

    assert not patches.WORKER_SOCKET.usable(Bare())
    outcome = patches.runtime_info()["patches"]["bentoml-worker-fd"]
    assert outcome.startswith(patches.REFUSED) and "--fd" in outcome and "bentoml" in outcome


def test_grpc_listens_on_the_address_bentoml_handed_the_worker(server):
    """A real server's worker read its listening socket (``--fd``) and says so in its runtime report."""
    import urllib.request

    runtime = json.load(urllib.request.urlopen(server.url + "/v2", timeout=10))["runtime"]
    assert runtime["patches"]["bentoml-worker-fd"].startswith("reads bentoml"), runtime["patches"]


def test_bounded_endpoint_counts_each_set_of_labels_apart():
    """``BoundedEndpoint`` keeps the labelled children it hands out (prometheus's ``labels()`` locks and checks the
    names every call): each route template and each status still counts apart, as ``labels()`` counts them."""
    from prometheus_client import CollectorRegistry, Counter

    from cnnserve.service.metrics import BoundedEndpoint, RouteLabels

    routes = RouteLabels()
    routes.add("/models/{name}")
    counter = Counter("requests", "", ["endpoint", "code"], registry=CollectorRegistry())
    bounded = BoundedEndpoint(counter, routes.label)
    for path, code in [("/models/a", "200"), ("/models/b", "200"), ("/models/a", "404"), ("/nope", "200"),
                       ("/nope/2", "404"), ("/models/c", "200")]:
        bounded.labels(endpoint=path, code=code).inc()
    assert bounded.labels(endpoint="/models/x", code="200") is bounded.labels(endpoint="/models/y", code="200")
    counts = {(s.labels["endpoint"], s.labels["code"]): s.value for s in counter.collect()[0].samples
              if s.name == "requests_total"}
    assert counts == {("/models/{name}", "200"): 3, ("/models/{name}", "404"): 1, ("other", "200"): 1,
                      ("other", "404"): 1}, counts
