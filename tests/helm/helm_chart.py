"""Helm chart test helpers: locate the tools, render each scenario once, index objects."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "fedtune"
SCENARIOS_DIR = CHART / "ci"
CONTROL_SCRIPT = CHART / "files" / "control.py"
# The documented scenarios (issue 5); every file in ci/ is rendered, these must be among them.
REQUIRED_SCENARIOS = {"default", "gpu", "existing-tls", "cert-manager", "supernodes-only", "auth", "small-cpu"}
KUBERNETES_VERSIONS = ("1.27.0", "1.31.0", "1.37.0")
RELEASE = "fedtune"
NAMESPACE = "federation"


def find_tool(name: str) -> str:
    """A tool on PATH or in the project venv; a clear failure (never a skip) when it is missing."""
    candidates = [
        shutil.which(name),
        REPO / ".venv" / "bin" / name,
        Path(sys.executable).parent / name,
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(
        f"{name} not found on PATH or in .venv/bin: run `bash scripts/install-helm.sh` (make tools)"
    )


def scenario_names() -> list[str]:
    return sorted(p.name.removesuffix("-values.yaml") for p in SCENARIOS_DIR.glob("*-values.yaml"))


def scenario_file(name: str) -> Path:
    return SCENARIOS_DIR / f"{name}-values.yaml"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [find_tool("helm"), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def template_args(
    values_files: tuple[str, ...] = (), sets: tuple[str, ...] = (), kube_version: str = ""
) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for values in values_files:
        args += ["-f", values]
    for item in sets:
        args += ["--set", item]
    if kube_version:
        args += ["--kube-version", kube_version]
    return args


@functools.cache
def render_text(
    values_files: tuple[str, ...] = (), sets: tuple[str, ...] = (), kube_version: str = ""
) -> str:
    return helm(*template_args(values_files, sets, kube_version)).stdout


class Rendered:
    """The objects of one `helm template`, indexed by (kind, name)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.objects = [doc for doc in yaml.safe_load_all(text) if doc]

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        for obj in self.of_kind(kind):
            if obj["metadata"]["name"] == name:
                return obj
        names = [o["metadata"]["name"] for o in self.of_kind(kind)]
        raise AssertionError(f"no {kind} named {name}; have {names}")

    def maybe(self, kind: str, name: str) -> dict | None:
        try:
            return self.get(kind, name)
        except AssertionError:
            return None

    def pod_specs(self) -> list[tuple[str, dict]]:
        """(owner name, pod spec) of every workload, hook and test pod."""
        specs = []
        for obj in self.objects:
            if obj["kind"] in {"Deployment", "StatefulSet", "Job"}:
                specs.append((obj["metadata"]["name"], obj["spec"]["template"]["spec"]))
            elif obj["kind"] == "Pod":
                specs.append((obj["metadata"]["name"], obj["spec"]))
        return specs


@functools.cache
def render_scenario(name: str) -> Rendered:
    return Rendered(render_text((str(scenario_file(name)),)))


def render(*sets: str, values: tuple[str, ...] = ()) -> Rendered:
    return Rendered(render_text(tuple(values), tuple(sets)))


def load_scenario_values(name: str) -> dict:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return deep_merge(defaults, yaml.safe_load(scenario_file(name).read_text()) or {})


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def container(spec: dict, name: str) -> dict:
    for item in spec["containers"]:
        if item["name"] == name:
            return item
    raise AssertionError(f"no container {name}")


def env_of(item: dict) -> dict[str, dict]:
    return {e["name"]: e for e in item.get("env", [])}


def mount_of(spec: dict, item: dict, mount_path: str) -> dict:
    """The pod volume mounted at mount_path in container item."""
    for mount in item.get("volumeMounts", []):
        if mount["mountPath"] == mount_path:
            for volume in spec["volumes"]:
                if volume["name"] == mount["name"]:
                    return volume
            for template in spec.get("_volumeClaimTemplates", []):
                if template["metadata"]["name"] == mount["name"]:
                    return {"name": mount["name"], "volumeClaimTemplate": template}
            raise AssertionError(f"volume {mount['name']} is mounted but not defined")
    raise AssertionError(f"nothing mounted at {mount_path} in {item['name']}")
