#![no_main]
//! libFuzzer target: see `braid::fuzzing::ps_wire`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| braid::fuzzing::ps_wire(data));
