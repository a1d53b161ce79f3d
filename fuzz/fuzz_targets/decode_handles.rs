#![no_main]
//! libFuzzer target: see `braid::fuzzing::decode_handles`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| braid::fuzzing::decode_handles(data));
