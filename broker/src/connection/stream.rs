//! A connection's byte stream and its buffers: the adaptive read size,
//! the write buffer every packet owed at one moment is encoded into, the
//! CONNECT read before anything else, and the bounded flush and linger of
//! a closing connection.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use ferrymq_codec::{
    self as codec, ConnAck, Connect, DecodeError, Packet, Protocol, ReasonCode, ReasonContext,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::warn;

use super::{
    CLOSE_FLUSH, CLOSE_LINGER, CLOSE_LINGER_BYTES, OUT_KEEP, READ_MAX, READ_MIN, TURN_KEEP,
};
use crate::Shared;
use crate::stats::Stats;
use crate::storage::StoreOp;

/// The byte stream and, while there is traffic, its buffers.
pub(super) struct Io<S> {
    /// Both directions of one stream (no split halves: a split TCP stream
    /// is one more allocation per connection, a split TLS stream a lock).
    pub(super) stream: S,
    /// Made on the first byte in or out, let go when the connection is
    /// idle again (`trim`): an idle connection holds none of it.
    busy: Option<Box<Busy>>,
}

/// What a connection holds only while it has traffic: its buffers, and
/// what a turn owes (the packets to encode, the store ops to submit, both
/// empty between turns and kept only to reuse their room).
pub(super) struct Busy {
    /// Bytes read but not yet decoded.
    pub(super) inbuf: BytesMut,
    /// Encoded packets not yet written: everything owed to the client at
    /// one moment goes out in one write.
    pub(super) out: BytesMut,
    /// The free space the next read is offered (`READ_MIN..=READ_MAX`).
    read_chunk: usize,
    /// Store ops to submit at the end of this turn (nobody waits for them).
    pub(super) ops: Vec<StoreOp>,
    /// Packets to encode at the end of this turn.
    pub(super) packets: Vec<Packet>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + 'static> Io<S> {
    /// A stream with nothing read or owed yet.
    pub(super) fn new(stream: S) -> Io<S> {
        Io { stream, busy: None }
    }

    /// The buffers, made if the connection had none.
    pub(super) fn busy(&mut self) -> &mut Busy {
        self.busy.get_or_insert_with(|| {
            Box::new(Busy {
                inbuf: BytesMut::new(),
                out: BytesMut::new(),
                read_chunk: READ_MIN,
                ops: Vec::new(),
                packets: Vec::new(),
            })
        })
    }

    /// The buffers, if the turn owes packets to encode.
    pub(super) fn owed(&mut self) -> Option<&mut Busy> {
        self.busy.as_deref_mut().filter(|b| !b.packets.is_empty())
    }

    /// The turn's store ops, taken (none when there is no traffic).
    pub(super) fn take_ops(&mut self) -> Vec<StoreOp> {
        self.busy
            .as_mut()
            .map(|b| std::mem::take(&mut b.ops))
            .unwrap_or_default()
    }

    /// Bytes encoded and not yet written.
    pub(super) fn unwritten(&self) -> usize {
        self.busy.as_ref().map_or(0, |b| b.out.len())
    }

    /// Whether bytes read wait to be decoded.
    pub(super) fn has_input(&self) -> bool {
        self.busy.as_ref().is_some_and(|b| !b.inbuf.is_empty())
    }

    /// Makes room for the next read; returns the free space offered. A
    /// connection whose reads are small and whose read buffer is empty
    /// (or gone) gets none: it reads through the stack (`poll_read`).
    pub(super) fn reserve_read(&mut self) -> usize {
        let Some(b) = self.busy.as_mut() else {
            return READ_MIN;
        };
        if b.inbuf.capacity() == 0 && b.read_chunk == READ_MIN {
            return READ_MIN;
        }
        if b.inbuf.capacity() - b.inbuf.len() < b.read_chunk / 2 {
            b.inbuf.reserve(b.read_chunk);
        }
        b.inbuf.capacity() - b.inbuf.len()
    }

    /// Adapts the read size after a read of `n` bytes into `offered`.
    fn after_read(&mut self, n: usize, offered: usize) {
        let b = self.busy();
        if n >= offered {
            b.read_chunk = (b.read_chunk * 2).min(READ_MAX);
        } else if n < b.read_chunk / 8 {
            b.read_chunk = (b.read_chunk / 2).max(READ_MIN);
        }
    }

    /// Lets go of what a burst left that is larger than a connection
    /// keeps between bursts (nothing left to write): a write buffer
    /// larger than `OUT_KEEP`, the turn's vectors' room beyond
    /// `TURN_KEEP` entries. The rest stays for the next burst.
    pub(super) fn trim(&mut self) {
        let Some(b) = self.busy.as_mut() else {
            return;
        };
        if b.out.capacity() > OUT_KEEP {
            b.out = BytesMut::new();
        }
        if b.packets.capacity() > TURN_KEEP {
            b.packets = Vec::new();
        }
        if b.ops.capacity() > TURN_KEEP {
            b.ops = Vec::new();
        }
    }

    /// Lets go of every buffer (the connection rests: nothing to decode,
    /// write or owe).
    pub(super) fn release(&mut self) {
        debug_assert!(
            self.busy
                .as_ref()
                .is_none_or(|b| b.inbuf.is_empty() && b.out.is_empty())
        );
        self.busy = None;
    }

    /// Polls one read (`offered`: what the turn reserved, see
    /// `reserve_read`). Into the read buffer when it has room; without one,
    /// into `READ_MIN` bytes on the stack, then copied: a connection
    /// waiting for its client holds no buffer, and one is made only for
    /// bytes that came. A read adapts the next one's size.
    pub(super) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        offered: usize,
    ) -> Poll<std::io::Result<usize>> {
        let n = match self.busy.as_mut() {
            Some(b) if b.inbuf.capacity() > b.inbuf.len() => {
                match std::pin::pin!(self.stream.read_buf(&mut b.inbuf)).poll(cx) {
                    Poll::Ready(Ok(n)) => n,
                    other => return other,
                }
            }
            _ => {
                let mut stack = [0u8; READ_MIN];
                let mut buf = ReadBuf::new(&mut stack);
                match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
                self.busy().inbuf.extend_from_slice(buf.filled());
                buf.filled().len()
            }
        };
        if n > 0 {
            self.after_read(n, offered);
        }
        Poll::Ready(Ok(n))
    }

    /// Polls one write of what is encoded; `Ready(Ok(n))` with the bytes
    /// taken (0: the stream takes no more).
    pub(super) fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let Some(b) = self.busy.as_mut().filter(|b| !b.out.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        let n = std::task::ready!(std::pin::pin!(self.stream.write(&b.out)).poll(cx))?;
        b.out.advance(n);
        Poll::Ready(Ok(n))
    }

    /// Encodes a packet into the write buffer. Our own packets always
    /// encode; if one did not, that is a bug worth a log line, not a panic.
    pub(super) fn queue(&mut self, packet: &Packet, protocol: Protocol) {
        if let Err(e) = packet.encode(protocol, &mut self.busy().out) {
            warn!("could not encode {:?}: {e}", packet.packet_type());
        }
    }

    /// Writes what is left (bounded in time) and closes the stream.
    pub(super) async fn flush_and_close(&mut self) {
        self.flush_and_shutdown().await;
        self.linger().await;
    }

    /// Writes what is pending (a DISCONNECT or refusing CONNACK last) and
    /// shuts the write side: the client reads it, then the end of stream.
    pub(super) async fn flush_and_shutdown(&mut self) {
        let out = self.busy.take().map(|b| b.out).unwrap_or_default();
        let _ = tokio::time::timeout(CLOSE_FLUSH, async {
            self.stream.write_all(&out).await?;
            self.stream.shutdown().await
        })
        .await;
    }

    /// Reads and discards what the client still sends, until it closes,
    /// for at most [`CLOSE_LINGER`] and [`CLOSE_LINGER_BYTES`]. Closing a
    /// socket with unread bytes resets the connection, and a reset makes
    /// the client's kernel discard what the client has not read yet: the
    /// DISCONNECT with its reason code, just sent (seen as EPIPE or
    /// ECONNRESET by a client still writing).
    pub(super) async fn linger(&mut self) {
        let mut scratch = [0u8; 512];
        let mut left = CLOSE_LINGER_BYTES;
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while left > 0 {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }

    /// Reads once (waiting for it) into the read buffer.
    pub(super) async fn read(&mut self) -> std::io::Result<usize> {
        let offered = self.reserve_read();
        std::future::poll_fn(|cx| self.poll_read(cx, offered)).await
    }

    /// Waits for the first packet, which must be CONNECT. On failure
    /// returns why, with any refusal (CONNACK) already queued.
    pub(super) async fn read_connect(&mut self, shared: &Shared) -> Result<Box<Connect>, String> {
        let max = shared.config().limits.max_packet_size;
        loop {
            let inbuf = &mut self.busy().inbuf;
            let level = connect_level(inbuf);
            match codec::decode(inbuf, Protocol::V5, max) {
                Ok(Some(Packet::Connect(connect))) => return Ok(connect),
                Ok(Some(other)) => {
                    // [MQTT-3.1.0-1]: the first packet must be CONNECT.
                    return Err(format!(
                        "first packet is {}, not CONNECT",
                        other.packet_type()
                    ));
                }
                Ok(None) => {}
                Err(error) => {
                    Stats::add(&shared.stats.protocol_errors, 1);
                    self.refuse_connect(level, &error);
                    return Err(error.to_string());
                }
            }
            match self.read().await {
                Ok(0) => return Err("closed before CONNECT".into()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Reads the next packet of a connection speaking `protocol` (used
    /// during an authentication exchange, before the main loop).
    pub(super) async fn read_packet(
        &mut self,
        protocol: Protocol,
        max: u32,
    ) -> Result<Packet, String> {
        loop {
            match codec::decode(&mut self.busy().inbuf, protocol, max) {
                Ok(Some(packet)) => return Ok(packet),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            match self.read().await {
                Ok(0) => return Err("closed during authentication".into()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Queues the CONNACK that tells a client why its CONNECT was refused,
    /// where the protocol has a way to say it.
    pub(super) fn refuse_connect(&mut self, level: Option<u8>, error: &DecodeError) {
        let (protocol, code) = match (error, level) {
            // [MQTT-3.1.2-2]: unsupported level gets "unacceptable protocol
            // version", in the 3.1.1 format unless the client is newer.
            (DecodeError::UnsupportedProtocolLevel(l), _) => (
                if *l > 5 { Protocol::V5 } else { Protocol::V311 },
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            ),
            (_, Some(5)) => {
                let code = error.reason_code();
                let code = if code.is_valid_for(ReasonContext::ConnAck) {
                    code
                } else {
                    ReasonCode::MALFORMED_PACKET
                };
                (Protocol::V5, code)
            }
            // 3.1.1 has no code for a malformed CONNECT: just close.
            _ => return,
        };
        let connack = ConnAck {
            reason_code: code,
            ..ConnAck::default()
        };
        self.queue(&Packet::ConnAck(Box::new(connack)), protocol);
    }
}

/// The protocol level of a CONNECT at the front of `buf`, if the bytes
/// are there: lets a refusal use the client's CONNACK format even when
/// the rest of its CONNECT is malformed.
fn connect_level(buf: &[u8]) -> Option<u8> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let header_len = 1 + buf[1..].iter().take(4).position(|b| b & 0x80 == 0)? + 1;
    let body = buf.get(header_len..)?;
    (body.get(..6)? == b"\x00\x04MQTT").then(|| body.get(6).copied())?
}

#[cfg(test)]
mod tests {
    use super::connect_level;

    #[test]
    pub(super) fn connect_level_is_read_from_a_partial_connect() {
        assert_eq!(
            connect_level(&[0x10, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 5]),
            Some(5)
        );
        assert_eq!(
            connect_level(&[0x10, 0x80, 0x01, 0, 4, b'M', b'Q', b'T', b'T', 4]),
            Some(4)
        );
        assert_eq!(connect_level(&[0x10, 0x10, 0, 4, b'M', b'Q']), None);
        assert_eq!(
            connect_level(&[0x30, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 5]),
            None
        );
        assert_eq!(connect_level(&[0x10]), None);
    }
}
