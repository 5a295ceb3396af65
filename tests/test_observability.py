"""What a monitoring stack sees of cnnserve: the alert rules (deploy/prometheus/rules.yaml and its PrometheusRule copy)
checked and unit-tested by promtool."""

from __future__ import annotations

import collections
import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

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
#: model stays (tests/test_repository.py makes one in a registry of its own)
NOT_MADE = {"cnnserve_model_evictions_total"}
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
