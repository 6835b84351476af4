"""ECDSA P-384, the one key type fedtune makes: TLS keys (fedtune.certs) and SuperNode identities
(fedtune.auth, fedtune.k8s_keys) are generated and checked here, so the curve is chosen once."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

CURVE = ec.SECP384R1  # what `ssh-keygen -t ecdsa -b 384` makes and Flower's SuperNode auth expects


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def is_fedtune_key(key: object) -> bool:
    """An EC key (private or public) on fedtune's curve."""
    return isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and isinstance(
        key.curve, CURVE
    )
