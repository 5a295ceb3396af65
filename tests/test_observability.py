"""What a monitoring stack sees of cnnserve: the alert rules (deploy/prometheus/rules.yaml and its PrometheusRule copy)
checked and unit-tested by promtool, and a real Prometheus (Debian's) scraping two replicas of two workers each on
loopback under load: every documented series with its labels, the prometheus-adapter rule's per-pod queue (rising
under load, back to 0 after), the workers' multiprocess counters adding up to what the clients counted, the rules
evaluating on the real series (the alerts the test provokes pending or firing, the others not), and every query of
the Grafana dashboard (deploy/grafana/cnnserve.json) answering with data."""

from __future__ import annotations

import collections
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench import dashboard_png
from tests.conftest import ROOT, encode
from tests.support.server import Server, free_port

RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "rules_test.yaml"
KUBE_RULES = ROOT / "deploy" / "kubernetes" / "prometheus-rules.yaml"
ADAPTER = ROOT / "deploy" / "kubernetes" / "prometheus-adapter.yaml"
SERVING_DOC = ROOT / "docs" / "serving.md"

INSTALL = "(.ci/run installs Debian's prometheus with apt)"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason=f"promtool is not installed {INSTALL}")
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason=f"prometheus is not installed {INSTALL}")

#: BentoML's own series the rules and the dashboard read, with their labels (service/patches.py bounds `endpoint`)
BENTOML_SERIES = {
    "bentoml_service_request_total": {"endpoint", "http_response_code", "runner_name", "service_name",
                                      "service_version"},
    "bentoml_service_request_duration_seconds": {"endpoint", "http_response_code", "runner_name", "service_name",
                                                 "service_version"},
    "bentoml_service_request_in_progress": {"endpoint", "runner_name", "service_name", "service_version"},
    "bentoml_service_last_request_timestamp_seconds": {"pid", "runner_name", "service_name", "service_version"},
}
#: Documented series this test does not make: an eviction needs loads past max_model_memory_mb while the served
#: model stays (tests/test_repository.py makes one in a registry of its own); a rollout's figures need clients'
#: labels and a shadow candidate (tests/test_rollout.py reads cnnserve_feedback_labelled from /metrics)
NOT_MADE = {"cnnserve_model_evictions_total", "cnnserve_feedback_labelled", "cnnserve_feedback_accuracy",
            "cnnserve_feedback_confusion", "cnnserve_shadow_agreement", "cnnserve_shadow_dropped"}
TARGET_LABELS = {"instance", "job", "namespace", "pod"}
NAMESPACE = "default"


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def documented_series() -> dict[str, set[str]]:
    """docs/serving.md's /metrics row: each cnnserve series it names, with its labels."""
    row = next(line for line in SERVING_DOC.read_text().splitlines()
               if line.startswith("| `/readyz`, `/livez`, `/metrics`"))
    return {name: {x.strip() for x in labels.split(",") if x.strip()}
            for name, labels in re.findall(r"`(cnnserve_\w+)\{([^}]*)\}`", row)}


# -- the rules, without a server ------------------------------------------------------------------------------------

@needs_promtool
def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules())} rules found" in check.stdout
    tested = subprocess.run(["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            timeout=120, cwd=RULE_TESTS.parent)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout[-6000:] + tested.stderr[-2000:]


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    firing, quiet = collections.Counter(), collections.Counter()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet)[check["alertname"]] += 1
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names))
    assert all(firing[n] and quiet[n] for n in names), {n: (firing[n], quiet[n]) for n in names}
    assert set(firing) | set(quiet) <= set(names)


def test_the_prometheusrule_manifest_holds_the_same_rules():
    (doc,) = [d for d in yaml.safe_load_all(KUBE_RULES.read_text()) if d]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"] and set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    # kubernetes-validate holds no schema for the Operator's custom resources: the fields it documents, checked
    assert set(doc["spec"]) == {"groups"}
    for group in doc["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit", "partial_response_strategy"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
    assert doc["spec"] == yaml.safe_load(RULES.read_text()), (
        f"{KUBE_RULES.name}'s spec differs from {RULES.name}: indent the latter's `groups:` under `spec:` again")


def test_each_alert_says_its_threshold_and_reads_series_cnnserve_serves():
    from cnnserve.service.metrics import metrics

    served = set()
    for m in vars(metrics()).values():
        (desc,) = m.describe()
        served |= {s for s in (desc.name, desc.name + "_total", desc.name + "_bucket", desc.name + "_count",
                               desc.name + "_sum")}
    bentoml = {s for name in BENTOML_SERIES for s in (name, name + "_bucket", name + "_count", name + "_sum")}
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        notes = rule["annotations"]
        assert {"summary", "description", "threshold"} <= set(notes), rule["alert"]
        # the number the expression compares with, in the operator's words (a share as a percentage)
        if m := re.search(r"(?:>|==)\s*([\d.]+)\s*$", rule["expr"].strip()):
            value = float(m.group(1))
            words = notes["threshold"]
            assert f"{value:g}" in words or f"{value * 100:g}%" in words, (rule["alert"], value, words)
        if "for" in rule:
            assert f"for {rule['for']}" in notes["threshold"], (rule["alert"], rule["for"])
        for name in re.findall(r"\b((?:cnnserve|bentoml)_\w+)", rule["expr"]):
            assert name in served | bentoml, (rule["alert"], name)


def test_the_docs_name_every_series_cnnserve_serves():
    from cnnserve.service.metrics import metrics

    served = {}
    for m in vars(metrics()).values():
        (desc,) = m.describe()
        served[desc.name + ("_total" if desc.type == "counter" else "")] = set(m._labelnames)
    assert documented_series() == served


# -- a real Prometheus scraping two replicas --------------------------------------------------------------------------

@dataclass
class Clients:
    """Every request the test sends, counted as the clients saw them: by replica, route template and status, and
    each refusal's code."""

    answers: collections.Counter = field(default_factory=collections.Counter)  # (pod, route, status)
    refusals: collections.Counter = field(default_factory=collections.Counter)  # (pod, code)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, server, pod: str, method: str, path: str, route: str, body: bytes = b"",
             headers: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
        # a connection per request: each lands on whichever worker accepts it (SO_REUSEPORT), so a restarted
        # worker gets its share at once, where kept-alive connections would stay on the worker they began on
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            status, data = response.status, response.read()
        finally:
            conn.close()
        with self.lock:
            self.answers[pod, route, status] += 1
            if status >= 400:
                self.refusals[pod, json.loads(data)["code"]] += 1
        return status, data


def multipart(images: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(images)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Prometheus:
    """Debian's prometheus on a loopback port, its data in a folder of its own."""

    def __init__(self, folder: Path, targets: dict[str, int], interval: str = "1s"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "cnnserve", "static_configs": [
                {"targets": [f"127.0.0.1:{port}"], "labels": {"pod": pod, "namespace": NAMESPACE}}
                for pod, port in targets.items()]}],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(folder / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.targets = len(targets)

    def scraping(self) -> None:
        """Wait until every target has answered a scrape (Prometheus applies its targets 5 s after it starts)."""
        self.wait(lambda: len([r for r in self.query("up") if r["value"][1] == "1"]) == self.targets, 60,
                  "every target scraped")

    def api(self, path: str, **params) -> dict:
        return dashboard_png.api(self.url, path, **params)

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def values(self, expr: str, by: str) -> dict[str, float]:
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in self.query(expr)}

    def wait(self, ready, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.output()}")
            try:
                if out := ready():
                    return out
            except (OSError, RuntimeError):
                pass
            time.sleep(0.25)
        raise AssertionError(f"not within {timeout} s: {what}\n{self.output()[-3000:]}")

    def scraped_after(self, moment: float) -> None:
        """Wait until every target has been scraped since ``moment`` (a wall-clock time)."""
        self.wait(lambda: all(float(r["value"][1]) > moment for r in self.query('timestamp(up{job="cnnserve"})')),
                  15, "a scrape of every target after the clients' last answer")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def worker_pids(server) -> set[str]:
    """The worker processes that have answered a request, as the server's own /metrics shows them."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return set(re.findall(r'^bentoml_service_last_request_timestamp_seconds\{[^}]*pid="(\d+)"', text, re.M))


@dataclass
class Stack:
    servers: dict
    prometheus: Prometheus
    clients: Clients
    model: str
    load_start: float
    load_end: float
    restarted_pod: str
    timings: dict


CLIENTS = 24  # concurrent clients in the load
MIN_ROUNDS = 20  # requests each sends at least: 480 in all
LOAD_S = 6.0  # and for this long at least: several scrapes see the queue under load


@pytest.fixture(scope="module")
def stack(stored_default, default_onnx, digits_test, tmp_path_factory):
    """Two replicas (2 workers each, API keys and model control on), Prometheus scraping them every second with
    the rules loaded, and the load this module's tests look at: runtime loads (one of a damaged file), one worker of
    the second replica killed (BentoML restarts it), then 24 clients sending requests on new connections for 6 s
    (480 at least): batches of 32 images, single images, v2 infer, explanations, a second model, and a fifth
    refused (not an image, no API key)."""
    import bentoml

    from cnnserve.export.store import store_model

    if shutil.which("prometheus") is None:
        pytest.skip(f"prometheus is not installed {INSTALL}")
    timings, t0 = {}, time.monotonic()
    folder = tmp_path_factory.mktemp("observability")
    model = stored_default.split(":")[0]
    store_model(default_onnx, name="digits-b")
    broken = bentoml.models.get(store_model(default_onnx, name="digits-broken").tag)
    Path(broken.path_of("model.onnx")).write_bytes(b"\x08\x07 not an onnx file")
    key, token = "cns_" + uuid.uuid4().hex, uuid.uuid4().hex
    (folder / "keys").write_text(f"loadtest sha256:{hashlib.sha256(key.encode()).hexdigest()}\n")
    (folder / "token").write_text(token + "\n")
    # max_batch_size 8 and a queue that never refuses: a batch of 32 images waits for four runs, so the queue
    # the autoscaler reads is seen above 0 by a scrape every second
    args = ("--arg", f"models={stored_default}", "--arg", "workers=2", "--arg", "max_batch_size=8",
            "--arg", "max_queue=100000", "--arg", f"api_keys_file={folder / 'keys'}", "--arg", "model_control=true",
            "--arg", f"control_token_file={folder / 'token'}")
    ports = {"cnnserve-r1": free_port(), "cnnserve-r2": free_port()}
    pods = tuple(ports)
    # Prometheus first: it takes its targets 5 s after it starts, while the replicas start
    prometheus, servers = Prometheus(folder, ports), {}
    try:
        with ThreadPoolExecutor(2) as pool:
            starting = {pod: pool.submit(Server, *args, port=ports[pod]) for pod in pods}
        servers.update({pod: f.result() for pod, f in starting.items() if f.exception() is None})
        for f in starting.values():  # a replica that did not start fails the setup, the other one stopped below
            f.result()
        timings["replicas ready"] = time.monotonic() - t0
        prometheus.scraping()
        timings["prometheus scraping them"] = time.monotonic() - t0
        clients = Clients()
        auth = {"Authorization": f"Bearer {token}"}
        png = {"Content-Type": "image/png", "X-API-Key": key}
        # the images: eight held-out digits and blank squares (out of distribution, and all one class: drift)
        digits = [encode(x[0]) for x in digits_test[0][:8]]
        blank = encode(np.zeros((28, 28), np.uint8))
        images = [d for pair in zip(digits, [blank] * 8) for d in pair]

        def control(pod, verb, name):
            return clients.send(servers[pod], pod, "POST", f"/v2/repository/models/{name}/{verb}",
                                f"/v2/repository/models/{{name}}/{verb}", b"{}", auth)

        with ThreadPoolExecutor(2) as pool:
            assert [s for s, _ in pool.map(lambda pod: control(pod, "load", "digits-b"), pods)] == [200, 200]
        status, body = control(pods[0], "load", "digits-broken")
        assert status == 400 and b"onnxruntime cannot load it" in body, body
        timings["runtime loads"] = time.monotonic() - t0

        # both workers of the second replica answer, then one is killed: BentoML starts another
        victim, pids = servers[pods[1]], set()
        for _ in range(60):
            clients.send(victim, pods[1], "POST", "/classify", "/classify", blank, png)
            if len(pids := worker_pids(victim)) == 2:
                break
        assert len(pids) == 2, pids
        os.kill(int(min(pids)), signal.SIGKILL)

        def one_client(n: int) -> None:
            i = 0
            while i < MIN_ROUNDS or time.time() < load_start + LOAD_S:
                i += 1
                pod = pods[(n + i) % 2]
                s = servers[pod]
                kind = (n + i) % 10
                image = images[(n * 7 + i) % len(images)]
                if kind in (0, 3, 6):
                    body, ctype = multipart([images[(n + i + j) % len(images)] for j in range(32)])
                    clients.send(s, pod, "POST", "/classify/batch", "/classify/batch", body,
                                 {"Content-Type": ctype, "X-API-Key": key})
                elif kind == 1:
                    pixels = np.frombuffer(image, np.uint8)  # any bytes: a tensor of the right shape
                    pixels = np.resize(pixels, 784).tolist()
                    tensor = {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                          "data": pixels}]}
                    clients.send(s, pod, "POST", f"/v2/models/{model}/infer", "/v2/models/{name}/infer",
                                 json.dumps(tensor).encode(), {"Content-Type": "application/json", "X-API-Key": key})
                elif kind == 4:
                    clients.send(s, pod, "POST", "/classify", "/classify", b"not an image", png)
                elif kind == 7:
                    clients.send(s, pod, "POST", "/classify", "/classify", image, {"Content-Type": "image/png"})
                elif kind == 8 and pod == pods[0]:
                    clients.send(s, pod, "POST", "/classify?model=digits-b", "/classify", image, png)
                elif kind == 9 and n % 6 == 0:
                    clients.send(s, pod, "POST", "/classify/explain", "/classify/explain", image, png)
                else:
                    clients.send(s, pod, "POST", "/classify", "/classify", image, png)

        load_start = time.time()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(one_client, range(CLIENTS)))
        load_end = time.time()
        timings["load"] = time.monotonic() - t0
        # the restarted worker has answered too (new connections land on it once it serves; BentoML restarts a
        # worker within seconds, longer on a busy machine)
        deadline = time.monotonic() + 60
        while not worker_pids(victim) - pids and time.monotonic() < deadline:
            clients.send(victim, pods[1], "POST", "/classify", "/classify", digits[0], png)
            time.sleep(0.1)
        assert worker_pids(victim) - pids, f"the restarted worker never answered:\n{victim.output()}"
        assert control(pods[0], "unload", "digits-b")[0] == 200
        prometheus.scraped_after(time.time())
        timings["scraped after the last request"] = time.monotonic() - t0
        yield Stack(servers, prometheus, clients, model, load_start, load_end, pods[1], timings)
    finally:
        prometheus.stop()
        for s in servers.values():
            s.stop()
        print("observability stack: " + ", ".join(f"{k} at {v:.1f} s" for k, v in timings.items())
              + f"; torn down at {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
@needs_prometheus
def test_every_documented_series_is_scraped_with_its_labels(stack):
    expected = {**documented_series(), **BENTOML_SERIES}
    missing, wrong = [], {}
    for name, labels in expected.items():
        if name in NOT_MADE:
            continue
        found = stack.prometheus.api("series", **{"match[]": f'{{__name__=~"{name}|{name}_count"}}',
                                                  "start": f"{stack.load_start - 60:.3f}"})
        if not found:
            missing.append(name)
            continue
        for series in found:
            got = set(series) - {"__name__", "le"}
            if got != labels | TARGET_LABELS:
                wrong[name] = sorted(got ^ (labels | TARGET_LABELS))
    assert not missing and not wrong, (missing, wrong)
    # the series every inference request makes come from both replicas
    for name in ("cnnserve_queued_images", "cnnserve_batch_size_count", "cnnserve_request_stage_seconds_count",
                 "bentoml_service_request_total", "cnnserve_rejected_requests_total", "cnnserve_class_psi"):
        assert set(stack.prometheus.values(f"count by (pod) ({name})", "pod")) == set(stack.servers), name


@pytest.mark.slow
@needs_prometheus
def test_the_adapter_rule_gives_the_per_pod_queue_rising_under_load_and_0_after(stack):
    """The prometheus-adapter rule as the adapter runs it: its seriesQuery finds each pod's series; its
    metricsQuery, rendered as the adapter renders it for one pod (``pod="NAME"``) and for the HPA's list of pods
    (``pod=~"A|B"``), gives each pod's queued images: above 0 at some scrape while the clients load it, 0 after."""
    (config_map,) = [d for d in yaml.safe_load_all(ADAPTER.read_text()) if d]
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    p = stack.prometheus
    found = p.api("series", **{"match[]": rule["seriesQuery"], "start": f"{stack.load_start - 60:.3f}"})
    assert {s["pod"] for s in found} == set(stack.servers) and all(s["namespace"] == NAMESPACE for s in found)
    assert re.fullmatch(rule["name"]["matches"], found[0]["__name__"])
    series = rule["name"]["as"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}

    def render(*pods: str) -> str:  # prometheus-adapter's metricsQuery.Build: namespace, then the resource's label
        pod = f'pod="{pods[0]}"' if len(pods) == 1 else f'pod=~"{"|".join(pods)}"'
        return (rule["metricsQuery"].replace("<<.Series>>", series)
                .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",{pod}').replace("<<.GroupBy>>", "pod"))

    assert "<<" not in render("x")
    peaks = {}
    for pod in stack.servers:
        (one,) = p.api("query_range", query=render(pod), start=f"{stack.load_start:.3f}", end=f"{stack.load_end:.3f}",
                       step="1")["result"]
        assert one["metric"] == {"pod": pod}
        peaks[pod] = max(float(v) for _, v in one["values"])
    assert all(peak > 0 for peak in peaks.values()), peaks
    # after the load: each pod's figure, alone and as the HPA asks for them all, is back to 0
    assert p.values(render(*stack.servers), "pod") == {pod: 0.0 for pod in stack.servers}
    assert all(p.values(render(pod), "pod") == {pod: 0.0} for pod in stack.servers)
    print(f"queued images per pod, the largest a scrape saw under load: {peaks}")


@pytest.mark.slow
@needs_prometheus
def test_the_workers_counters_add_up_to_what_the_clients_counted(stack):
    """BentoML's requests by route and status, and cnnserve's refusals by reason, summed by Prometheus over each
    replica's workers (one of them killed and restarted: its files stay and count), equal the clients' own counts."""
    p = stack.prometheus
    counted = collections.Counter()
    for r in p.query('sum by (pod, endpoint, http_response_code) (bentoml_service_request_total{endpoint!="/readyz"})'):
        m = r["metric"]
        counted[m["pod"], m["endpoint"], int(m["http_response_code"])] = int(float(r["value"][1]))
    assert counted == stack.clients.answers, (counted - stack.clients.answers, stack.clients.answers - counted)
    refused = collections.Counter({(r["metric"]["pod"], r["metric"]["reason"]): int(float(r["value"][1]))
                                   for r in p.query("sum by (pod, reason) (cnnserve_rejected_requests_total)")})
    assert refused == stack.clients.refusals
    assert {code for _, code in refused} == {"not_an_image", "unauthorized", "load_failed"}
    print(f"{sum(stack.clients.answers.values())} requests, {sum(refused.values())} refused: Prometheus's sums "
          "equal the clients' counts")


@pytest.mark.slow
@needs_prometheus
def test_the_rules_evaluate_on_the_real_series(stack):
    """Loaded by Prometheus from rules.yaml, every rule evaluates without error; the alerts this test provokes are
    pending or firing (a fifth of the requests refused, a damaged model file loaded, a worker killed, blank images
    that are out of distribution and all one class), and the others are not."""
    p = stack.prometheus
    names = [r["alert"] for r in rules()]
    # an RFC 3339 time; a rule not yet evaluated has year 1
    evaluated = p.wait(lambda: (g := p.api("rules")["groups"]) and all(
        r["lastEvaluation"] > "2000" for r in g[0]["rules"]) and g, 15, "every rule evaluated")
    (group,) = evaluated
    assert [r["name"] for r in group["rules"]] == names
    assert all(r["health"] == "ok" and not r.get("lastError") for r in group["rules"]), group["rules"]
    answers = stack.clients.answers
    four = sum(n for (_, _, status), n in answers.items() if 400 <= status < 500)
    assert four / sum(answers.values()) > 0.1  # what CnnserveHTTPClientErrors compares with 10%
    psi = p.values("max by (model) (cnnserve_class_psi)", "model")
    assert psi[stack.model] > 0.25, psi
    expected = {("CnnserveHTTPClientErrors", "pending", ""), ("CnnserveModelLoadFailed", "firing", "cnnserve-r1"),
                ("CnnserveWorkerRestarted", "firing", stack.restarted_pod),
                ("CnnserveClassDrift", "pending", ""), ("CnnserveOutOfDistribution", "pending", "")}

    def alerts():
        got = {(a["labels"]["alertname"], a["state"], a["labels"].get("pod", ""))
               for a in p.api("alerts")["alerts"]}
        return got if expected <= got else None

    got = p.wait(alerts, 15, f"the alerts {sorted(expected)}")
    # (the clients hold at most 1,320 images at once: 20 batches of 32 and 4 explanations of 170, under 1536)
    quiet = {"CnnserveHTTPServerErrors", "CnnserveOverloaded", "CnnserveQueueSaturated", "CnnserveScrapeDown"}
    assert not {name for name, _, _ in got} & quiet, got
    models = collections.defaultdict(set)
    for a in p.api("alerts")["alerts"]:
        models[a["labels"]["alertname"]].add(a["labels"].get("model"))
    assert models["CnnserveModelLoadFailed"] == {"digits-broken"}
    assert stack.model in models["CnnserveOutOfDistribution"]  # (digits-b too when its share was blank images)


@pytest.mark.slow
@needs_prometheus
def test_every_dashboard_query_answers_with_data(stack):
    """Each query of each panel, its variables as Grafana fills them, over the load's window: no query error, and
    data (a finite value at some step) in every one. Every series the dashboard and the rules name is one the
    replicas serve."""
    p = stack.prometheus
    dashboard = dashboard_png.load()
    shown = dashboard_png.panels(dashboard)
    assert len({x["id"] for x in dashboard["panels"]}) == len(dashboard["panels"])
    assert dashboard["templating"]["list"][0] == {**dashboard["templating"]["list"][0], "name": "datasource",
                                                  "type": "datasource", "query": "prometheus"}
    start, end = stack.load_start - 5, time.time()
    empty, errors = [], []
    for panel, target in dashboard_png.targets(dashboard):
        assert panel["datasource"] == target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        try:
            result = dashboard_png.query_range(p.url, dashboard_png.concrete(target["expr"], "15s"), start, end, 1)
        except RuntimeError as e:
            errors.append(f"{panel['title']} {target['refId']}: {e}")
            continue
        if not any(np.isfinite(float(v)) for series in result for _, v in series["values"]):
            empty.append(f"{panel['title']} {target['refId']}")
    assert not errors and not empty, (errors, empty)
    assert len(shown) >= 20 and all(x.get("targets") for x in shown)
    # the series the queries and the alerts read exist (a misspelt name would answer "no data", not an error)
    names = set()
    for text in [t["expr"] for _, t in dashboard_png.targets(dashboard)] + [r["expr"] for r in rules()]:
        names |= set(re.findall(r"\b((?:cnnserve|bentoml)_\w+)", text))
    there = {r["metric"]["__name__"] for r in p.query('count by (__name__) ({__name__=~"cnnserve_.+|bentoml_.+"})')}
    assert names - there <= NOT_MADE, names - there
    if os.environ.get("CNNSERVE_DASHBOARD_PNG"):  # how docs/observability-dashboard.png is made
        print(dashboard_png.render(p.url, start, end, Path(os.environ["CNNSERVE_DASHBOARD_PNG"]), dashboard, "15s"))


@pytest.mark.slow
@needs_prometheus
def test_a_replica_gone_is_seen_down_and_alerted(stack):
    """Last: every process of the second replica killed, its target is down and CnnserveScrapeDown pending for it."""
    from bench.lb import kill_tree

    victim = stack.servers[stack.restarted_pod]
    kill_tree(victim.proc.pid)  # its workers too: they are not all in its process group
    victim.proc.wait(30)
    p = stack.prometheus
    p.wait(lambda: p.values('up{job="cnnserve"}', "pod") == {"cnnserve-r1": 1.0, stack.restarted_pod: 0.0}, 15,
           "the killed replica's target down")
    p.wait(lambda: {(a["labels"].get("pod"), a["state"]) for a in p.api("alerts")["alerts"]
                    if a["labels"]["alertname"] == "CnnserveScrapeDown"} == {(stack.restarted_pod, "pending")}, 15,
           "CnnserveScrapeDown pending for the killed replica")
