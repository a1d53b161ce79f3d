#![no_main]
//! libFuzzer target: see `braid_transport::fuzzing::tcp_frames`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| braid_transport::fuzzing::tcp_frames(data));
