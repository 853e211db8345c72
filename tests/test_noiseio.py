"""overlay.noiseio against py-libp2p's own Noise I/O: the same bytes on the wire both ways, the same
errors at a connection's end, and a version guard."""

import inspect
import logging
import os

import pytest
import trio
import trio.testing
from libp2p.io.exceptions import IncompleteReadError
from libp2p.security import secure_session
from libp2p.security.noise import io as noise_io
from libp2p.stream_muxer.yamux import yamux
from noise.connection import NoiseConnection
from noise.exceptions import NoiseInvalidMessage

from shoal.overlay import noiseio

UPSTREAM_READ, UPSTREAM_WRITE = (
    noise_io.BaseNoiseMsgReadWriter.read_msg,
    noise_io.BaseNoiseMsgReadWriter.write_msg,
)


class Raw:
    """A raw connection over one end of an in-memory stream pair."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def read(self, n: int | None = None) -> bytes:
        return await self.stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()


def channel() -> tuple[noise_io.NoiseTransportReadWriter, noise_io.NoiseTransportReadWriter, trio.abc.Stream]:
    """Two transport read-writers after a Noise handshake (the cipher libp2p's XX uses), and the
    sender's raw stream."""
    sender = NoiseConnection.from_name(b"Noise_NN_25519_ChaChaPoly_SHA256")
    receiver = NoiseConnection.from_name(b"Noise_NN_25519_ChaChaPoly_SHA256")
    sender.set_as_initiator()
    receiver.set_as_responder()
    sender.start_handshake()
    receiver.start_handshake()
    receiver.read_message(sender.write_message())
    sender.read_message(receiver.write_message())
    a, b = trio.testing.memory_stream_pair()
    return (
        noise_io.NoiseTransportReadWriter(Raw(a), sender),
        noise_io.NoiseTransportReadWriter(Raw(b), receiver),
        a,
    )


@pytest.mark.parametrize("ours", ["writer", "reader"])
async def test_the_same_bytes_on_the_wire_as_upstream(ours):
    noiseio.patch_noise()
    writer, reader, _ = channel()
    write = noiseio._write_msg if ours == "writer" else UPSTREAM_WRITE
    read = noiseio._read_msg if ours == "reader" else UPSTREAM_READ
    messages = [b"x", os.urandom(noise_io.MAX_PLAINTEXT_LENGTH), os.urandom((1 << 20) + 5), b"", b"end"]
    async with trio.open_nursery() as nursery:
        for m in messages:
            nursery.start_soon(write, writer, m)
            got = b""
            while len(got) < len(m):  # a message over the plaintext limit arrives as several
                got += await read(reader)
            if not m:
                got = await read(reader)
            assert got == m


async def test_a_session_read_joins_messages_and_keeps_the_rest():
    noiseio.patch_noise()
    writer, reader, _ = channel()
    session = object.__new__(secure_session.SecureSession)
    session.conn = reader
    session._reset_internal_buffer()
    payload = os.urandom(3 * noise_io.MAX_PLAINTEXT_LENGTH + 7)
    await noiseio._write_msg(writer, payload)
    assert await session.read(100) == payload[:100]  # the rest of the first message stays buffered
    assert await session.read(len(payload) - 110) == payload[100:-10]
    assert await session.read(10) == payload[-10:]


@pytest.mark.parametrize("sent", [0, 1, 7])
async def test_the_end_of_a_connection_is_clean_only_between_messages(sent):
    """``sent`` bytes of a message's length prefix and body arrive, then the sender's end closes."""
    noiseio.patch_noise()
    writer, reader, raw = channel()
    await noiseio._write_msg(writer, b"whole")
    ciphertext = writer.noise_state.encrypt(b"cut short")
    await raw.send_all((len(ciphertext).to_bytes(2, "big") + ciphertext)[:sent])
    await raw.aclose()
    assert await noiseio._read_msg(reader) == b"whole"
    with pytest.raises(IncompleteReadError) as ended:
        await noiseio._read_msg(reader)
    assert ended.value.is_clean_close == (sent == 0)


async def test_a_tampered_message_fails_authentication():
    noiseio.patch_noise()
    writer, reader, _ = channel()
    ciphertext = writer.noise_state.encrypt(b"model")
    await writer.read_writer.read_write_closer.write(
        len(ciphertext).to_bytes(2, "big") + ciphertext[:-1] + b"\0"
    )
    with pytest.raises(NoiseInvalidMessage):
        await noiseio._read_msg(reader)


def test_what_noiseio_replaces_still_exists_upstream_and_is_version_guarded(monkeypatch, caplog):
    """Fails when py-libp2p renames what overlay.noiseio and the Yamux body read rely on."""
    assert "self._read_data_body(" in inspect.getsource(yamux.Yamux.handle_incoming)
    assert {"_drain", "_fill", "_reset_internal_buffer"} <= set(vars(secure_session.SecureSession))
    assert "self.conn.read_msg()" in inspect.getsource(secure_session.SecureSession.read)
    assert "cipher_state_decrypt.decrypt_with_ad" in inspect.getsource(NoiseConnection.decrypt)
    noiseio.patch_noise()
    noiseio.patch_noise()
    assert noiseio._read.upstream is not noiseio._read  # patched once
    monkeypatch.setattr(noise_io.NoiseTransportReadWriter, "read_msg", UPSTREAM_READ)
    monkeypatch.setattr(noiseio.importlib.metadata, "version", lambda name: "0.9.0")
    with caplog.at_level(logging.WARNING, logger="shoal.overlay.noiseio"):
        noiseio.patch_noise()
    assert noise_io.NoiseTransportReadWriter.read_msg is UPSTREAM_READ
    assert "keeping its Noise I/O as it is" in caplog.text


async def test_a_flooding_sender_cannot_grow_the_read_buffer():
    """A hostile peer that writes 8 MB of valid Noise messages at once: the reader buffers at most a
    message plus two read-aheads, however far ahead the sender is."""
    noiseio.patch_noise()
    writer, reader, raw = channel()
    message = os.urandom(noise_io.MAX_PLAINTEXT_LENGTH)
    flood = b"".join(
        len(c).to_bytes(2, "big") + c for c in (writer.noise_state.encrypt(message) for _ in range(128))
    )
    bound = 2 * noiseio.READ_AHEAD + noise_io.MAX_NOISE_MESSAGE_LEN + noiseio.LENGTH
    async with trio.open_nursery() as nursery:
        nursery.start_soon(raw.send_all, flood)
        for _ in range(128):
            assert await noiseio._read_msg(reader) == message
            assert len(reader._shoal_buffer) <= bound
