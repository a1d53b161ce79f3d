#![no_main]
//! libFuzzer target: see `braid_transport::fuzzing::ib_wire`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| braid_transport::fuzzing::ib_wire(data));
