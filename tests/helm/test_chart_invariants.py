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
        "localhost",
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


@pytest.mark.parametrize("scenario", scenario_names())
def test_flwr_clients_trust_the_ca_and_dial_a_certified_name(scenario):
    rendered = render_scenario(scenario)
    for job in rendered.of_kind("Job"):
        component = job["metadata"]["labels"]["app.kubernetes.io/component"]
        assert component in {"run", "register", "supernode-keys"}, job["metadata"]["name"]
        if component == "supernode-keys":  # talks to the Kubernetes API only (tested below)
            continue
        spec = job["spec"]["template"]["spec"]
        item = spec["containers"][0]
        config_volume = mount_of(spec, item, "/etc/fedtune/flwr")
        config_map = rendered.get("ConfigMap", config_volume["configMap"]["name"])
        config = tomllib.loads(config_map["data"]["config.toml"])
        connection = config["superlink"][config["superlink"]["default"]]
        assert config["superlink"]["default"] == "remote-deployment"
        assert connection["root-certificates"] == f"{CERTS}/ca.crt"
        assert mount_of(spec, item, CERTS)["secret"]["items"] == [
            {"key": "ca.crt", "path": "ca.crt"}
        ]
        assert connection["address"].endswith(":8000")
        assert env_of(item)["FLWR_HOME"]["value"].startswith("/tmp")  # writable (read-only root fs)
        assert mount_of(spec, item, "/tmp")["emptyDir"] == {}


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
    # The only Secret the chart writes is the generated TLS one (made in-cluster, never in values).
    assert [s["metadata"]["name"] for s in rendered.of_kind("Secret")] in (
        [],
        ["fedtune-superlink-tls"],
    )
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


def _register_job(rendered):
    job = rendered.get("Job", "fedtune-register-supernodes")
    spec = job["spec"]["template"]["spec"]
    return job, spec, spec["containers"][0]


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


def test_default_install_turns_auth_on_with_keys_minted_in_the_cluster(tmp_path, monkeypatch):
    rendered = render_scenario("default")
    assert load_scenario_values("default")["supernodeAuth"]["enabled"] is True
    _, _, superlink = _superlink(rendered)
    assert "--enable-supernode-auth" in superlink["args"] and "--no-supernode-auth" not in superlink["args"]
    assert env_of(superlink)["FEDTUNE_SUPERNODE_AUTH"]["value"] == "1"
    assert "--enable-supernode-auth" in _superlink_command(rendered, tmp_path, monkeypatch)
    statefulset, spec, node = _supernodes(rendered)
    # kubelet expands $(POD_NAME): each pod reads the key named after it from the minted Secret
    assert env_of(node)["FEDTUNE_AUTH_KEY"]["value"] == "/auth/$(POD_NAME)"
    volume = mount_of(spec, node, "/auth")
    assert volume["secret"]["secretName"] == MINTED_SECRET
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
    register, _, _ = _register_job(rendered)
    assert register["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
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


def test_register_job_reads_only_the_minted_public_keys():
    for sets in ((), ("supernodes.replicaCount=3", "supernodes.numPartitions=3")):
        rendered = render(*sets)
        pods = _pods(rendered)
        _, _, _, args = _mint_job(rendered)
        assert k8s_keys.pod_names(args.statefulset, args.replicas) == pods
        _, spec, item = _register_job(rendered)
        volume = mount_of(spec, item, "/minted-keys")
        assert volume["secret"]["secretName"] == args.secret
        # never a private key: only `<pod>.pub`, as file `<pod>` (the name it is registered under)
        assert volume["secret"]["items"] == [{"key": f"{pod}.pub", "path": pod} for pod in pods]
        assert "for key in /keys/* /minted-keys/*" in item["args"][0]
        assert "flwr supernode register" in item["args"][0]


def test_minted_secret_feeds_the_supernode_launcher_and_the_register_job(tmp_path, monkeypatch, capsys):
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
    _, spec, _ = _register_job(rendered)
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
    assert "auth" not in {v["name"] for v in spec["volumes"]}
    for kind in ("Job", "ServiceAccount", "Role", "RoleBinding"):
        assert rendered.maybe(kind, MINT) is None, kind
    assert rendered.maybe("Job", "fedtune-register-supernodes") is None


def test_existing_secret_skips_minting_and_registers_the_given_public_keys(tmp_path, monkeypatch):
    rendered = render_scenario("auth")
    assert "--enable-supernode-auth" in _superlink_command(rendered, tmp_path, monkeypatch)
    for kind in ("Job", "ServiceAccount", "Role", "RoleBinding"):
        assert rendered.maybe(kind, MINT) is None, kind
    _, spec, node = _supernodes(rendered)
    assert env_of(node)["FEDTUNE_AUTH_KEY"]["value"] == "/auth/$(POD_NAME)"
    assert mount_of(spec, node, "/auth")["secret"]["secretName"] == "fedtune-supernode-keys"
    # Pod names are the Secret keys the docs ask for, and the names of the registered public keys.
    pods = set(_pods(rendered))
    assert set(load_scenario_values("auth")["supernodeAuth"]["publicKeys"]) == pods
    _, job_spec, register = _register_job(rendered)
    keys_volume = mount_of(job_spec, register, "/keys")
    keys = rendered.get("ConfigMap", keys_volume["configMap"]["name"])["data"]
    assert set(keys) == pods and all(k.startswith("ecdsa-sha2-nistp384 ") for k in keys.values())
    assert "minted-keys" not in {v["name"] for v in job_spec["volumes"]}


def test_public_keys_of_other_clusters_are_registered_next_to_the_minted_ones():
    key = load_scenario_values("auth")["supernodeAuth"]["publicKeys"]["fedtune-supernode-0"]
    rendered = render(f"supernodeAuth.publicKeys.site-b-supernode-0={key}")
    _, spec, item = _register_job(rendered)
    config_map = rendered.get("ConfigMap", mount_of(spec, item, "/keys")["configMap"]["name"])
    assert config_map["data"] == {"site-b-supernode-0": key}
    assert mount_of(spec, item, "/minted-keys")["secret"]["secretName"] == MINTED_SECRET
    assert rendered.maybe("Job", MINT) is not None


def test_supernodes_only_site_mints_keys_but_leaves_registration_to_the_superlink():
    rendered = render_scenario("supernodes-only")
    _, _, _, args = _mint_job(rendered)
    assert k8s_keys.pod_names(args.statefulset, args.replicas) == _pods(rendered)
    _, spec, node = _supernodes(rendered)
    assert mount_of(spec, node, "/auth")["secret"]["secretName"] == args.secret
    assert rendered.maybe("Job", "fedtune-register-supernodes") is None
    assert rendered.of_kind("ConfigMap") == []  # no flwr connection: nothing here talks to the Control API


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


def test_run_job_submits_the_app_with_the_profile():
    rendered = render_scenario("default")
    job = rendered.get("Job", "fedtune-run-r1")
    assert "helm.sh/hook" not in job["metadata"].get(
        "annotations", {}
    )  # a long run must not block helm
    item = job["spec"]["template"]["spec"]["containers"][0]
    assert item["image"].startswith("fedtune/superlink:")
    assert item["args"][2:] == [
        "/app",
        "remote-deployment",
        "--stream",
        "--run-config",
        "/app/profiles/demo.toml",
    ]
    assert 'exec flwr run "$@"' in item["args"][0]
    gpu_job = render_scenario("gpu").get("Job", "fedtune-run-r1")
    assert gpu_job["spec"]["template"]["spec"]["containers"][0]["args"][2:] == [
        "/app",
        "remote-deployment",
    ]


def test_helm_test_curls_health_with_the_ca():
    rendered = render_scenario("default")
    pod = rendered.get("Pod", "fedtune-test-health")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    item = pod["spec"]["containers"][0]
    command = item["command"] + item["args"]
    assert command[0] == "curl" and "--insecure" not in command and "-k" not in command
    assert command[command.index("--cacert") + 1] == f"{CERTS}/ca.crt"
    assert mount_of(pod["spec"], item, CERTS)["secret"]["secretName"] == "fedtune-superlink-tls"
    url = command[-1]
    assert url == "https://fedtune-superlink:8000/health"
    service = rendered.get("Service", "fedtune-superlink")
    assert service["spec"]["ports"][0]["port"] == 8000


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
