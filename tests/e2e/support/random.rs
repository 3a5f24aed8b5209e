//! Seeded randomness: every randomized test prints its seed, and
//! `SPENDGUARD_SEED` replays one exactly.

/// The seed of a randomized test: `SPENDGUARD_SEED` or the clock, printed
/// so that a failure replays exactly.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("SPENDGUARD_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("{test}: SPENDGUARD_SEED={seed}");
    seed
}

/// A small deterministic generator: the seed is printed, so a failure
/// replays exactly.
pub struct XorShift(pub u64);

impl XorShift {
    /// Xorshift never leaves zero, so a zero seed is taken as one.
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
