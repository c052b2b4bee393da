//! Frontend-controlled requests: bytes (and the descriptors requests take) through
//! the gate into the real request handler (see
//! `standby_net::fuzzing::vhost_user_session`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    standby_net::fuzzing::vhost_user_session(data);
});
