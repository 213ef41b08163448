//! Fuzz target for `ferrymq_codec::decode`.
//!
//! Input layout: one selector byte, then the bytes a peer sent.
//!
//! Selector bits:
//! - bit 0: the connection's protocol (0 = MQTT 3.1.1, 1 = MQTT 5.0);
//! - bits 1-2: the maximum packet size, an index into [`MAX_PACKET_SIZES`];
//! - bits 3-7: where to cut the stream for the two-chunk check, in 32nds of
//!   its length (0 = no cut).
//!
//! Checked for every input:
//! - `decode` never panics, and is called until it returns `Ok(None)` or an
//!   error;
//! - every packet decoded that the encoder accepts re-encodes to bytes that
//!   decode to the identical packet, consuming exactly the bytes written
//!   (and `encoded_len` agrees with `encode`);
//! - feeding the stream in two chunks gives the same packets, the same end
//!   (`Ok(None)` with the same leftover bytes, or the same error) as
//!   feeding it whole.

#![no_main]

use bytes::BytesMut;
use ferrymq_codec::{DecodeError, Packet, Protocol, decode};
use libfuzzer_sys::fuzz_target;

/// Maximum packet sizes the selector chooses from: unlimited (the MQTT
/// limit applies), a typical broker setting, and two small limits that
/// make `PacketTooLarge` reachable with small inputs.
const MAX_PACKET_SIZES: [u32; 4] = [u32::MAX, 65_536, 128, 16];

/// How a stream of bytes decoded: the packets, then how it stopped.
#[derive(Debug, PartialEq)]
struct Outcome {
    packets: Vec<Packet>,
    /// `Ok(leftover bytes)` after `Ok(None)`, or the error.
    end: Result<Vec<u8>, DecodeError>,
}

/// Decodes from `buf` until `Ok(None)` or an error, appending the packets.
fn drain(
    buf: &mut BytesMut,
    protocol: Protocol,
    max: u32,
    packets: &mut Vec<Packet>,
) -> Result<(), DecodeError> {
    while let Some(packet) = decode(buf, protocol, max)? {
        packets.push(packet);
    }
    Ok(())
}

/// Decodes `wire` as it arrives in one read.
fn decode_whole(wire: &[u8], protocol: Protocol, max: u32) -> Outcome {
    let mut buf = BytesMut::from(wire);
    let mut packets = Vec::new();
    let end = drain(&mut buf, protocol, max, &mut packets).map(|()| buf.to_vec());
    Outcome { packets, end }
}

/// Decodes `wire` as it arrives in two reads, cut at `cut`.
fn decode_split(wire: &[u8], cut: usize, protocol: Protocol, max: u32) -> Outcome {
    let (first, second) = wire.split_at(cut);
    let mut buf = BytesMut::from(first);
    let mut packets = Vec::new();
    let end = drain(&mut buf, protocol, max, &mut packets)
        .and_then(|()| {
            buf.extend_from_slice(second);
            drain(&mut buf, protocol, max, &mut packets)
        })
        .map(|()| buf.to_vec());
    Outcome { packets, end }
}

/// Encodes `packet` again and checks that the encoding decodes to it.
fn check_round_trip(packet: &Packet, protocol: Protocol) {
    // CONNECT is encoded (and decoded) in the version its `protocol` field
    // names; `Packet::encode` and `decode` both do that themselves.
    let mut out = BytesMut::new();
    let Ok(written) = packet.encode(protocol, &mut out) else {
        return;
    };
    assert_eq!(
        written,
        out.len(),
        "encode returned {written} but wrote {} bytes for {packet:?}",
        out.len()
    );
    assert_eq!(
        packet.encoded_len(protocol),
        Ok(written),
        "encoded_len disagrees with encode for {packet:?}"
    );
    let encoded = out.to_vec();
    // The re-encoding may differ in size from what was received, so it is
    // decoded without a packet size limit.
    match decode(&mut out, protocol, u32::MAX) {
        Ok(Some(again)) => {
            assert_eq!(
                &again, packet,
                "re-encoded {protocol:?} packet decodes differently; re-encoding: {encoded:02x?}"
            );
            assert!(
                out.is_empty(),
                "decoding the re-encoded {protocol:?} packet left {} of {} bytes; \
                 re-encoding: {encoded:02x?}; packet: {packet:?}",
                out.len(),
                encoded.len()
            );
        }
        other => panic!(
            "re-encoded {protocol:?} packet does not decode: {other:?}; \
             re-encoding: {encoded:02x?}; packet: {packet:?}"
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, wire)) = data.split_first() else {
        return;
    };
    let protocol = if selector & 1 == 0 {
        Protocol::V311
    } else {
        Protocol::V5
    };
    let max = MAX_PACKET_SIZES[usize::from((selector >> 1) & 0b11)];
    let cut = wire.len() * usize::from(selector >> 3) / 32;

    let whole = decode_whole(wire, protocol, max);
    for packet in &whole.packets {
        check_round_trip(packet, protocol);
    }

    let split = decode_split(wire, cut, protocol, max);
    assert_eq!(
        split,
        whole,
        "cutting the stream after {cut} of {} bytes changes what decodes",
        wire.len()
    );
});
