"""The chart lints, renders every documented scenario, and each manifest validates."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from helm_chart import (
    CHART,
    KUBERNETES_VERSIONS,
    REQUIRED_SCENARIOS,
    Rendered,
    find_tool,
    helm,
    render_scenario,
    render_text,
    scenario_file,
    scenario_names,
    template_args,
)

pytestmark = pytest.mark.helm

# Kinds from CRDs (cert-manager, Prometheus Operator): not in the Kubernetes schemas;
# checked below by hand.
CRD_KINDS = {"Certificate", "Issuer", "ServiceMonitor"}


def test_documented_scenarios_exist():
    missing = REQUIRED_SCENARIOS - set(scenario_names())
    assert not missing, f"scenario values files missing from {CHART / 'ci'}: {sorted(missing)}"


def test_chart_has_the_community_chart_files():
    for path in (
        "Chart.yaml",
        "values.yaml",
        "values.schema.json",
        "README.md",
        "templates/_helpers.tpl",
        "templates/NOTES.txt",
        ".helmignore",
    ):
        assert (CHART / path).is_file(), path
    json.loads((CHART / "values.schema.json").read_text())


@pytest.mark.parametrize("scenario", scenario_names())
def test_lint_strict(scenario):
    result = helm("lint", "--strict", str(CHART), "-f", str(scenario_file(scenario)), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", scenario_names())
def test_manifests_validate_against_kubernetes(scenario, version):
    text = render_text((str(scenario_file(scenario)),), (), version)
    rendered = Rendered(text)
    assert rendered.objects, "nothing rendered"
    core = [o for o in rendered.objects if o["kind"] not in CRD_KINDS]
    result = subprocess.run(
        [find_tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, "-"],
        input=yaml.safe_dump_all(core),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # A missing schema is only a warning: make sure no core kind slipped through unvalidated.
    assert "Couldn't find schema" not in result.stdout + result.stderr, (
        result.stdout + result.stderr
    )


def test_cert_manager_resources_are_well_formed():
    rendered = render_scenario("cert-manager")
    certificate = rendered.get("Certificate", "fedtune-superlink")
    spec = certificate["spec"]
    assert set(spec) <= {
        "secretName",
        "commonName",
        "dnsNames",
        "ipAddresses",
        "duration",
        "renewBefore",
        "privateKey",
        "usages",
        "issuerRef",
        "isCA",
    }
    assert spec["secretName"] == "fedtune-superlink-tls"
    assert "fedtune-superlink" in spec["dnsNames"]
    assert (
        "superlink.fedtune.example.org" in spec["dnsNames"]
    )  # the external name remote nodes dial
    assert "server auth" in spec["usages"]
    issuer_name = spec["issuerRef"]["name"]
    ca_issuer = rendered.get("Issuer", issuer_name)
    ca_certificate = rendered.get("Certificate", "fedtune-superlink-ca")
    assert ca_issuer["spec"]["ca"]["secretName"] == ca_certificate["spec"]["secretName"]
    assert ca_certificate["spec"]["isCA"] is True
    selfsigned = rendered.get("Issuer", ca_certificate["spec"]["issuerRef"]["name"])
    assert selfsigned["spec"] == {"selfSigned": {}}
    for obj in rendered.of_kind("Certificate") + rendered.of_kind("Issuer"):
        assert obj["apiVersion"] == "cert-manager.io/v1"


def test_cert_manager_uses_a_given_issuer_without_bootstrapping_one():
    text = render_text(
        (str(scenario_file("cert-manager")),),
        ("tls.certManager.issuerRef.name=corp-ca", "tls.certManager.issuerRef.kind=ClusterIssuer"),
    )
    rendered = Rendered(text)
    assert rendered.of_kind("Issuer") == []
    assert [c["metadata"]["name"] for c in rendered.of_kind("Certificate")] == ["fedtune-superlink"]
    ref = rendered.get("Certificate", "fedtune-superlink")["spec"]["issuerRef"]
    assert ref == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


def test_service_monitor_selects_the_metrics_service():
    rendered = render_scenario("gpu")
    monitor = rendered.get("ServiceMonitor", "fedtune")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = rendered.get("Service", "fedtune-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in port_names
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["federation"]


# ------------------------------------------------------ values.schema.json and value checks


def _template_fails(*sets: str, values: tuple[str, ...] = ()) -> str:
    args = template_args(tuple(str(v) for v in values), sets)
    result = helm(*args, check=False)
    assert result.returncode != 0, f"helm template accepted {sets}"
    return result.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("supernodes.replicaCount=-1", "supernodes.replicaCount"),
        ("supernodes.numPartitions=0", "supernodes.numPartitions"),
        ("supernodes.partitionOffset=-2", "supernodes.partitionOffset"),
        ("tls.mode=selfmade", "tls.mode"),
        ("supernodes.modelCache.type=nfs", "supernodes.modelCache.type"),
        ("supernodes.gpu.count=0", "supernodes.gpu.count"),
        ("superlink.service.port=70000", "superlink.service.port"),
        ("supernodes.superlinkAddress=no-port", "supernodes.superlinkAddress"),
        ("supernodes.replicasCount=3", "replicasCount"),  # a typo is an error, not silently ignored
        ("supernodeAuth.mint.backoffLimit=-1", "supernodeAuth.mint.backoffLimit"),
        ("supernodeAuth.existingSecret=Bad_Name", "supernodeAuth.existingSecret"),
    ],
)
def test_schema_rejects_bad_values(setting, message):
    stderr = _template_fails(setting)
    assert "schema" in stderr and message in stderr, stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("supernodes.replicaCount=21",), "exceeds numPartitions"),
        (("supernodes.partitionOffset=19", "supernodes.replicaCount=2"), "exceeds numPartitions"),
        (("superlink.enabled=false",), "supernodes.superlinkAddress"),
        (("superlink.enabled=false", "supernodes.superlinkAddress=a.example:8000"), "tls.caSecret"),
        (("tls.mode=existingSecret",), "tls.existingSecret"),
        (("supernodeAuth.existingSecret=my-keys",), "supernodeAuth.publicKeys"),
        (("superlink.ingress.enabled=true",), "superlink.externalHostname"),
        (("supernodes.modelCache.type=existingClaim",), "supernodes.modelCache.existingClaim"),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(sets, message):
    stderr = _template_fails(*sets)
    assert "fedtune: invalid values" in stderr and message in stderr, stderr
