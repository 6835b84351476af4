"""Invariants of the rendered manifests that a wrong template would break silently on a cluster.

Where it matters, the launchers the containers run (superlink/launch.py, supernode/launch.py) are
fed the rendered args/env, so the chart and the launchers are checked against each other.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import tomllib
import yaml
from helm_chart import (
    CHART,
    CONTROL_SCRIPT,
    REPO,
    container,
    env_of,
    load_scenario_values,
    mount_of,
    render,
    render_scenario,
    scenario_file,
    scenario_names,
)

from fedtune import k8s_keys
from fedtune.auth import parse_private_key, parse_public_key
from fedtune.certs import TlsFiles, certificate_sans, check_server_files
from superlink import launch as superlink_launch
from supernode import launch as supernode_launch
from tests.kube_api_fake import FakeKubeApi

pytestmark = pytest.mark.helm

CERTS = "/certs"


def _superlink(rendered):
    deployment = rendered.get("Deployment", "fedtune-superlink")
    spec = deployment["spec"]["template"]["spec"]
    return deployment, spec, container(spec, "superlink")


def _supernodes(rendered):
    statefulset = rendered.get("StatefulSet", "fedtune-supernode")
    spec = dict(statefulset["spec"]["template"]["spec"])
    spec["_volumeClaimTemplates"] = statefulset["spec"].get("volumeClaimTemplates", [])
    return statefulset, spec, container(spec, "supernode")


def _scenarios_with(component: str) -> list[str]:
    key = {"superlink": "superlink", "supernode": "supernodes"}[component]
    return [s for s in scenario_names() if load_scenario_values(s)[key]["enabled"]]


# ------------------------------------------------------------------ every container


@pytest.mark.parametrize("scenario", scenario_names())
def test_every_container_disables_flower_telemetry(scenario):
    for owner, spec in render_scenario(scenario).pod_specs():
        for item in spec["containers"] + spec.get("initContainers", []):
            env = env_of(item)
            assert env.get("FLWR_TELEMETRY_ENABLED", {}).get("value") == "0", (owner, item["name"])
            assert env.get("FLWR_DISABLE_UPDATE_CHECK", {}).get("value") == "1", (
                owner,
                item["name"],
            )


@pytest.mark.parametrize("scenario", scenario_names())
def test_pods_run_unprivileged(scenario):
    for owner, spec in render_scenario(scenario).pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, owner
        assert spec["automountServiceAccountToken"] is False, owner
        for item in spec["containers"]:
            context = item["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, owner
            assert context["capabilities"]["drop"] == ["ALL"], owner
            assert "limits" in item["resources"] and "memory" in item["resources"]["limits"], owner


@pytest.mark.parametrize("scenario", scenario_names())
def test_services_select_their_pods(scenario):
    rendered = render_scenario(scenario)
    pod_labels = []
    for obj in rendered.of_kind("Deployment") + rendered.of_kind("StatefulSet"):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pod_labels.append(labels)
    for service in rendered.of_kind("Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), service[
            "metadata"
        ]["name"]


# ------------------------------------------------------------------ TLS


@pytest.mark.parametrize("scenario", _scenarios_with("superlink"))
def test_superlink_launcher_reads_the_mounted_tls_files(scenario):
    rendered = render_scenario(scenario)
    _, spec, item = _superlink(rendered)
    volume = mount_of(spec, item, CERTS)
    args = superlink_launch.build_parser().parse_args(item["args"])
    # Each file the launcher opens is a key of the mounted Secret (kubernetes.io/tls layout).
    for path in (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile):
        assert path is not None and Path(path).parent == Path(CERTS), path
    keys = {Path(p).name for p in (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile)}
    assert keys == {"ca.crt", "tls.crt", "tls.key"}
    assert not args.insecure
    secret_name = volume["secret"]["secretName"]
    values = load_scenario_values(scenario)
    if values["tls"]["mode"] == "existingSecret":
        assert secret_name == values["tls"]["existingSecret"]
    elif values["tls"]["mode"] == "certManager":
        assert rendered.get("Certificate", "fedtune-superlink")["spec"]["secretName"] == secret_name
    else:
        secret = rendered.get("Secret", secret_name)
        assert set(secret["data"]) == keys
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_chart_generated_certificate_passes_the_launcher_checks(tmp_path):
    rendered = render_scenario("gpu")
    secret = rendered.get("Secret", "fedtune-superlink-tls")
    for key, value in secret["data"].items():
        (tmp_path / key).write_bytes(base64.b64decode(value))
    files = TlsFiles(tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key")
    check_server_files(files)  # key matches, issued by the CA, not expired
    names = certificate_sans(files.server_cert)
    service = "fedtune-superlink"
    assert {
        service,
        f"{service}.federation.svc",
        f"{service}.federation.svc.cluster.local",
        "superlink.fedtune.example.org",
        "localhost",  # the Fleet proxy verifies the SuperLink behind it under this name
        "127.0.0.1",  # every in-pod client (SuperExec, exporter, control container) dials this address
    } <= names


def test_generated_tls_is_reused_across_upgrades():
    template = (CHART / "templates" / "tls-secret.yaml").read_text()
    assert re.search(r'lookup "v1" "Secret"', template), (
        "generate mode must reuse the Secret it made"
    )


@pytest.mark.parametrize("scenario", _scenarios_with("supernode"))
def test_supernodes_verify_the_superlink_with_the_mounted_ca(scenario, monkeypatch):
    rendered = render_scenario(scenario)
    _, spec, item = _supernodes(rendered)
    env = env_of(item)
    root = env["FEDTUNE_ROOT_CERTIFICATES"]["value"]
    volume = mount_of(spec, item, str(Path(root).parent))
    assert [i["key"] for i in volume["secret"]["items"]] == [Path(root).name] == ["ca.crt"]
    values = load_scenario_values(scenario)
    expected_secret = values["tls"]["caSecret"] or (
        values["tls"]["existingSecret"]
        if values["tls"]["mode"] == "existingSecret"
        else "fedtune-superlink-tls"
    )
    assert volume["secret"]["secretName"] == expected_secret
    assert "FEDTUNE_INSECURE" not in env
    address = env["FEDTUNE_SUPERLINK"]["value"]
    if values["superlink"]["enabled"]:
        assert address == "fedtune-superlink.federation.svc:8000"
    else:
        assert address == values["supernodes"]["superlinkAddress"]


def _control(rendered):
    _, spec, _ = _superlink(rendered)
    return spec, container(spec, "control")


@pytest.mark.parametrize("scenario", _scenarios_with("superlink"))
def test_control_container_dials_the_loopback_api_with_the_ca(scenario, tmp_path, monkeypatch):
    """Key registration and run submission happen inside the SuperLink pod, over 127.0.0.1:<internal>."""
    rendered = render_scenario(scenario)
    # No Job talks to the Control API any more: through the Service it would meet the proxy's 403.
    assert [j["metadata"]["labels"]["app.kubernetes.io/component"] for j in rendered.of_kind("Job")] in (
        [], ["supernode-keys"]
    )
    _, _, superlink = _superlink(rendered)
    spec, item = _control(rendered)
    env = env_of(item)
    internal = env_of(superlink)["FEDTUNE_INTERNAL_PORT"]["value"]
    assert env["FEDTUNE_CONTROL_ADDRESS"]["value"] == f"127.0.0.1:{internal}"
    assert item["image"] == superlink["image"]
    assert mount_of(spec, item, CERTS)["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert env["FEDTUNE_ROOT_CERTIFICATES"]["value"] == f"{CERTS}/ca.crt"
    assert env["FLWR_HOME"]["value"].startswith("/tmp")  # writable (read-only root fs)
    assert mount_of(spec, item, "/tmp")["emptyDir"] == {}
    # its records live on the SuperLink's state volume, next to the database
    assert mount_of(spec, item, "/state") == mount_of(spec, superlink, "/state")
    assert env["FEDTUNE_CONTROL_STATE"]["value"].startswith("/state/")
    # the script it runs is the chart's files/control.py, from the control ConfigMap
    config_map = rendered.get("ConfigMap", mount_of(spec, item, "/etc/fedtune/control")["configMap"]["name"])
    assert item["command"] == ["python3", "/etc/fedtune/control/control.py"]
    assert config_map["data"]["control.py"].strip() == CONTROL_SCRIPT.read_text().strip()
    # the connection it writes is the one `kubectl exec -c control -- flwr ...` users get
    control = _load_control(monkeypatch, **{k: v["value"] for k, v in env.items() if "value" in v})
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    control.write_connection()
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"]["default"] == control.CONNECTION == "remote-deployment"
    assert config["superlink"]["remote-deployment"] == {
        "address": f"127.0.0.1:{internal}", "root-certificates": f"{CERTS}/ca.crt"
    }


def _load_control(monkeypatch, **env):
    import importlib.util

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("fedtune_chart_control", CONTROL_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ partitions


@pytest.mark.parametrize("scenario", _scenarios_with("supernode"))
def test_pod_ordinal_plus_offset_is_the_partition_id(scenario, monkeypatch):
    rendered = render_scenario(scenario)
    statefulset, _, item = _supernodes(rendered)
    values = load_scenario_values(scenario)["supernodes"]
    env = env_of(item)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["FEDTUNE_PARTITION_FROM_ORDINAL"]["value"] == "1"
    for name, var in env.items():
        if "value" in var and name.startswith("FEDTUNE_"):
            monkeypatch.setenv(name, var["value"])
    seen = set()
    for ordinal in range(statefulset["spec"]["replicas"]):
        monkeypatch.setenv("POD_NAME", f"{statefulset['metadata']['name']}-{ordinal}")
        args = supernode_launch.build_parser().parse_args([])
        partition = supernode_launch.resolve_partition(args)
        assert partition == ordinal + values["partitionOffset"]
        assert args.num_partitions == values["numPartitions"]
        assert (
            f"partition-id={partition} num-partitions={values['numPartitions']}"
            in supernode_launch.node_config(args, partition)
        )
        seen.add(partition)
    assert len(seen) == values["replicaCount"]


def test_multi_cluster_sites_train_disjoint_partitions():
    # The GPU reference cluster hosts the SuperLink; the SuperNodes-only site joins it.
    main = render_scenario("gpu")
    remote = render_scenario("supernodes-only")

    def partitions(rendered):
        statefulset, _, item = _supernodes(rendered)
        env = env_of(item)
        offset = int(env["FEDTUNE_PARTITION_OFFSET"]["value"])
        total = int(env["FEDTUNE_NUM_PARTITIONS"]["value"])
        return total, set(range(offset, offset + statefulset["spec"]["replicas"]))

    (main_total, main_set), (remote_total, remote_set) = partitions(main), partitions(remote)
    assert main_total == remote_total
    assert main_set.isdisjoint(remote_set)


# ------------------------------------------------------------------ GPUs


@pytest.mark.parametrize("scenario", scenario_names())
def test_gpu_limits_only_in_gpu_mode(scenario):
    rendered = render_scenario(scenario)
    gpu = load_scenario_values(scenario)["supernodes"]["gpu"]
    for owner, spec in rendered.pod_specs():
        for item in spec["containers"]:
            resources = item.get("resources", {})
            has_gpu = any("gpu" in key for part in resources.values() for key in part)
            is_supernode = owner == "fedtune-supernode"
            assert has_gpu == (gpu["enabled"] and is_supernode), (owner, resources)
            if has_gpu:
                assert resources["limits"][gpu["resourceName"]] == gpu["count"]
                assert item["image"].endswith(":cuda")
            elif is_supernode:
                assert item["image"].endswith(":cpu")
                assert "runtimeClassName" not in spec


def test_gpu_reference_schedules_on_gpu_nodes():
    _, spec, _ = _supernodes(render_scenario("gpu"))
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert "podAntiAffinity" in spec["affinity"]


# ------------------------------------------------------------------ persistence


def test_superlink_state_and_outputs_are_on_claims():
    rendered = render_scenario("default")
    deployment, spec, item = _superlink(rendered)
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one writer of the RWO claims
    assert deployment["spec"]["replicas"] == 1
    env = env_of(item)
    database = Path(env["FEDTUNE_DATABASE"]["value"])
    outputs = env["FEDTUNE_OUTPUT_DIR"]["value"]
    for mount_path, claim in (
        (str(database.parent), "fedtune-superlink-state"),
        (outputs, "fedtune-outputs"),
    ):
        volume = mount_of(spec, item, mount_path)
        assert volume["persistentVolumeClaim"]["claimName"] == claim
        pvc = rendered.get("PersistentVolumeClaim", claim)
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert pvc["spec"]["resources"]["requests"]["storage"]


def test_existing_claims_are_used_instead_of_new_ones():
    rendered = render(
        "superlink.persistence.existingClaim=my-state", "outputs.persistence.existingClaim=my-out"
    )
    _, spec, item = _superlink(rendered)
    assert mount_of(spec, item, "/state")["persistentVolumeClaim"]["claimName"] == "my-state"
    assert mount_of(spec, item, "/outputs")["persistentVolumeClaim"]["claimName"] == "my-out"
    assert rendered.of_kind("PersistentVolumeClaim") == []


@pytest.mark.parametrize(
    ("cache_type", "sets", "volume_key"),
    [
        ("volumeClaimTemplate", (), "volumeClaimTemplate"),
        ("hostPath", (), "hostPath"),
        ("emptyDir", (), "emptyDir"),
        ("existingClaim", ("supernodes.modelCache.existingClaim=models",), "persistentVolumeClaim"),
    ],
)
def test_model_cache_volume_backs_hf_home(cache_type, sets, volume_key):
    rendered = render(f"supernodes.modelCache.type={cache_type}", *sets)
    statefulset, spec, item = _supernodes(rendered)
    env = env_of(item)
    for var in ("HF_HOME", "FEDTUNE_CACHE"):
        assert env[var]["value"].startswith("/cache/")
    volume = mount_of(spec, item, "/cache")
    assert volume_key in volume
    has_templates = bool(statefulset["spec"].get("volumeClaimTemplates"))
    assert has_templates == (cache_type == "volumeClaimTemplate")


# ------------------------------------------------------------------ secrets

SECRETISH_KEY = re.compile(
    r"(password|passwd|token|secret|private|apikey|api_key|credential)", re.I
)
SECRETISH_VALUE = re.compile(
    r"(-----BEGIN [A-Z ]*PRIVATE KEY-----|\bhf_[A-Za-z0-9]{10,}|\bghp_[A-Za-z0-9]{10,})"
)


def _walk(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, (*path, str(index)))
    else:
        yield path, node


@pytest.mark.parametrize(
    "values_file", ["values.yaml", *[f"ci/{s}-values.yaml" for s in scenario_names()]]
)
def test_no_plaintext_secret_in_values(values_file):
    text = (CHART / values_file).read_text()
    assert not SECRETISH_VALUE.search(text), f"{values_file} holds secret material"
    for path, value in _walk(yaml.safe_load(text) or {}):
        leaf = path[-1]
        if SECRETISH_KEY.search(leaf) and isinstance(value, str) and value:
            # Only references are allowed: names of Secrets, or keys inside them.
            allowed = path[-2:] in {
                ("hfTokenSecret", "name"),
                ("hfTokenSecret", "key"),
            } or leaf in {"existingSecret", "caSecret"}
            assert allowed, f"{values_file}: {'.'.join(path)} looks like a plaintext secret"


@pytest.mark.parametrize("scenario", scenario_names())
def test_secrets_reach_pods_only_by_reference(scenario):
    rendered = render_scenario(scenario)
    # The only Secrets the chart writes are the generated TLS ones (made in-cluster, never in values);
    # the CA's key, kept to re-sign the server certificate, is mounted by no pod.
    assert [s["metadata"]["name"] for s in rendered.of_kind("Secret")] in (
        [],
        ["fedtune-superlink-tls-ca", "fedtune-superlink-tls"],
    )
    for _, spec in rendered.pod_specs():
        assert "fedtune-superlink-tls-ca" not in json.dumps(spec.get("volumes", []))
    for owner, spec in rendered.pod_specs():
        for item in spec["containers"]:
            for name, var in env_of(item).items():
                if SECRETISH_KEY.search(name) or name.endswith("_TOKEN"):
                    assert "secretKeyRef" in var.get("valueFrom", {}), (owner, name)
    for config_map in rendered.of_kind("ConfigMap"):
        assert not SECRETISH_VALUE.search(json.dumps(config_map["data"])), config_map["metadata"][
            "name"
        ]


def test_hf_token_comes_from_the_existing_secret():
    _, _, item = _supernodes(render_scenario("gpu"))
    assert env_of(item)["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "hf-token",
        "key": "token",
    }
    _, _, item = _supernodes(render_scenario("default"))
    assert "HF_TOKEN" not in env_of(item)


# ------------------------------------------------------------------ SuperNode auth


MINT = "fedtune-mint-supernode-keys"
MINTED_SECRET = "fedtune-supernode-auth"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _pods(rendered) -> list[str]:
    statefulset = rendered.get("StatefulSet", "fedtune-supernode")
    return [f"{statefulset['metadata']['name']}-{i}" for i in range(statefulset["spec"]["replicas"])]


def _mint_job(rendered):
    job = rendered.get("Job", MINT)
    spec = job["spec"]["template"]["spec"]
    item = container(spec, "mint-keys")
    return job, spec, item, k8s_keys.build_parser().parse_args(item["args"])


def _use_container_env(monkeypatch, item, **replace):
    """The container's literal env in this process, paths remapped (mount point -> local folder)."""
    for name, var in env_of(item).items():
        if "value" in var and name.startswith("FEDTUNE_"):
            value = var["value"]
            for old, new in replace.items():
                value = value.replace(old, new)
            monkeypatch.setenv(name, value)


def _superlink_command(rendered, tmp_path, monkeypatch) -> list[str]:
    """What the SuperLink launcher runs for the rendered args/env, with the chart's TLS Secret as /certs."""
    certs = tmp_path / "certs"
    certs.mkdir(exist_ok=True)
    for key, value in rendered.get("Secret", "fedtune-superlink-tls")["data"].items():
        (certs / key).write_bytes(base64.b64decode(value))
    _, _, item = _superlink(rendered)
    _use_container_env(monkeypatch, item)
    argv = [arg.replace(f"{CERTS}/", f"{certs}/") for arg in item["args"]]
    return superlink_launch.build_command(superlink_launch.build_parser().parse_args(argv))


def _own_key_secret(spec, node) -> str:
    """The SuperNode container mounts only a memory emptyDir that the own-key init container fills
    with this pod's key; the Secret of every node's key is mounted in that init container alone."""
    assert mount_of(spec, node, "/auth")["emptyDir"]["medium"] == "Memory"
    mounted = {m["name"] for m in node["volumeMounts"]}
    init = container({"containers": spec["initContainers"]}, "own-key")
    secret_volume = mount_of(spec, init, "/all-keys")
    assert secret_volume["name"] not in mounted
    assert mount_of(spec, init, "/auth") == mount_of(spec, node, "/auth")
    script = init["args"][0]
    assert 'cp "/all-keys/$POD_NAME" "/auth/$POD_NAME"' in script and "chmod 0400" in script
    return secret_volume["secret"]["secretName"]


def test_own_key_init_container_copies_only_its_pods_key(tmp_path):
    """Run the rendered init script (sh) on a folder laid out like the mounted Secret."""
    import subprocess

    rendered = render_scenario("default")
    _, spec, _ = _supernodes(rendered)
    init = container({"containers": spec["initContainers"]}, "own-key")
    script = init["args"][0].replace("/all-keys/", f"{tmp_path}/all/").replace("/auth/", f"{tmp_path}/auth/")
    (tmp_path / "all").mkdir()
    (tmp_path / "auth").mkdir()
    for pod in _pods(rendered):
        (tmp_path / "all" / pod).write_text(f"private key of {pod}\n")
        (tmp_path / "all" / f"{pod}.pub").write_text(f"public key of {pod}\n")
    pod = _pods(rendered)[1]
    done = subprocess.run(["sh", "-c", script], env={"POD_NAME": pod, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (tmp_path / "auth").iterdir()] == [pod]
    assert (tmp_path / "auth" / pod).stat().st_mode & 0o777 == 0o400
    # a pod whose key is missing fails with one line naming the Secret, and copies nothing
    done = subprocess.run(["sh", "-c", script], env={"POD_NAME": "fedtune-supernode-7", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "has no key named fedtune-supernode-7" in done.stderr


def test_default_install_turns_auth_on_with_keys_minted_in_the_cluster(tmp_path, monkeypatch):
    rendered = render_scenario("default")
    assert load_scenario_values("default")["supernodeAuth"]["enabled"] is True
    _, _, superlink = _superlink(rendered)
    assert "--enable-supernode-auth" in superlink["args"] and "--no-supernode-auth" not in superlink["args"]
    assert env_of(superlink)["FEDTUNE_SUPERNODE_AUTH"]["value"] == "1"
    assert "--enable-supernode-auth" in _superlink_command(rendered, tmp_path, monkeypatch)
    statefulset, spec, node = _supernodes(rendered)
    # kubelet expands $(POD_NAME): each pod reads the key named after it, which only it holds
    assert env_of(node)["FEDTUNE_AUTH_KEY"]["value"] == "/auth/$(POD_NAME)"
    assert _own_key_secret(spec, node) == MINTED_SECRET
    # the mint Job, fed through its own parser, makes keys for exactly these pods in exactly that Secret
    _, _, _, args = _mint_job(rendered)
    assert args.secret == MINTED_SECRET and args.namespace == "federation"
    assert k8s_keys.pod_names(args.statefulset, args.replicas) == _pods(rendered)
    assert args.statefulset == statefulset["metadata"]["name"]


def test_mint_hooks_run_before_the_supernodes_with_least_privilege():
    rendered = render_scenario("default")
    job, spec, item, args = _mint_job(rendered)
    weights = {}
    for kind in ("ServiceAccount", "Role", "RoleBinding", "Job"):
        annotations = rendered.get(kind, MINT)["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade", kind
        assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"].split(","), kind
        weights[kind] = int(annotations["helm.sh/hook-weight"])
    assert max(weights[k] for k in ("ServiceAccount", "Role", "RoleBinding")) < weights["Job"]
    # Role: get/patch on the one Secret by name; create cannot be limited by name in RBAC, so it is apart.
    role = rendered.get("Role", MINT)
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [args.secret], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]
    binding = rendered.get("RoleBinding", MINT)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": MINT}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": MINT, "namespace": "federation"}]
    # nothing else in the chart gets any Kubernetes API rights
    assert [r["metadata"]["name"] for r in rendered.of_kind("Role") + rendered.of_kind("RoleBinding")] == [MINT] * 2
    assert rendered.of_kind("ClusterRole") == rendered.of_kind("ClusterRoleBinding") == []
    assert rendered.get("ServiceAccount", MINT)["automountServiceAccountToken"] is False
    # only this pod holds a token: projected (short-lived) where client libraries look for it
    assert spec["serviceAccountName"] == MINT and spec["automountServiceAccountToken"] is False
    sources = mount_of(spec, item, SERVICE_ACCOUNT_DIR)["projected"]["sources"]
    token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
    assert token["path"] == "token" and token["expirationSeconds"] <= 3600
    assert {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in sources
    assert any(s.get("downwardAPI", {}).get("items", [{}])[0].get("path") == "namespace" for s in sources)
    assert Path(k8s_keys.SERVICE_ACCOUNT_DIR) == Path(SERVICE_ACCOUNT_DIR)  # the script's default
    # its command is a console script of the images (the SuperNode image, as the StatefulSet's pods)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert item["command"] == ["fedtune-k8s-keys"] and scripts["fedtune-k8s-keys"] == "fedtune.k8s_keys:main"
    _, _, node = _supernodes(rendered)
    assert item["image"] == node["image"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_control_container_reads_only_the_minted_public_keys():
    for sets in ((), ("supernodes.replicaCount=3", "supernodes.numPartitions=3")):
        rendered = render(*sets)
        pods = _pods(rendered)
        _, _, _, args = _mint_job(rendered)
        assert k8s_keys.pod_names(args.statefulset, args.replicas) == pods
        spec, item = _control(rendered)
        volume = mount_of(spec, item, "/keys/minted")
        assert volume["secret"]["secretName"] == args.secret
        # never a private key: only `<pod>.pub`, as file `<pod>` (the name it is registered under)
        assert volume["secret"]["items"] == [{"key": f"{pod}.pub", "path": pod} for pod in pods]
        assert env_of(item)["FEDTUNE_KEY_DIRS"]["value"].split(":") == ["/keys/minted", "/keys/values"]
        # and no container of the SuperLink pod mounts the Secret any other way
        for volume in spec["volumes"]:
            if volume.get("secret", {}).get("secretName") == args.secret:
                assert all(i["key"].endswith(".pub") for i in volume["secret"]["items"]), volume


def test_minted_secret_feeds_the_supernode_launcher_and_the_control_container(tmp_path, monkeypatch, capsys):
    """The mint Job's rendered args against a fake API server, its Secret mounted as the pods see it."""
    rendered = render_scenario("default")
    _, _, item, _ = _mint_job(rendered)
    with FakeKubeApi(tmp_path, namespace="federation") as api:
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
        k8s_keys.main([*item["args"], "--service-account-dir", str(api.service_account_dir)])
        data = api.secret(MINTED_SECRET)
    assert "minted a key for fedtune-supernode-1" in capsys.readouterr().out
    auth = tmp_path / "auth"
    auth.mkdir()
    for key, value in data.items():
        (auth / key).write_bytes(value)
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = rendered.get("Secret", "fedtune-superlink-tls")["data"]["ca.crt"]
    (certs / "ca.crt").write_bytes(base64.b64decode(ca))
    _, _, node = _supernodes(rendered)
    for pod in _pods(rendered):
        monkeypatch.setenv("POD_NAME", pod)
        _use_container_env(monkeypatch, node, **{"$(POD_NAME)": pod, "/auth/": f"{auth}/", f"{CERTS}/": f"{certs}/"})
        cmd = supernode_launch.build_command(supernode_launch.build_parser().parse_args([]))
        assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(auth / pod)
    spec, _ = _control(rendered)
    for entry in next(v for v in spec["volumes"] if v["name"] == "minted-keys")["secret"]["items"]:
        public = parse_public_key(data[entry["key"]], entry["key"])
        private = parse_private_key(data[entry["path"]], entry["path"])
        assert public.public_numbers() == private.public_key().public_numbers()


def test_auth_off_renders_no_supernode_auth(tmp_path, monkeypatch):
    rendered = render("supernodeAuth.enabled=false")
    _, _, superlink = _superlink(rendered)
    assert "--enable-supernode-auth" not in superlink["args"]
    # the launcher's default over TLS is auth on: with auth off in values it must be told so
    assert "--no-supernode-auth" in superlink["args"]
    assert "--enable-supernode-auth" not in _superlink_command(rendered, tmp_path, monkeypatch)
    _, spec, node = _supernodes(rendered)
    assert "FEDTUNE_AUTH_KEY" not in env_of(node)
    assert not {"auth", "all-keys"} & {v["name"] for v in spec["volumes"]}
    assert "initContainers" not in spec
    for kind in ("Job", "ServiceAccount", "Role", "RoleBinding"):
        assert rendered.maybe(kind, MINT) is None, kind
    superlink_spec, _ = _control(rendered)
    assert not {"minted-keys", "values-keys"} & {v["name"] for v in superlink_spec["volumes"]}


def test_existing_secret_skips_minting_and_registers_the_given_public_keys(tmp_path, monkeypatch):
    rendered = render_scenario("auth")
    assert "--enable-supernode-auth" in _superlink_command(rendered, tmp_path, monkeypatch)
    for kind in ("Job", "ServiceAccount", "Role", "RoleBinding"):
        assert rendered.maybe(kind, MINT) is None, kind
    _, spec, node = _supernodes(rendered)
    assert env_of(node)["FEDTUNE_AUTH_KEY"]["value"] == "/auth/$(POD_NAME)"
    assert _own_key_secret(spec, node) == "fedtune-supernode-keys"
    # Pod names are the Secret keys the docs ask for, and the names of the registered public keys.
    pods = set(_pods(rendered))
    assert set(load_scenario_values("auth")["supernodeAuth"]["publicKeys"]) == pods
    control_spec, control = _control(rendered)
    keys_volume = mount_of(control_spec, control, "/keys/values")
    keys = rendered.get("ConfigMap", keys_volume["configMap"]["name"])["data"]
    assert set(keys) == pods and all(k.startswith("ecdsa-sha2-nistp384 ") for k in keys.values())
    assert "minted-keys" not in {v["name"] for v in control_spec["volumes"]}


def test_public_keys_of_other_clusters_are_registered_next_to_the_minted_ones():
    key = load_scenario_values("auth")["supernodeAuth"]["publicKeys"]["fedtune-supernode-0"]
    rendered = render(f"supernodeAuth.publicKeys.site-b-supernode-0={key}")
    spec, item = _control(rendered)
    config_map = rendered.get("ConfigMap", mount_of(spec, item, "/keys/values")["configMap"]["name"])
    assert config_map["data"] == {"site-b-supernode-0": key}
    assert mount_of(spec, item, "/keys/minted")["secret"]["secretName"] == MINTED_SECRET
    assert rendered.maybe("Job", MINT) is not None


def test_supernodes_only_site_mints_keys_but_leaves_registration_to_the_superlink():
    rendered = render_scenario("supernodes-only")
    _, _, _, args = _mint_job(rendered)
    assert k8s_keys.pod_names(args.statefulset, args.replicas) == _pods(rendered)
    _, spec, node = _supernodes(rendered)
    assert _own_key_secret(spec, node) == args.secret
    assert rendered.of_kind("Deployment") == []
    assert rendered.of_kind("ConfigMap") == []  # no control loop: nothing here talks to the Control API


def test_docs_explain_in_cluster_keys_and_the_control_api_limit():
    for path in (CHART / "README.md", REPO / "docs" / "reliability.md", REPO / "README.md"):
        text = path.read_text()
        assert "fedtune-k8s-keys" in text and "Control API" in text, path
        assert "NetworkPolic" in text, path
    values = (CHART / "values.yaml").read_text()
    assert "## @param supernodeAuth.mint.resources" in values and "cannot write OpenSSH ECDSA keys" in values


# ------------------------------------------------------ SuperLink, run, monitoring, helm test


def test_superlink_probes_use_the_https_api_and_the_grpc_health_port():
    _, _, item = _superlink(render_scenario("default"))
    ports = {p["name"]: p["containerPort"] for p in item["ports"]}
    env = env_of(item)
    assert ports["https"] == int(env["FEDTUNE_PORT"]["value"]) == 8000
    # Flower's own port is bound to the pod's loopback: no container port, Service or probe names it
    assert int(env["FEDTUNE_INTERNAL_PORT"]["value"]) == 9000
    assert 9000 not in ports.values()
    assert ports["health"] == int(env["FEDTUNE_HEALTH_PORT"]["value"]) == 9095
    assert ports["metrics"] == int(env["FEDTUNE_METRICS_PORT"]["value"]) == 9400
    assert item["readinessProbe"]["httpGet"] == {
        "path": "/health",
        "port": "https",
        "scheme": "HTTPS",
    }
    assert item["livenessProbe"]["grpc"]["port"] == 9095
    assert env["FEDTUNE_HOST"]["value"] == "0.0.0.0"


def test_supernodes_only_deploys_no_superlink():
    rendered = render_scenario("supernodes-only")
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered.objects}
    assert not any("superlink" in name for _, name in kinds), kinds
    # The only Job mints this cluster's SuperNode keys; registering them is the SuperLink operator's job.
    assert [j["metadata"]["name"] for j in rendered.of_kind("Job")] == ["fedtune-mint-supernode-keys"]
    assert rendered.of_kind("PersistentVolumeClaim") == []
    assert rendered.of_kind("Pod") == []  # nothing local to `helm test`


def test_external_access_for_other_clusters():
    service = render_scenario("gpu").get("Service", "fedtune-superlink")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    ingress = render_scenario("cert-manager").get("Ingress", "fedtune-superlink")
    assert (
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"
    )
    assert ingress["spec"]["rules"][0]["host"] == "superlink.fedtune.example.org"


def test_control_container_submits_the_configured_run_once_per_configuration(monkeypatch, tmp_path):
    rendered = render_scenario("default")
    assert not [j for j in rendered.of_kind("Job") if "run" in j["metadata"]["name"]]
    spec, item = _control(rendered)
    config_map = rendered.get("ConfigMap", mount_of(spec, item, "/etc/fedtune/control")["configMap"]["name"])
    request = json.loads(config_map["data"]["run.json"])
    assert request == {"enabled": True, "app": "/app", "profile": "profiles/demo.toml", "runConfig": "", "tag": ""}
    gpu = json.loads(render_scenario("gpu").get("ConfigMap", "fedtune-control")["data"]["run.json"])
    assert gpu["profile"] == "" and gpu["enabled"] is True
    # A new request (helm upgrade) reaches the running pod through the mounted ConfigMap: the pod template
    # does not change with it, so the SuperLink is not restarted.
    again = render("run.runConfig=num-server-rounds=1", "run.tag=2")
    assert again.get("Deployment", "fedtune-superlink")["spec"] == rendered.get("Deployment", "fedtune-superlink")["spec"]
    control = _load_control(monkeypatch)
    new = json.loads(again.get("ConfigMap", "fedtune-control")["data"]["run.json"])
    assert control.request_key(new) != control.request_key(request)
    assert control.request_key(dict(request)) == control.request_key(request)
    # the profile and the overrides become one run-config file (flwr takes one or the other, not both)
    request.update(app=str(REPO), runConfig="num-server-rounds=1 train.max-steps=2")
    merged = tomllib.loads(control.run_config_file(request, "k").read_text())
    demo = tomllib.loads((REPO / "profiles" / "demo.toml").read_text())
    assert merged["num-server-rounds"] == 1 and merged["train.max-steps"] == 2
    assert merged["model.name"] == demo["model"]["name"]
    assert not render("run.enabled=false").get("ConfigMap", "fedtune-control")["data"]["run.json"].count('"enabled": true')


def test_helm_test_proves_the_exposure_shape_from_another_pod():
    rendered = render_scenario("default")
    pod = rendered.get("Pod", "fedtune-test-exposure")
    annotations = pod["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "test"
    # kept until the next `helm test`, so `helm test --logs` can show it
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    item = pod["spec"]["containers"][0]
    script = item["args"][0]
    compile(script, "helm-test", "exec")
    assert "CERT_NONE" not in script and "check_hostname" not in script
    assert f'cafile="{CERTS}/ca.crt"' in script
    for path in ("/health", "/v1/runtime/acquire-task", "/v1/control/start-run"):
        assert path in script
    env = env_of(item)
    assert env["SUPERLINK"]["value"] == "fedtune-superlink:8000" and env["INTERNAL_PORT"]["value"] == "9000"
    assert mount_of(pod["spec"], item, CERTS)["secret"]["secretName"] == "fedtune-superlink-tls"
    assert item["image"] == _superlink(rendered)[2]["image"]  # no image the cluster may not have
    assert pod["spec"]["terminationGracePeriodSeconds"] <= 5


def test_superlink_service_and_network_policy_expose_only_the_proxy():
    rendered = render_scenario("default")
    service = rendered.get("Service", "fedtune-superlink")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["https"]
    policy = rendered.get("NetworkPolicy", "fedtune-superlink")
    _, _, superlink = _superlink(rendered)
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= (
        rendered.get("Deployment", "fedtune-superlink")["spec"]["template"]["metadata"]["labels"].items()
    )
    allowed = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert allowed == {"https", "metrics", "health"}
    names = {p["name"] for p in superlink["ports"]}
    assert allowed <= names and "Ingress" in policy["spec"]["policyTypes"]
    nodes = rendered.get("NetworkPolicy", "fedtune-supernode")
    assert nodes["spec"]["ingress"] == [] and nodes["spec"]["policyTypes"] == ["Ingress"]
    restricted = render("networkPolicy.restrictEgress=true").get("NetworkPolicy", "fedtune-superlink")
    assert restricted["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert render("networkPolicy.enabled=false").of_kind("NetworkPolicy") == []


def _cpu_millis(value) -> int:
    text = str(value)
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


def _requests(rendered) -> int:
    """CPU requested by the long-running pods (the SuperLink pod and every SuperNode)."""
    total = 0
    for obj in rendered.of_kind("Deployment") + rendered.of_kind("StatefulSet"):
        replicas = obj["spec"].get("replicas", 1)
        spec = obj["spec"]["template"]["spec"]
        total += replicas * sum(_cpu_millis(c["resources"]["requests"]["cpu"]) for c in spec["containers"])
    return total


def test_small_cpu_profile_fits_a_two_cpu_node_with_room_to_spare():
    small = render_scenario("small-cpu")
    assert _requests(small) <= 1000  # the node also runs the control plane and other workloads
    for _, spec in small.pod_specs():
        for item in spec["containers"] + spec.get("initContainers", []):
            assert "cpu" not in item["resources"].get("limits", {}), item["name"]  # training bursts
    assert json.loads(small.get("ConfigMap", "fedtune-control")["data"]["run.json"])["profile"] == "profiles/demo.toml"
    readme = (CHART / "README.md").read_text()
    assert "Try it on a laptop-size cluster" in readme and "ci/small-cpu-values.yaml" in readme
    # the defaults' requests are what the README's resource table says they are
    default_total = _requests(render_scenario("default"))
    assert f"{default_total / 1000:g} CPU" in readme


def test_grafana_dashboard_config_map():
    rendered = render_scenario("gpu")
    config_map = rendered.get("ConfigMap", "fedtune-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["fedtune.json"])
    assert dashboard["title"] and any(p.get("targets") for p in dashboard["panels"])
    shipped = REPO / "monitoring" / "grafana" / "dashboards" / "fedtune.json"
    if shipped.exists():
        assert json.loads(shipped.read_text()) == dashboard, (
            "chart dashboard differs from monitoring/grafana/dashboards/fedtune.json"
        )


def test_readme_documents_single_and_multi_cluster_installs():
    readme = (CHART / "README.md").read_text()
    assert readme.count("helm install") >= 3
    assert "superlink.enabled=false" in readme and "partitionOffset" in readme
    for scenario in scenario_names():
        assert f"ci/{scenario}-values.yaml" in readme, scenario


def test_scenario_files_are_documented():
    for scenario in scenario_names():
        first = scenario_file(scenario).read_text().splitlines()[0]
        assert first.startswith("# Scenario:"), scenario
