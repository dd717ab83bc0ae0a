//! Seeded random mutations of valid messages, for the "never panics on malformed input" tests
//! of every codec (a short bounded pass here; long runs belong to fuzzing), and for the stable
//! replay of the fuzz targets in `tests/fuzz_corpus.rs`.

use rand::Rng;

/// Changes, truncates or inserts one to three bytes of a non-empty `message`.
pub fn mutate(rng: &mut impl Rng, message: &[u8]) -> Vec<u8> {
    let mut m = message.to_vec();
    for _ in 0..rng.gen_range(1..4) {
        if m.is_empty() {
            break;
        }
        let i = rng.gen_range(0..m.len());
        match rng.gen_range(0..3) {
            0 => m[i] = rng.gen(),
            1 => m.truncate(i),
            _ => m.insert(i, rng.gen()),
        }
    }
    m
}
