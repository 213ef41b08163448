//! Packet sequences through the session engine, as a connection drives it
//! (`ferrymq_broker::fuzzing::engine_sequence`: three bytes an operation,
//! invariants checked after each). The first byte picks the protocol
//! version (bit 0) and whether the session is persistent (bit 1).

#![no_main]

use ferrymq_codec::Protocol;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, ops)) = data.split_first() else {
        return;
    };
    let protocol = if flags & 1 == 0 {
        Protocol::V311
    } else {
        Protocol::V5
    };
    ferrymq_broker::fuzzing::engine_sequence(protocol, flags & 2 != 0, ops);
});
