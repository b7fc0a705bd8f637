#!/usr/bin/env python3
"""Renders and validates the percept chart offline (tests/it/fleet.rs runs it).

- `helm lint --strict` and template rendering with Helm's own Go SDK (helm-python-sdk, no
  cluster), for the default values and for a 3-shard install;
- every built-in object checked against the Kubernetes OpenAPI schemas of the chart's
  oldest and newest supported versions (kubernetes-validate, strict: unknown fields fail);
- the Prometheus Operator objects (ServiceMonitor, PrometheusRule) checked field by field;
- the contract checked: StatefulSet replicas = shards with `--shard hostname/N`, workers on
  `--queue`, non-root, probes on /healthz, secrets only through the Secret.

Writes to OUT: rules.yaml (the PrometheusRule's groups, for `promtool check rules`),
live.toml and worker.toml (the ConfigMap, for `percept config check`), and metrics.txt (every
percept_* series the rules and the dashboard name, to check against a running percept).

usage: check.py CHART_DIR OUT_DIR
"""
import json
import re
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

KUBE_VERSIONS = ["1.25.0", "1.33.0"]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def fail(msg):
    print(f"check.py: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def render(chart_dir, values):
    with helm.Chart.load(chart_dir) as chart:
        manifests = chart.render(values, name="percept", namespace="cams", is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                docs.append((path, d))
    return docs


def by_kind(docs, kind):
    return [d for _, d in docs if d["kind"] == kind]


def check_crds(docs):
    for sm in by_kind(docs, "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1", sm["apiVersion"]
        eps = sm["spec"]["endpoints"]
        assert eps and all(e["port"] == "http" and e["path"] == "/metrics" for e in eps), eps
        assert eps[0]["bearerTokenSecret"]["key"] == "PERCEPT_HTTP_TOKEN"
        assert sm["spec"]["selector"]["matchLabels"]
    for pr in by_kind(docs, "PrometheusRule"):
        assert pr["apiVersion"] == "monitoring.coreos.com/v1", pr["apiVersion"]
        for g in pr["spec"]["groups"]:
            assert set(g) <= {"name", "rules", "interval"}, g.keys()
            for r in g["rules"]:
                assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations"}, r
                assert isinstance(r["expr"], str) and r["expr"]


def check_contract(docs, shards):
    (sts,) = by_kind(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == shards, sts["spec"]["replicas"]
    c = sts["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert args[0] == "run" and args[args.index("--shard") + 1] == f"hostname/{shards}", args
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    (dep,) = by_kind(docs, "Deployment")
    wargs = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert wargs[:3] == ["analyze", "--queue", "$(PERCEPT_QUEUE_URL)"], wargs
    for w in (sts, dep):
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for cont in pod["containers"]:
            assert cont["securityContext"]["allowPrivilegeEscalation"] is False
            # Secrets only by reference.
            assert cont["envFrom"][0]["secretRef"]["name"]
            for e in cont.get("env", []):
                assert "PASSWORD" not in e["name"] and "TOKEN" not in e["name"], e
    (secret,) = by_kind(docs, "Secret")
    assert "PERCEPT_HTTP_TOKEN" in secret["stringData"]
    svcs = by_kind(docs, "Service")
    assert any(s["spec"].get("clusterIP") == "None" for s in svcs), "no headless service"
    assert sts["spec"]["serviceName"] in [s["metadata"]["name"] for s in svcs]


def main():
    chart_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    report = helm.lint(str(chart_dir), strict=True, kube_version="v1.33.0")
    problems = [m for m in report.get("messages") or [] if m.get("severity", 0) >= 2]
    if problems or report.get("errors"):
        fail(f"helm lint: {problems} {report.get('errors')}")
    print(f"helm lint --strict: ok ({report.get('total_charts_linted')} chart)")
    for values, shards in [(None, 2), ({"live": {"shards": 3}, "workers": {"replicas": 5}}, 3)]:
        docs = render(str(chart_dir), values)
        kinds = sorted(d["kind"] for _, d in docs)
        for path, d in docs:
            if d["kind"] in CRD_KINDS:
                continue
            for v in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(d, v, strict=True)
                except Exception as e:  # noqa: BLE001 - report which object and why
                    fail(f"{path} ({d['kind']}) against Kubernetes {v}: {e}")
        try:
            check_crds(docs)
            check_contract(docs, shards)
        except (AssertionError, KeyError, ValueError) as e:
            fail(f"contract, shards={shards}: {e!r}")
        print(f"rendered shards={shards}: {len(docs)} objects {kinds}; schemas {KUBE_VERSIONS}: ok")
    (pr,) = by_kind(docs, "PrometheusRule")
    (out / "rules.yaml").write_text(yaml.safe_dump({"groups": pr["spec"]["groups"]}))
    cm = [d for d in by_kind(docs, "ConfigMap") if "live.toml" in d.get("data", {})][0]
    (out / "live.toml").write_text(cm["data"]["live.toml"])
    (out / "worker.toml").write_text(cm["data"]["worker.toml"])
    dash_cm = [d for d in by_kind(docs, "ConfigMap") if "percept.json" in d.get("data", {})][0]
    dash = json.loads(dash_cm["data"]["percept.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in pr["spec"]["groups"] for r in g["rules"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    names = sorted({m for e in exprs for m in re.findall(r"\bpercept_[a-z0-9_]+", e)})
    (out / "metrics.txt").write_text("\n".join(names) + "\n")
    print(f"dashboard: {len(dash['panels'])} panels; rules and dashboard name {len(names)} metrics")


if __name__ == "__main__":
    main()
