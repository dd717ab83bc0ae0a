#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| swarmfs::fuzz_targets::bencode(data));
