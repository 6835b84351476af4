"""The control container of the fedtune SuperLink pod: registers SuperNode keys and submits the run.

Why here: the SuperLink's Control API (register-node, start-run) is reachable only on the pod's loopback
(127.0.0.1:<internal port>); its public port is the Fleet-only proxy, which answers 403 to everything
else. So the chart does what the old register/run Jobs did from inside the pod, in this one loop:

1. Every public key under the key folders (the minted `<pod>.pub` files, the values' ConfigMap) is
   registered once: each registration is recorded in the state volume next to the SuperLink's database
   (`<state>/control/keys/<fingerprint>.json`, with the node id), so upgrades and restarts register
   nothing twice. A key the SuperLink already knows is recorded, not an error.
2. The configured run (`run.json`: profile + overrides + tag, from the ConfigMap) is submitted once per
   distinct configuration, recorded the same way (`<state>/control/runs/<key>.json`, with the run id and
   its last status). The ConfigMap is a mounted volume, so `helm upgrade` with a new run.runConfig or
   run.tag reaches this loop without restarting the SuperLink (the kubelet refreshes it within ~1 min).
3. It follows that run (`flwr ls`) and logs each status change, then idles. `kubectl exec -c control`
   gets a ready `flwr` connection named `remote-deployment` for anything else.

One JSON line per event on stdout (`kubectl logs deploy/<superlink> -c control`).
Standard library + flwr's CLI + fedtune's own helpers only (the SuperLink image).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from fedtune import toml_io
from fedtune.atomic import write_json  # a restart reads the old record or the new one, never half of one

CONNECTION = "remote-deployment"
ADDRESS = os.environ.get("FEDTUNE_CONTROL_ADDRESS", "127.0.0.1:9000")
CA = os.environ.get("FEDTUNE_ROOT_CERTIFICATES", "/certs/ca.crt")
STATE = Path(os.environ.get("FEDTUNE_CONTROL_STATE", "/state/control"))
REQUEST = Path(os.environ.get("FEDTUNE_RUN_REQUEST", "/etc/fedtune/control/run.json"))
KEY_DIRS = [Path(p) for p in os.environ.get("FEDTUNE_KEY_DIRS", "/keys/minted:/keys/values").split(":") if p]
POLL_S = float(os.environ.get("FEDTUNE_CONTROL_POLL", "5"))
SUBMIT_ATTEMPTS = 3
stop = threading.Event()


def log(event: str, **fields: Any) -> None:
    print(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}),
          flush=True)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def flwr(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["flwr", *args], capture_output=True, text=True, timeout=timeout, check=False)


def write_connection() -> None:
    home = Path(os.environ.get("FLWR_HOME", "/tmp/.flwr"))
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{ADDRESS}"\nroot-certificates = "{CA}"\n'
    )


def wait_for_superlink() -> None:
    """GET /health on the loopback API, verifying the certificate for 127.0.0.1 (the chart's SAN)."""
    context = ssl.create_default_context(cafile=CA)
    url = f"https://{ADDRESS}/health"
    last = ""
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url, context=context, timeout=5) as response:
                if response.status == 200:
                    log("superlink-ready", address=ADDRESS)
                    return
        except OSError as err:
            if str(err) != last:
                log("waiting-for-superlink", address=ADDRESS, error=str(err))
                last = str(err)
        stop.wait(2)


# -- keys ------------------------------------------------------------------------------------------------
def fingerprint(line: str) -> str:
    """Of the key itself (type + base64), not of its comment."""
    return hashlib.sha256(" ".join(line.split()[:2]).encode()).hexdigest()[:32]


def public_keys() -> list[tuple[str, Path, str]]:
    found = []
    for folder in KEY_DIRS:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file():  # ConfigMap/Secret volumes' ..data links
                continue
            line = path.read_text().strip()
            if line:
                found.append((path.name, path, line))
    return found


def register_keys() -> None:
    from fedtune.auth import register
    from fedtune.errors import FedTuneError

    for name, path, line in public_keys():
        record = STATE / "keys" / f"{fingerprint(line)}.json"
        if record.exists():
            continue
        try:
            node_id = register(path, CONNECTION, name=name)
        except FedTuneError as err:
            log("register-failed", name=name, error=str(err))
            continue
        write_json(record, {"name": name, "node_id": node_id, "registered_at": time.time()})
        if node_id is None:
            log("key-already-registered", name=name)
        else:
            log("key-registered", name=name, node_id=node_id)


# -- the configured run ----------------------------------------------------------------------------------
def run_request() -> dict[str, Any] | None:
    request = read_json(REQUEST)
    if not request or not request.get("enabled"):
        return None
    return request


def request_key(request: dict[str, Any]) -> str:
    fields = {k: request.get(k, "") for k in ("app", "profile", "runConfig", "tag")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def run_config_file(request: dict[str, Any], key: str) -> Path | None:
    """flwr takes one TOML file or key=value pairs, not both: the profile and the overrides, merged."""
    from flwr.common.config import parse_config_args

    merged: dict[str, Any] = {}
    profile = str(request.get("profile") or "")
    if profile:
        path = Path(profile) if profile.startswith("/") else Path(request["app"]) / profile
        merged.update(toml_io.read_flat(path))
    overrides = str(request.get("runConfig") or "").strip()
    if overrides:
        merged.update(parse_config_args([overrides]))
    if not merged:
        return None
    return toml_io.write(Path("/tmp") / f"run-config-{key}.toml", merged)  # dotted keys stay quoted keys


def submit(request: dict[str, Any], key: str, record: Path, attempt: int) -> None:
    args = ["run", str(request["app"]), CONNECTION, "--format", "json"]
    try:
        config = run_config_file(request, key)
    except (OSError, ValueError) as err:
        error = f"bad run configuration: {err}"
        write_json(record, {"key": key, "error": error, "attempts": SUBMIT_ATTEMPTS})
        log("run-rejected", key=key, error=str(err))
        return
    if config is not None:
        args += ["--run-config", str(config)]
    done = flwr(*args, timeout=300)
    try:
        payload = json.loads(done.stdout)
    except ValueError:
        payload = {}
    if done.returncode == 0 and payload.get("success") and payload.get("run-id") is not None:
        run_id = int(payload["run-id"])
        write_json(record, {"key": key, "run_id": run_id, "status": "submitted", "request": request,
                            "submitted_at": time.time()})
        log("run-submitted", key=key, run_id=run_id, profile=request.get("profile"),
            run_config=request.get("runConfig"), tag=request.get("tag"))
        return
    error = payload.get("error-message") or " ".join(f"{done.stdout} {done.stderr}".split())[-600:]
    write_json(record, {"key": key, "error": error, "attempts": attempt})
    log("run-submit-failed", key=key, attempt=attempt, error=error)


def submit_configured_run() -> None:
    request = run_request()
    if request is None:
        return
    key = request_key(request)
    record = STATE / "runs" / f"{key}.json"
    previous = read_json(record) or {}
    if "run_id" in previous:
        return
    attempt = int(previous.get("attempts", 0)) + 1
    if attempt > SUBMIT_ATTEMPTS:
        return
    submit(request, key, record, attempt)


def follow_runs() -> None:
    """Log the status changes of the runs this container submitted, until each has finished."""
    paths = sorted((STATE / "runs").glob("*.json"))
    records = [(p, r) for p in paths if (r := read_json(p)) and "run_id" in r]
    pending = [(p, r) for p, r in records if not str(r.get("status", "")).startswith("finished")]
    if not pending:
        return
    done = flwr("ls", CONNECTION, "--format", "json")
    try:
        runs = {int(run["run-id"]): run for run in json.loads(done.stdout).get("runs", [])}
    except (ValueError, KeyError, TypeError):
        return
    for path, record in pending:
        run = runs.get(int(record["run_id"]))
        if run is None:
            continue
        status = str(run.get("status", ""))
        if status != record.get("status"):
            record["status"] = status
            write_json(path, record)
            log("run-status", run_id=record["run_id"], status=status,
                traffic=run.get("network-traffic") or run.get("traffic"))


def main() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    write_connection()
    wait_for_superlink()
    while not stop.is_set():
        try:
            register_keys()
            submit_configured_run()
            follow_runs()
        except Exception as err:
            log("control-error", error=f"{type(err).__name__}: {err}")
        stop.wait(POLL_S)
    log("control-stopped")


if __name__ == "__main__":
    sys.exit(main())
