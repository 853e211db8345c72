"""Optional admission for a closed swarm: an allowlist of peer ids signed by the swarm's founder.

An open swarm admits anyone, so its defences (budgets, bans, the peer set's rules, robust integration)
assume a minority of hostile identities at most. An operator who knows every participant can close
the swarm instead, as Psyche's authorizer does: the founder signs the list of admitted peer ids with
its identity key (``shoal allowlist``), every node is given the file (``allowlist``) and the founder's
peer id (``founder``), and then a node:

- closes every connection from or to a peer that is not on the list (the founder is always on it), so
  it never syncs metadata with it and never counts it as a task peer; any stream it opens before the
  close is reset (``overlay.guard``), and its gossip is dropped on arrival (``overlay.announce``);
- does not dial members whose records name peers off the list (their records can still reach the
  document through admitted peers, but are not used), nor report them as members.

Relays, bootstrap and DHT-only nodes the swarm relies on must be on the list too. The file is JSON::

    {"founder": "<peer id>", "peers": ["<peer id>", ...], "signature": "<hex>"}

and the Ed25519 signature of the founder's key (the one its peer id embeds) covers canonical JSON of
``[DOMAIN, founder, sorted peers]``. Since ``founder`` is pinned in each node's configuration, a list
may travel by any channel: a changed or self-signed one is refused, with a message naming the file.
To change the list, the founder signs a new file and nodes restart with it.

Why not a pre-shared swarm key (libp2p private networks): py-libp2p 0.8.1 has one (``new_host(psk=)``,
probed: two hosts with the key exchange data, a host without it cannot connect), but its Salsa20 with
an 8-byte nonce is not go-libp2p's XSalsa20 (24-byte nonce), a dial from outside hangs until its
timeout instead of failing, our dial-back reachability check (``overlay.nat``) speaks plain
multistream and would find every node unreachable, and a key admits whoever holds it, with no way to
take one peer out short of re-keying everyone. An allowlist names peers, and a new signature drops one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from shoal.overlay.records import MAX_PEER_ID

DOMAIN = "shoal/allowlist/1"
MAX_FILE = 4 * 2**20  # bytes: ~70,000 peer ids


class AllowlistError(ValueError):
    """The allowlist cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class Allowlist:
    founder: str
    peers: frozenset[str]

    def admits(self, peer: str) -> bool:
        return peer == self.founder or peer in self.peers


def _payload(founder: str, peers: Iterable[str]) -> bytes:
    return json.dumps([DOMAIN, founder, sorted(peers)], separators=(",", ":")).encode()


def _valid_id(peer: object) -> bool:
    """A libp2p peer id: base58 of a multihash, identity (an embedded key) or sha2-256."""
    if not isinstance(peer, str) or not 0 < len(peer) <= MAX_PEER_ID:
        return False
    try:
        raw = ID.from_base58(peer).to_bytes()
    except Exception:  # base58 decoding raises assorted types
        return False
    return len(raw) > 2 and raw[0] in (0x00, 0x12) and raw[1] == len(raw) - 2


def sign_allowlist(key_pair: KeyPair, peers: Iterable[str]) -> dict[str, object]:
    """The allowlist file's content: ``peers`` admitted by the founder ``key_pair`` (ValueError for a
    malformed peer id)."""
    peers = sorted(set(peers))
    bad = [p for p in peers if not _valid_id(p)]
    if bad:
        raise ValueError(f"not peer ids: {', '.join(bad[:5])}")
    founder = ID.from_pubkey(key_pair.public_key).to_base58()
    signature = key_pair.private_key.sign(_payload(founder, peers)).hex()
    return {"founder": founder, "peers": peers, "signature": signature}


def load_allowlist(path: str | Path, founder: str) -> Allowlist:
    """The allowlist in ``path`` if ``founder`` signed it, else AllowlistError saying what is wrong."""
    path = Path(path)
    where = f"allowlist {path}"
    if not founder:
        raise AllowlistError(f"{where}: set founder to the peer id that signed it (`shoal allowlist` says)")
    if not _valid_id(founder):
        raise AllowlistError(f"founder {founder!r} is not a peer id")
    try:
        raw = path.read_bytes()[: MAX_FILE + 1]
    except OSError as e:
        raise AllowlistError(f"{where}: cannot read it ({e.strerror})") from None
    if len(raw) > MAX_FILE:
        raise AllowlistError(f"{where}: over {MAX_FILE} bytes")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise AllowlistError(f"{where}: not JSON ({e})") from None
    if not (isinstance(value, dict) and value.keys() == {"founder", "peers", "signature"}):
        raise AllowlistError(f"{where}: expected an object with founder, peers and signature")
    peers, signature = value["peers"], value["signature"]
    if not isinstance(peers, list) or not all(_valid_id(p) for p in peers):
        raise AllowlistError(f"{where}: peers must be a list of peer ids")
    if value["founder"] != founder:
        raise AllowlistError(f"{where}: signed by {value['founder']!r}, not by the founder {founder}")
    try:
        key = ID.from_base58(founder).extract_public_key()
    except Exception:  # an id that embeds no key (e.g. a hash of an RSA key)
        key = None
    try:
        valid = (
            isinstance(key, Ed25519PublicKey)
            and isinstance(signature, str)
            and key.verify(_payload(founder, peers), bytes.fromhex(signature))
        )
    except ValueError:  # not hex
        valid = False
    if not valid:
        raise AllowlistError(f"{where}: the signature is not the founder's (changed after signing?)")
    return Allowlist(founder, frozenset(peers))
