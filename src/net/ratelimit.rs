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
    /// `rate` bytes per second; bursts up to a quarter second's worth (at least 64 KiB).
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        let burst = (rate / 4.0).max(64.0 * 1024.0);
        RateLimiter {
            rate,
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Takes `bytes` tokens, waiting until the bucket has refilled enough. Debt is allowed so a
    /// block larger than the burst still passes, and later callers wait it off.
    pub async fn acquire(&self, bytes: usize) {
        let wait = {
            let mut b = match self.state.lock() {
                Ok(b) => b,
                Err(p) => p.into_inner(),
            };
            let now = Instant::now();
            let elapsed = now.duration_since(b.last).as_secs_f64();
            b.last = now;
            b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
            b.tokens -= bytes as f64;
            if b.tokens >= 0.0 {
                None
            } else {
                Some(Duration::from_secs_f64(-b.tokens / self.rate))
            }
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}
