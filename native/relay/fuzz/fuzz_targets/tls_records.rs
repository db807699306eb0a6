#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| derpmesh_relay_fuzz::tls_records::run(data));
