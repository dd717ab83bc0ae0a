//! A token bucket shared by the connections of one torrent (`--upload-rate`, `--download-rate`).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// `rate` bytes per second; bursts up to a quarter second's worth (at least 64 KiB) after an
    /// idle spell. The bucket starts empty: from the start, no span of t seconds carries more
    /// than `rate * t` (a full bucket would give the first quarter second away free, and a
    /// capped transfer would beat its own cap).
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        let burst = (rate / 4.0).max(64.0 * 1024.0);
        RateLimiter {
            rate,
            burst,
            state: Mutex::new(Bucket {
                tokens: 0.0,
                last: Instant::now(),
            }),
        }
    }

    /// Takes `bytes` tokens, waiting until the bucket has refilled enough. Debt is allowed so a
    /// block larger than the burst still passes, and later callers wait it off.
    pub async fn acquire(&self, bytes: usize) {
        if let Some(w) = self.take(bytes) {
            tokio::time::sleep(w).await;
        }
    }

    /// Takes `bytes` tokens at once and says how long to wait before using them (`None`: go
    /// now), for a caller with something to do before it sleeps.
    pub fn take(&self, bytes: usize) -> Option<Duration> {
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.last = now;
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst) - bytes as f64;
        (b.tokens < 0.0).then(|| Duration::from_secs_f64(-b.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_capped_transfer_takes_its_size_over_the_rate_and_idle_time_buys_one_burst() {
        const RATE: u64 = 4 << 20;
        let limiter = RateLimiter::new(RATE);
        let start = Instant::now();
        for _ in 0..(32 << 20) / (16 << 10) {
            limiter.acquire(16 << 10).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((took - 8.0).abs() < 0.01, "32 MiB at 4 MiB/s took {took} s");

        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        for _ in 0..(2 << 20) / (16 << 10) {
            limiter.acquire(16 << 10).await;
        }
        let took = start.elapsed().as_secs_f64();
        // A quarter second's worth (1 MiB) came at once; the other 1 MiB at the rate.
        assert!(
            (took - 0.25).abs() < 0.01,
            "2 MiB after a pause took {took} s"
        );
    }
}
