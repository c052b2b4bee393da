//! Guest-controlled rings: descriptor tables, indirect tables and available rings of
//! both queues, walked through a loop port (see `standby_net::fuzzing::walk_rings`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    standby_net::fuzzing::walk_rings(data);
});
