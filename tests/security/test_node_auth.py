"""SuperNode authentication on the real SuperLink, behind its Fleet proxy, as fedtune-superlink runs it
(fedtune.middleware_scope wraps Flower's node authentication so it runs on Fleet requests only): a Fleet
request without a registered node's signature is refused 401, for a small request and for an object push."""

from __future__ import annotations

import http.client
import ssl

import pytest

from fedtune.federation import LocalFederation
from tests.security.test_proxy import needs_nginx


def _post(fed: LocalFederation, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE

    context = ssl.create_default_context(cafile=str(fed.ca_cert))
    conn = http.client.HTTPSConnection(fed.host, fed.port, context=context, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": PROTOBUF_MEDIA_TYPE, **headers})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@needs_nginx
@pytest.mark.parametrize("forged", [False, True], ids=["unsigned", "signed-by-an-unregistered-key"])
def test_fleet_requests_without_a_registered_nodes_signature_are_refused(tmp_path, forged):
    from flwr.proto.fleet_pb2 import PullMessagesRequest  # pylint: disable=no-name-in-module
    from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=no-name-in-module
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module

    fed = LocalFederation(tmp_path / "fed", supernode_auth=True)
    headers: dict[str, str] = {}
    if forged:  # signed the way a SuperNode signs (Flower's own helpers), by a key never registered
        from base64 import b64encode

        from flwr.common.constant import TIMESTAMP_HEADER
        from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
        from flwr.supercore.date import now
        from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes, sign_message

        private, public = generate_key_pairs()
        timestamp = now().isoformat()
        headers = {
            FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(public_key_to_bytes(public)).decode("ascii"),
            TIMESTAMP_HEADER: timestamp,
            FLEET_HTTP_SIGNATURE_HEADER: b64encode(sign_message(private, timestamp.encode("ascii"))).decode(),
        }
    try:
        fed.start_superlink()
        poll = PullMessagesRequest(node=Node(node_id=12345)).SerializeToString()
        status, body = _post(fed, "/v1/fleet/pull-messages", poll, headers)
        assert status == 401, body
        push = PushObjectRequest(node=Node(node_id=12345), run_id=1, object_id="0" * 64,
                                 object_content=b"x" * 1_000_000).SerializeToString()
        status, body = _post(fed, "/v1/fleet/push-object", push, headers)
        assert status == 401, body
        assert b"Invalid SuperNode authentication" in body
    finally:
        fed.stop()
