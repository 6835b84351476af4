"""The Helm chart's key mint Job (`fedtune-k8s-keys`, fedtune/k8s_keys.py) against a fake Kubernetes API.

The fake (tests/kube_api_fake.py) serves HTTPS with its own CA, checks the bearer token and stores real
v1 Secret JSON with base64 data; the Job finds it the way it finds the API server in a pod
(KUBERNETES_SERVICE_HOST/PORT + the service-account folder with token, ca.crt and namespace).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune import k8s_keys
from fedtune.auth import (
    load_private_key,
    load_public_key,
    new_private_key,
    parse_public_key,
    private_key_bytes,
)
from fedtune.certs import ensure
from fedtune.errors import FedTuneError
from tests.kube_api_fake import FakeKubeApi

SECRET = "fedtune-supernode-auth"
STATEFULSET = "fedtune-supernode"


@pytest.fixture
def api(tmp_path):
    with FakeKubeApi(tmp_path, namespace="federation") as server:
        yield server


def run_job(api: FakeKubeApi, replicas: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """The Job's command line, as a process, with the in-cluster defaults for the API server."""
    env = {**os.environ, **api.env()}
    env.pop("POD_NAMESPACE", None)
    cmd = [
        sys.executable, "-m", "fedtune.k8s_keys",
        "--secret", SECRET, "--statefulset", STATEFULSET, "--replicas", str(replicas),
        "--service-account-dir", str(api.service_account_dir),
        "--label", "app.kubernetes.io/part-of=fedtune", *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


def materialise(api: FakeKubeApi, folder):
    """The Secret as the kubelet mounts it (one file per key), like the SuperNode's /auth."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in api.secret(SECRET).items():
        (folder / key).write_bytes(value)
        (folder / key).chmod(0o600)
    return folder


def test_first_run_mints_a_valid_pair_per_pod(api, tmp_path):
    done = run_job(api, 2)
    assert done.returncode == 0, done.stderr
    data = api.secret(SECRET)
    pods = [f"{STATEFULSET}-0", f"{STATEFULSET}-1"]
    assert set(data) == {*pods, *(f"{p}.pub" for p in pods)}
    stored = api.objects[SECRET]
    assert stored["type"] == "Opaque" and stored["metadata"]["labels"] == {
        "app.kubernetes.io/part-of": "fedtune"
    }
    auth = materialise(api, tmp_path / "auth")
    for pod in pods:
        private = load_private_key(auth / pod)  # as fedtune-supernode / flower-supernode read it
        public = load_public_key(auth / f"{pod}.pub")  # as flwr supernode register reads it
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert data[f"{pod}.pub"].startswith(b"ecdsa-sha2-nistp384 ")
        # stored in the OpenSSH format (what flower-supernode reads), not just any PEM
        assert isinstance(serialization.load_ssh_private_key(data[pod], None), ec.EllipticCurvePrivateKey)
        # fedtune-keys itself accepts the pair as valid and keeps it
        keys = subprocess.run(
            [sys.executable, "-m", "fedtune.auth", "generate", "--out", str(auth), pod],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert keys.stdout.startswith(f"reusing {auth / pod}"), keys.stdout
    assert (
        load_private_key(auth / pods[0]).private_numbers()
        != load_private_key(auth / pods[1]).private_numbers()
    )
    assert "minted a key for fedtune-supernode-0" in done.stdout and f"{SECRET} created" in done.stdout
    log = done.stdout + done.stderr  # private keys never in the log: no line of their bodies
    body = [line for pod in pods for line in data[pod].decode().splitlines() if not line.startswith("-----")]
    assert body and not any(line in log for line in body)
    assert api.requests[0] == ("GET", f"/api/v1/namespaces/federation/secrets/{SECRET}")
    assert {method for method, _ in api.requests} == {"GET", "POST"}


def test_second_run_keeps_every_key_identical(api):
    assert run_job(api, 2).returncode == 0
    before, version = api.secret(SECRET), api.resource_version(SECRET)
    done = run_job(api, 2)
    assert done.returncode == 0, done.stderr
    assert api.secret(SECRET) == before
    assert api.resource_version(SECRET) == version  # not even rewritten
    assert f"{SECRET} unchanged" in done.stdout and "minted" not in done.stdout
    assert [m for m, _ in api.requests].count("PATCH") == 0


def test_scale_up_adds_only_the_new_pods_key_and_scale_down_keeps_keys(api):
    assert run_job(api, 2).returncode == 0
    before = api.secret(SECRET)
    done = run_job(api, 3)
    assert done.returncode == 0, done.stderr
    after = api.secret(SECRET)
    assert set(after) - set(before) == {f"{STATEFULSET}-2", f"{STATEFULSET}-2.pub"}
    assert {k: after[k] for k in before} == before
    assert "minted a key for fedtune-supernode-2" in done.stdout
    assert "kept the key of fedtune-supernode-0" in done.stdout and f"{SECRET} updated" in done.stdout
    assert ("PATCH", f"/api/v1/namespaces/federation/secrets/{SECRET}") in api.requests
    # scaling down removes nothing: a later scale-up gets the same identity back
    assert run_job(api, 1).returncode == 0
    assert api.secret(SECRET) == after


def test_forbidden_is_one_clear_line_and_a_nonzero_exit(api):
    api.forbidden = {"GET"}
    done = run_job(api, 2)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(
        "error: the Kubernetes API refused GET Secret federation/fedtune-supernode-auth (HTTP 403)"
    )
    assert "cannot get resource" in lines[0] and "Role must allow" in lines[0]
    assert api.secret(SECRET) is None


def test_forbidden_create_is_reported_too(api):
    api.forbidden = {"POST"}
    done = run_job(api, 1)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1
    assert "refused POST Secret federation/fedtune-supernode-auth (HTTP 403)" in done.stderr


def test_keys_already_there_are_kept_and_a_stale_pub_is_rederived(api):
    mine = new_private_key()
    stored = private_key_bytes(mine)  # (OpenSSH serialisation is randomised: compare these bytes)
    api.store(SECRET, {f"{STATEFULSET}-0": stored, f"{STATEFULSET}-0.pub": b"garbage\n"})
    done = run_job(api, 1)
    assert done.returncode == 0, done.stderr
    data = api.secret(SECRET)
    assert data[f"{STATEFULSET}-0"] == stored
    public = parse_public_key(data[f"{STATEFULSET}-0.pub"], "pub")
    assert public.public_numbers() == mine.public_key().public_numbers()
    assert "minted" not in done.stdout


def test_a_broken_private_key_is_an_error_never_replaced(api):
    api.store(SECRET, {f"{STATEFULSET}-0": b"not a key"})
    done = run_job(api, 1)
    assert done.returncode != 0
    assert "Secret federation/fedtune-supernode-auth, key fedtune-supernode-0" in done.stderr
    assert "remove that key from the Secret to mint a new one" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert api.secret(SECRET) == {f"{STATEFULSET}-0": b"not a key"}


def test_concurrent_writer_is_never_overwritten(api):
    """A write between our read and our patch: 409 on the stale resourceVersion, re-read, keep theirs."""
    assert run_job(api, 1).returncode == 0
    theirs = private_key_bytes(new_private_key())

    def writer(server: FakeKubeApi) -> None:
        server.before_write = None
        data = server.secret(SECRET)
        data[f"{STATEFULSET}-1"] = theirs
        server.store(SECRET, data)

    api.before_write = writer
    result = k8s_keys.mint(
        k8s_keys.KubeApi.in_cluster(api.service_account_dir, f"https://127.0.0.1:{api.port}"),
        "federation",
        SECRET,
        k8s_keys.pod_names(STATEFULSET, 2),
    )
    data = api.secret(SECRET)
    assert data[f"{STATEFULSET}-1"] == theirs and result.kept == [f"{STATEFULSET}-0", f"{STATEFULSET}-1"]
    assert f"{STATEFULSET}-1.pub" in data  # its public key derived on the retry
    assert [m for m, _ in api.requests].count("PATCH") == 2  # the first one got 409


def test_create_race_rereads_instead_of_failing(api):
    theirs = private_key_bytes(new_private_key())

    def writer(server: FakeKubeApi) -> None:
        server.before_write = None
        server.store(SECRET, {f"{STATEFULSET}-0": theirs})

    api.before_write = writer
    client = k8s_keys.KubeApi.in_cluster(api.service_account_dir, f"https://127.0.0.1:{api.port}")
    k8s_keys.mint(client, "federation", SECRET, k8s_keys.pod_names(STATEFULSET, 1))
    assert api.secret(SECRET)[f"{STATEFULSET}-0"] == theirs
    assert [m for m, _ in api.requests] == ["GET", "POST", "GET", "PATCH"]


def test_the_api_servers_certificate_is_verified(api, tmp_path):
    wrong = tmp_path / "wrong-sa"
    wrong.mkdir()
    (wrong / "token").write_text(api.token)
    (wrong / "ca.crt").write_bytes(ensure(tmp_path / "another-ca", ["127.0.0.1"])[0].ca_cert.read_bytes())
    client = k8s_keys.KubeApi.in_cluster(wrong, f"https://127.0.0.1:{api.port}")
    with pytest.raises(FedTuneError, match=r"cannot reach the Kubernetes API .*CERTIFICATE_VERIFY_FAILED"):
        k8s_keys.mint(client, "federation", SECRET, ["fedtune-supernode-0"])
    assert api.secret(SECRET) is None


def test_bad_token_and_missing_environment_are_one_line_errors(api, tmp_path, monkeypatch):
    (api.service_account_dir / "token").write_text("wrong")
    done = run_job(api, 1)
    assert done.returncode != 0 and "(HTTP 401)" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(FedTuneError, match="KUBERNETES_SERVICE_HOST is not set"):
        k8s_keys.KubeApi.in_cluster(api.service_account_dir)
    with pytest.raises(FedTuneError, match="service-account token not found"):
        k8s_keys.KubeApi.in_cluster(tmp_path / "nothing", "https://127.0.0.1:1")
    with pytest.raises(FedTuneError, match="not a valid Kubernetes name"):
        k8s_keys.mint(k8s_keys.KubeApi("http://127.0.0.1:1", "t"), "federation", "Bad_Name", [])
