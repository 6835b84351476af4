"""One-shot key job (`fedtune-keys-job`): this SuperNode's authentication key pair, made once, kept.

    FEDTUNE_KEYS_DIR     folder of the key pair (default /keys: the SuperNode's own volume)
    FEDTUNE_KEY_NAME     file name of the private key (default supernode; the public key is NAME.pub)
    FEDTUNE_PUBKEYS_OUT  also copy NAME.pub here (the one-machine stack's `pubkeys` volume, which the
                         `register` job reads); unset: only print it

A private key that exists is never replaced (it may be registered already): it is checked, and its
public key is derived when missing; a public key that does not match it is an error. Otherwise a new
ECDSA P-384 pair is made (`fedtune-keys generate`). The public key is printed last, on its own line, for
the SuperLink operator (`fedtune-keys register` / the SuperLink host's `register` job).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fedtune.atomic import write_bytes
from fedtune.auth import NodeKey, generate, load_private_key, load_public_key, public_key_of
from fedtune.errors import FedTuneError, one_line_errors


def _copy(src: Path, dest_dir: Path) -> Path:
    dest = write_bytes(dest_dir / src.name, src.read_bytes())
    dest.chmod(0o644)  # readable by the register job whatever the umask: it is a public key
    return dest


@one_line_errors
def main() -> None:
    keys_dir = Path(os.environ.get("FEDTUNE_KEYS_DIR") or "/keys")
    name = os.environ.get("FEDTUNE_KEY_NAME") or "supernode"
    pair = NodeKey.in_dir(keys_dir, name)
    if pair.private_key.exists():
        private = load_private_key(pair.private_key)
        public_path = public_key_of(pair.private_key)  # derives NAME.pub when it is missing
        if load_public_key(public_path).public_numbers() != private.public_key().public_numbers():
            raise FedTuneError(f"{public_path} does not belong to {pair.private_key}; remove the stale .pub")
        print(f"keys-job: reusing {pair.private_key}")
    else:
        generate(keys_dir, name)
        print(f"keys-job: generated {pair.private_key} (ECDSA P-384, stays in this SuperNode's volume)")
    out = os.environ.get("FEDTUNE_PUBKEYS_OUT")
    if out:
        print(f"keys-job: public key copied to {_copy(pair.public_key, Path(out))}")
    print("keys-job: public key to register with the SuperLink:")
    print(pair.public_key.read_text().strip())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
