//! The data representations of spec 1.5: integers, variable byte integers,
//! strings, binary data. `Reader` walks one packet's body (already fully
//! buffered); the `put_*` functions write.

use bytes::{BufMut, Bytes};

use crate::error::{DecodeError, EncodeError};
use crate::packet::PacketType;
use crate::string::MqttString;

/// The largest value a variable byte integer can hold (4 bytes).
pub const MAX_VARINT: u32 = 268_435_455;

/// A cursor over the body of one packet (already fully buffered). Every
/// read checks bounds: running out of bytes is
/// [`DecodeError::UnexpectedEnd`], never a panic.
///
/// The reader borrows the bytes. With a `backing` buffer (PUBLISH), strings
/// and binary data it returns share that buffer (zero copy); without one
/// (every other packet, where they are rare and small) they are copied, so
/// decoding an acknowledgement touches no reference count at all.
pub(crate) struct Reader<'a> {
    data: &'a [u8],
    backing: Option<&'a Bytes>,
    packet: PacketType,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8], backing: Option<&'a Bytes>, packet: PacketType) -> Self {
        Self {
            data,
            backing,
            packet,
        }
    }

    pub(crate) fn packet(&self) -> PacketType {
        self.packet
    }

    pub(crate) fn remaining(&self) -> usize {
        self.data.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.data.len() < n {
            return Err(DecodeError::UnexpectedEnd(self.packet));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn to_bytes(&self, slice: &'a [u8]) -> Bytes {
        match self.backing {
            Some(buf) => buf.slice_ref(slice),
            None => Bytes::copy_from_slice(slice),
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A packet identifier, which must not be 0.
    pub(crate) fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::ZeroPacketId(self.packet)),
            id => Ok(id),
        }
    }

    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                // A final zero byte after a continuation adds nothing: the
                // value had a shorter encoding.
                if byte == 0 && i > 0 {
                    break;
                }
                return Ok(value);
            }
        }
        Err(DecodeError::MalformedVarint)
    }

    /// Two-byte length, then that many bytes.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16()?);
        let slice = self.take(len)?;
        Ok(self.to_bytes(slice))
    }

    pub(crate) fn string(&mut self) -> Result<MqttString, DecodeError> {
        let raw = self.binary()?;
        MqttString::from_bytes(raw).map_err(|error| DecodeError::InvalidString {
            packet: self.packet,
            error,
        })
    }

    /// Splits off the next `len` bytes as their own reader (a property list).
    pub(crate) fn sub_reader(&mut self, len: usize) -> Result<Reader<'a>, DecodeError> {
        let data = self.take(len)?;
        Ok(Reader {
            data,
            backing: self.backing,
            packet: self.packet,
        })
    }

    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.packet))
        }
    }
}

/// Bytes needed to encode `value` as a variable byte integer.
pub(crate) fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes a variable byte integer. Callers check `value <= MAX_VARINT`.
pub(crate) fn put_varint(buf: &mut impl BufMut, value: usize) {
    let mut value = value;
    loop {
        // Truncation is intended: the low seven bits.
        let mut byte = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

pub(crate) fn put_string(buf: &mut impl BufMut, text: &str) {
    // MqttString guarantees at most 65,535 bytes; truncation cannot happen.
    buf.put_u16(text.len() as u16);
    buf.put_slice(text.as_bytes());
}

pub(crate) fn put_binary(buf: &mut impl BufMut, data: &[u8]) {
    buf.put_u16(data.len() as u16);
    buf.put_slice(data);
}

/// Checks that binary data fits a two-byte length.
pub(crate) fn check_binary(data: &[u8]) -> Result<(), EncodeError> {
    if data.len() > usize::from(u16::MAX) {
        Err(EncodeError::BinaryTooLong(data.len()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn varint_boundaries_round_trip() {
        for (value, len) in [
            (0usize, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (2_097_151, 3),
            (2_097_152, 4),
            (MAX_VARINT as usize, 4),
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, value);
            assert_eq!(buf.len(), len, "{value}");
            assert_eq!(varint_len(value), len, "{value}");
            let buf = buf.freeze();
            let mut reader = Reader::new(&buf, None, PacketType::Publish);
            assert_eq!(reader.varint(), Ok(value as u32));
        }
    }

    #[test]
    fn five_byte_varint_is_malformed() {
        let mut reader = Reader::new(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01], None, PacketType::Publish);
        assert_eq!(reader.varint(), Err(DecodeError::MalformedVarint));
    }

    #[test]
    fn non_minimal_varint_is_malformed() {
        let mut reader = Reader::new(&[0x80, 0x00], None, PacketType::Publish);
        assert_eq!(reader.varint(), Err(DecodeError::MalformedVarint));
        let mut reader = Reader::new(&[0x80, 0x01], None, PacketType::Publish);
        assert_eq!(reader.varint(), Ok(128));
    }

    #[test]
    fn reads_past_the_end_are_errors() {
        let mut reader = Reader::new(&[0x00, 0x05, b'a'], None, PacketType::Connect);
        assert_eq!(
            reader.string(),
            Err(DecodeError::UnexpectedEnd(PacketType::Connect))
        );
    }
}
