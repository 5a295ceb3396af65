"""The Kubernetes manifests (deploy/kubernetes/), checked offline: every object against the Kubernetes schemas
(kubernetes-validate bundles them) for the oldest and newest releases the project states, strictly (no unknown
field); the GPU variant differs from the CPU one only where it must; the autoscalers read a metric cnnserve
serves; shutdown timing fits the service's drain."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
import yaml

from cnnserve.core.config import DEFAULTS
from tests.conftest import ROOT

KUBE = ROOT / "deploy" / "kubernetes"
VERSIONS = ("1.29.0", "1.37.0")
METRIC = "cnnserve_queued_images"
WRITABLE = "/tmp"  # the image's BENTOML_HOME is under it (deploy/bento/Dockerfile.template)


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


def by_kind(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in documents(name)}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["cnnserve.yaml", "cnnserve-gpu.yaml", "prometheus-adapter.yaml"])
def test_manifests_validate_against_the_kubernetes_schemas(name, version):
    for doc in documents(name):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} is not valid for Kubernetes {version}: "
                        f"{e.message} at {'.'.join(map(str, e.path))}")


def test_the_checker_refuses_a_wrong_field():
    deploy = copy.deepcopy(by_kind("cnnserve.yaml")["Deployment"])
    deploy["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True  # sic
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, VERSIONS[-1], strict=True)


def test_pods_are_locked_down_and_shut_down_within_their_grace():
    for name in ("cnnserve.yaml", "cnnserve-gpu.yaml"):
        pod = by_kind(name)["Deployment"]["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        # the one path it writes is a volume (the container test runs the image read-only with the same path)
        assert [m["mountPath"] for m in c["volumeMounts"]] == [WRITABLE]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == 3000 and ports["grpc"] == DEFAULTS.grpc_port  # gRPC beside HTTP, both served
        assert c["readinessProbe"]["grpc"]["port"] == ports["grpc"]  # gRPC's health service, as /readyz
        assert c["startupProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert all(r in c["resources"]["requests"] and r in c["resources"]["limits"] for r in ("cpu", "memory"))
        # shutdown: preStop, then the drain and the grace period of the service's defaults
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop >= 1 and pod["terminationGracePeriodSeconds"] > pre_stop + DEFAULTS.drain_s + DEFAULTS.grace_s
        objects = by_kind(name)
        labels = objects["Deployment"]["spec"]["selector"]["matchLabels"]
        assert objects["Service"]["spec"]["selector"] == labels == objects["PodDisruptionBudget"]["spec"]["selector"][
            "matchLabels"] == pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]


def test_the_gpu_variant_differs_only_where_it_must():
    cpu, gpu = by_kind("cnnserve.yaml"), by_kind("cnnserve-gpu.yaml")
    assert set(cpu) == set(gpu)
    g = gpu["Deployment"]["spec"]["template"]["spec"]
    assert g["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "providers=cuda" in g["containers"][0]["args"] and "cnnserve-gpu" in g["containers"][0]["image"]
    # the rest is the CPU manifest's, names aside
    strip = yaml.safe_dump(gpu).replace("cnnserve-gpu", "cnnserve")
    same = yaml.safe_load(strip)
    d = same["Deployment"]["spec"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations"):
        d.pop(key)
    c, c_cpu = d["containers"][0], cpu["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    c["resources"], c["args"] = c_cpu["resources"], c_cpu["args"]
    assert same == cpu


def test_autoscalers_read_a_metric_cnnserve_serves():
    from cnnserve.service.metrics import metrics

    served = {m.describe()[0].name for m in vars(metrics()).values()}
    assert METRIC in served
    hpa = by_kind("cnnserve.yaml")["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == by_kind("cnnserve.yaml")["Deployment"]["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == METRIC
    rules = yaml.safe_load(by_kind("prometheus-adapter.yaml")["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert rules[0]["name"]["as"] == METRIC and METRIC in rules[0]["seriesQuery"]
    # KEDA's ScaledObject is a custom resource the bundled schemas do not hold: its documented fields, checked
    (keda,) = documents("keda.yaml")
    assert keda["apiVersion"] == "keda.sh/v1alpha1" and keda["kind"] == "ScaledObject"
    assert keda["spec"]["scaleTargetRef"]["name"] == hpa["spec"]["scaleTargetRef"]["name"]
    (trigger,) = keda["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and METRIC in trigger["metadata"]["query"]
    assert {"serverAddress", "query", "threshold"} <= set(trigger["metadata"])
    assert float(trigger["metadata"]["threshold"]) == float(hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"])


def haproxy_backends() -> dict[str, list[tuple[str, int, str]]]:
    """deploy/haproxy/haproxy.cfg's backends: each one's server lines as (name, port, the rest of the line)."""
    import re

    out: dict[str, list] = {}
    backend = None
    for line in (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text().splitlines():
        if m := re.match(r"^(frontend|backend|defaults|global|listen)\b\s*(\S*)", line):
            backend = m.group(2) if m.group(1) == "backend" else None
            if backend:
                out[backend] = []
        elif backend and (m := re.match(r"^\s+server\s+(\S+)\s+[\d.]+:(\d+)\s*(.*)$", line)):
            out[backend].append((m.group(1), int(m.group(2)), m.group(3)))
    return out


def test_haproxy_replicas_take_no_port_the_documented_servers_use():
    """The balancer's replicas are on ports of their own: the README's servers (`./run.sh up`: HTTP 3000, gRPC
    3001; the second server: 3002 and 3003) are not replicas, and HAProxy's HTTP check on a gRPC port marks
    the replica DOWN ("Layer7 invalid response"). Each replica's gRPC port has a backend of its own, spoken
    to over HTTP/2 and checked on its HTTP port's /readyz; docs/deploying.md names each replica's two ports."""
    import re

    from cnnserve.command.cli import build_parser
    from cnnserve.command.serve import _grpc_port

    readme = (ROOT / "README.md").read_text()
    up = build_parser().parse_args(["up"])
    documented = {up.port, _grpc_port(up)} | {int(p) for p in re.findall(r"--port (\d+)", readme)} \
        | {int(p) for p in re.findall(r"grpc_port=(\d+)", readme)}
    assert {3000, 3001, 3002, 3003} <= documented
    backends = haproxy_backends()
    http, grpc = backends["replicas"], backends["replicas_grpc"]
    assert http and [n for n, _, _ in http] == [n for n, _, _ in grpc]
    ports = [p for _, p, _ in http + grpc]
    assert len(set(ports)) == len(ports) and not set(ports) & documented, (ports, documented)
    deploying = (ROOT / "docs" / "deploying.md").read_text()
    for (name, port, rest), (_, gport, grest) in zip(http, grpc):
        assert rest.split()[0] == "check", rest
        opts = grest.split()
        assert "proto" in opts and opts[opts.index("proto") + 1] == "h2", grest  # gRPC is HTTP/2
        # checked where the replica says it is ready (its HTTP port), over HTTP/1.1
        assert int(opts[opts.index("port") + 1]) == port and opts[opts.index("check-proto") + 1] == "h1", grest
        assert f"--port {port} --arg grpc_port={gport}" in deploying, (name, port, gport)
    cfg = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    assert re.search(r"^\s+bind .* proto h2\s*$", cfg, re.M), "no HTTP/2 frontend for gRPC"


def test_serving_md_lists_every_metric_once_with_its_labels():
    """docs/serving.md's `/metrics` row is the one place that names what cnnserve adds to `/metrics`: one row
    (there were two, with different labels), every metric the service defines in it, with its labels as
    Prometheus shows them (a counter's name ends in _total)."""
    from cnnserve.service.metrics import metrics

    rows = [line for line in (ROOT / "docs" / "serving.md").read_text().splitlines()
            if line.startswith("| `/readyz`, `/livez`, `/metrics` |")]
    assert len(rows) == 1, rows
    missing = []
    for m in vars(metrics()).values():
        name = m._name + ("_total" if m._type == "counter" else "")
        if f"`{name}{{{','.join(m._labelnames)}}}`" not in rows[0]:
            missing.append(f"{name}{{{','.join(m._labelnames)}}}")
    assert not missing, missing
