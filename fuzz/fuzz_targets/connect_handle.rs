#![no_main]
//! libFuzzer target: see `braid_transport::fuzzing::connect_handle`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| braid_transport::fuzzing::connect_handle(data));
