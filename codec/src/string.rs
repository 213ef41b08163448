//! [`MqttString`]: a cheaply clonable string that always satisfies the MQTT
//! rules for a UTF-8 Encoded String.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

use crate::error::StringError;

/// The longest string MQTT can carry: its length is a two-byte integer.
pub const MAX_STRING_LEN: usize = u16::MAX as usize;

/// A UTF-8 string backed by [`Bytes`], so that decoding a topic or a user
/// property never copies and cloning one is a reference-count increment.
///
/// Invariant, checked by every constructor: the bytes are valid UTF-8 (which
/// excludes encoded surrogates), contain no U+0000, and are at most
/// 65,535 bytes long. Encoders therefore never fail on a `MqttString`.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MqttString(Bytes);

impl MqttString {
    /// Checks `bytes` and wraps them without copying.
    pub fn from_bytes(bytes: Bytes) -> Result<Self, StringError> {
        if bytes.len() > MAX_STRING_LEN {
            return Err(StringError::TooLong(bytes.len()));
        }
        // Most strings (topics, client ids) are plain ASCII: one pass
        // settles them; anything else takes the two full checks.
        if !plain_ascii(&bytes) {
            std::str::from_utf8(&bytes).map_err(|_| StringError::InvalidUtf8)?;
            if bytes.contains(&0) {
                return Err(StringError::NullCharacter);
            }
        }
        Ok(Self(bytes))
    }

    /// Copies `text` after checking it.
    pub fn new(text: &str) -> Result<Self, StringError> {
        Self::from_bytes(Bytes::copy_from_slice(text.as_bytes()))
    }

    /// A copy in an allocation of its own. A decoded string shares the
    /// buffer its packet was read into; one kept for long (a client id, a
    /// subscription filter) should not keep that whole buffer alive.
    pub fn detached(&self) -> Self {
        Self(Bytes::copy_from_slice(&self.0))
    }

    /// Wraps a string constant without copying.
    ///
    /// # Panics
    /// When `text` breaks the MQTT string rules: constants are the
    /// program's own, so that is a bug, not input.
    pub fn from_static(text: &'static str) -> Self {
        match Self::from_bytes(Bytes::from_static(text.as_bytes())) {
            Ok(s) => s,
            Err(e) => panic!("invalid MQTT string constant {text:?}: {e}"),
        }
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        #[allow(unsafe_code)]
        // SAFETY: every constructor checked that the bytes are valid UTF-8,
        // and the bytes are immutable.
        unsafe {
            std::str::from_utf8_unchecked(&self.0)
        }
    }

    /// The underlying bytes (shares the buffer).
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Consumes the string, returning its buffer.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

/// Whether every byte is in 1..=0x7F (ASCII without U+0000, so valid
/// UTF-8 free of nulls), eight bytes at a time: in a word, a byte at 0x80
/// or above shows its high bit, and a zero byte borrows in the subtraction
/// and shows it there. A borrow only starts at a zero byte, so bytes above
/// a flagged one may be flagged too, but never without one.
fn plain_ascii(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(word);
        let v = u64::from_le_bytes(eight);
        if (v.wrapping_sub(ONES) | v) & HIGH != 0 {
            return false;
        }
    }
    words.remainder().iter().all(|&b| b.wrapping_sub(1) < 0x7F)
}

impl Deref for MqttString {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for MqttString {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for MqttString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for MqttString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<&str> for MqttString {
    type Error = StringError;
    fn try_from(text: &str) -> Result<Self, StringError> {
        Self::new(text)
    }
}

impl TryFrom<String> for MqttString {
    type Error = StringError;
    fn try_from(text: String) -> Result<Self, StringError> {
        Self::from_bytes(Bytes::from(text))
    }
}

impl PartialEq<str> for MqttString {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for MqttString {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_multibyte_text() {
        assert_eq!(MqttString::new("a/b").map(|s| s.len()), Ok(3));
        assert!(MqttString::new("température/°C").is_ok());
        assert!(MqttString::new("").is_ok());
    }

    #[test]
    fn plain_ascii_is_every_byte_from_1_to_127() {
        for len in 0..=20 {
            for at in 0..len {
                for (byte, plain) in [(0x00, false), (0x01, true), (0x7F, true), (0x80, false)] {
                    let mut text = vec![b'a'; len];
                    text[at] = byte;
                    assert_eq!(plain_ascii(&text), plain, "{byte:#x} at {at} of {len}");
                }
            }
            assert!(plain_ascii(&vec![b'z'; len]));
        }
        // Zero bytes and high bytes beside each other, in one word.
        assert!(!plain_ascii(&[
            0x01, 0x00, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01
        ]));
        assert!(!plain_ascii(&[0xFF; 9]));
    }

    #[test]
    fn refuses_null_surrogates_and_overlong() {
        assert_eq!(MqttString::new("a\0b"), Err(StringError::NullCharacter));
        // U+D800 encoded as UTF-8 (a surrogate): not valid UTF-8.
        let surrogate = Bytes::from_static(&[0xED, 0xA0, 0x80]);
        assert_eq!(
            MqttString::from_bytes(surrogate),
            Err(StringError::InvalidUtf8)
        );
        // An overlong encoding of '/'.
        let overlong = Bytes::from_static(&[0xC0, 0xAF]);
        assert_eq!(
            MqttString::from_bytes(overlong),
            Err(StringError::InvalidUtf8)
        );
        let long = "x".repeat(MAX_STRING_LEN + 1);
        assert_eq!(
            MqttString::new(&long),
            Err(StringError::TooLong(MAX_STRING_LEN + 1))
        );
        assert!(MqttString::new(&long[1..]).is_ok());
    }
}
