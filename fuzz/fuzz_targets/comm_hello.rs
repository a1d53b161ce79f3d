#![no_main]
//! libFuzzer target: see `braid::fuzzing::comm_hello`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| braid::fuzzing::comm_hello(data));
