"""Noise transport messages read from a buffer and written a frame at a time, and secure-session
reads joined once (py-libp2p 0.8.1).

py-libp2p reads each Noise message (at most 65,535 bytes) with two reads of the socket, its 2-byte
length and then its body, and writes each with its own socket write after copying it twice (the
slice of the frame, then the length prefix joined to it): for a 1 MiB Yamux frame, 16 messages, 32
receive calls and 16 sends, every one through a lock and several coroutine layers. Here a reader
takes whatever the socket holds (up to :data:`READ_AHEAD` bytes) and cuts messages out of that
buffer (noting when bytes last arrived: ``overlay.connections.last_read``), and a writer encrypts a
frame's messages and sends them in one write. The bytes on the wire
are unchanged; the nonce order is too (messages are encrypted and decrypted in order, and a frame's
write is never cut by a cancellation: ``overlay.yamuxio._write_frame``).

What a connection buffers stays bounded whatever the peer sends: one message (at most 65,537 bytes
with its prefix) plus a read of up to :data:`READ_AHEAD`, and the consumed part is dropped once past
that, so under ~600 KiB.

The secure session above it assembled an n-byte read in a bytearray and copied it out again, and
Yamux's reader then copied that twice more (``read_exactly``); :func:`_read` joins the messages'
plaintexts once, and ``overlay.yamuxio`` reads a data frame's body with one such read.
"""

from __future__ import annotations

import importlib.metadata
import logging

import trio
from cryptography.exceptions import InvalidTag
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.security import secure_session
from libp2p.security.noise import io as noise_io
from noise.exceptions import NoiseInvalidMessage

log = logging.getLogger(__name__)

MEASURED_LIBP2P = "0.8.1"  # the py-libp2p version these patches and yamuxio.patch_yamux were measured on
READ_AHEAD = 1 << 18
LENGTH = noise_io.SIZE_NOISE_MESSAGE_LEN


def patch_noise() -> None:
    """Replace the transport reader's ``read_msg`` and ``write_msg`` and the session's ``read`` on the
    version measured; another version keeps its own (and says so)."""
    version = importlib.metadata.version("libp2p")
    if version != MEASURED_LIBP2P:
        log.warning("py-libp2p %s: keeping its Noise I/O as it is (measured on %s)", version, MEASURED_LIBP2P)
        return
    noise_io.NoiseTransportReadWriter.read_msg = _read_msg
    noise_io.NoiseTransportReadWriter.write_msg = _write_msg
    if secure_session.SecureSession.read is not _read:  # once per process: every host calls this
        _read.upstream = secure_session.SecureSession.read
        secure_session.SecureSession.read = _read


async def _read(self: secure_session.SecureSession, n: int | None = None) -> bytes:
    """``SecureSession.read``: ``n`` bytes (fewer only if the connection ended), one message's worth
    for ``n=None``, as upstream; the plaintexts joined once."""
    if not n:
        return await _read.upstream(self, n)
    first = self._drain(n)
    parts, have = [first] if first else [], len(first)
    while have < n:
        msg = await self.conn.read_msg()
        if not msg:
            if have:
                break
            raise ConnectionClosedError("Connection closed")
        if len(msg) > n - have:
            self._fill(msg[n - have :])
            msg = msg[: n - have]
        parts.append(msg)
        have += len(msg)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def _read_msg(self: noise_io.NoiseTransportReadWriter, prefix_encoded: bool = False) -> bytes:
    """The next Noise message, decrypted. A connection that ends raises ``IncompleteReadError``, as
    upstream's reads do (``is_clean_close`` when it ended between messages)."""
    buffer: bytearray | None = self.__dict__.get("_shoal_buffer")
    if buffer is None:  # the connection's first message
        buffer = self._shoal_buffer = bytearray()
    start: int = self.__dict__.get("_shoal_start", 0)
    await _buffer_until(self, buffer, start, LENGTH)
    size = int.from_bytes(buffer[start : start + LENGTH], "big")
    await _buffer_until(self, buffer, start, LENGTH + size)
    with memoryview(buffer) as view:
        ciphertext = view[start + LENGTH : start + LENGTH + size]
        try:
            plaintext = self.noise_state.noise_protocol.cipher_state_decrypt.decrypt_with_ad(None, ciphertext)
        except InvalidTag:
            raise NoiseInvalidMessage("Failed authentication of message") from None
        finally:
            ciphertext.release()
    start += LENGTH + size
    if start > READ_AHEAD:  # drop what was consumed, now and then rather than per message
        del buffer[:start]
        start = 0
    self._shoal_start = start
    return plaintext


async def _buffer_until(
    self: noise_io.NoiseTransportReadWriter, buffer: bytearray, start: int, need: int
) -> None:
    """Read until ``need`` bytes from ``start`` are buffered, noting when bytes last arrived
    (``_shoal_read_at``, the liveness clock of ``overlay.connections.last_read``)."""
    raw = self.read_writer.read_write_closer
    while (have := len(buffer) - start) < need:
        data = await raw.read(max(READ_AHEAD, need - have))
        if not data:
            ended = f"connection ended {have} bytes into a Noise message"
            raise IncompleteReadError(ended, expected_bytes=need, received_bytes=have)
        self._shoal_read_at = trio.current_time()
        buffer += data


async def _write_msg(
    self: noise_io.NoiseTransportReadWriter, msg: bytes, prefix_encoded: bool = False
) -> None:
    """``msg`` as Noise messages of at most ``MAX_PLAINTEXT_LENGTH`` bytes each, in one write."""
    encrypt = self.noise_state.noise_protocol.cipher_state_encrypt.encrypt_with_ad
    parts = []
    with memoryview(msg) as view:
        for i in range(0, max(len(view), 1), noise_io.MAX_PLAINTEXT_LENGTH):
            ciphertext = encrypt(None, view[i : i + noise_io.MAX_PLAINTEXT_LENGTH])
            parts += (len(ciphertext).to_bytes(LENGTH, "big"), ciphertext)
    await self.read_writer.read_write_closer.write(b"".join(parts))
