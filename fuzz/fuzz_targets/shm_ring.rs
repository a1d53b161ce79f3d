#![no_main]
//! libFuzzer target: see `braid_transport::fuzzing::shm_ring`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| braid_transport::fuzzing::shm_ring(data));
