"""The shipped NetworkPolicies: only the monitoring namespace reaches the
collectors' /metrics port, and a kustomization of one's own can name another."""
from __future__ import annotations

import os

import pytest

from tests.test_deploy import DEPLOY, KUBECTL, by_kind, kustomize


@pytest.fixture(scope="module")
def policies() -> dict[str, dict]:
    if not os.access(KUBECTL, os.X_OK):
        pytest.skip("kubectl missing")
    kinds = by_kind(kustomize(DEPLOY))
    return {p["metadata"]["name"]: (p, kinds) for p in kinds["NetworkPolicy"]}


def _selected_pods(policy: dict, workloads: list[dict]) -> list[str]:
    want = policy["spec"]["podSelector"]["matchLabels"].items()
    return [w["metadata"]["name"] for w in workloads
            if want <= w["spec"]["template"]["metadata"]["labels"].items()]


def test_only_the_monitoring_namespace_reaches_metrics(policies):
    assert set(policies) == {"planewatch-metrics", "planewatch-cluster-metrics"}
    for name, (policy, kinds) in policies.items():
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        assert spec["ingress"] == [{
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            "ports": [{"port": "metrics", "protocol": "TCP"}]}]
        workloads = kinds["DaemonSet"] + kinds["Deployment"]
        selected = _selected_pods(policy, workloads)
        assert len(selected) == 1, (name, selected)
        # the named port exists on the selected pods
        pod = next(w for w in workloads if w["metadata"]["name"] == selected[0])
        ports = {p["name"] for c in pod["spec"]["template"]["spec"]["containers"] for p in c.get("ports", ())}
        assert "metrics" in ports


def test_the_scraping_namespace_is_a_kustomize_patch_away(tmp_path):
    if not os.access(KUBECTL, os.X_OK):
        pytest.skip("kubectl missing")
    rel = os.path.relpath(DEPLOY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"""resources: [{rel}]
patches:
  - target: {{kind: NetworkPolicy}}
    patch: |-
      - op: replace
        path: /spec/ingress/0/from/0/namespaceSelector/matchLabels/kubernetes.io~1metadata.name
        value: prometheus
""")
    policies = by_kind(kustomize(tmp_path))["NetworkPolicy"]
    assert len(policies) == 2
    for p in policies:
        assert p["spec"]["ingress"][0]["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prometheus"}}}]
