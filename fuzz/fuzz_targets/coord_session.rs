#![no_main]
//! libFuzzer target: see `braid::fuzzing::coord_session`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| braid::fuzzing::coord_session(data));
