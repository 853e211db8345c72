"""A node's persistent Ed25519 identity: one key per home directory, created once, never regenerated.

Users of peer systems lose or silently replace identity files (rl-swarm #422, #488), which changes the
peer id others know them by. Here the key file is written atomically (temp file with mode 0600, fsync,
rename), so a crash leaves either no file or a whole one; an existing file that cannot be read is an
error that names the file, never a reason to make a new key.
"""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from shoal.overlay.atomic import write_atomic


class IdentityError(Exception):
    """The identity file exists but cannot be used; the message says which file and why."""


def load_or_create_identity(path: Path) -> tuple[KeyPair, bool]:
    """The key pair stored at ``path``, creating it first if there is no file; and whether it was created."""
    if path.exists():
        return load_identity(path), False
    key_pair = create_new_key_pair()
    staged = path.with_name(f".{path.name}.{os.getpid()}.new")
    write_atomic(staged, key_pair.private_key.serialize(), mode=0o600)
    try:
        os.link(staged, path)  # unlike a rename, fails if another process created the key meanwhile
    except FileExistsError:
        return load_identity(path), False
    finally:
        staged.unlink(missing_ok=True)
    return key_pair, True


def load_identity(path: Path) -> KeyPair:
    try:
        private_key = deserialize_private_key(path.read_bytes())
        return KeyPair(private_key, private_key.get_public_key())
    except OSError as exc:
        raise IdentityError(f"cannot read identity file {path}: {exc.strerror}") from None
    except Exception as exc:  # the decoder raises several kinds on bad bytes
        raise IdentityError(
            f"identity file {path} is not a private key ({exc}); move it away to start a new identity"
        ) from None


def peer_id(key_pair: KeyPair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()
