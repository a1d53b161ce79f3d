#![no_main]
//! libFuzzer target: see `braid::fuzzing::coord_state`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| braid::fuzzing::coord_state(data));
