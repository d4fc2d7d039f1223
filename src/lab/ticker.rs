//! A fixed-rate schedule for the lab's loops (the cgroup sampler, the co-tenant probe).

use std::time::{Duration, Instant};

/// Wakes every `interval`, measured from the start, so work inside the loop does not stretch the period.
pub struct Ticker {
    next: Instant,
    interval: Duration,
}

impl Ticker {
    /// A schedule whose first tick is now.
    pub fn new(interval: Duration) -> Self {
        Ticker { next: Instant::now(), interval }
    }

    /// Sleeps until the next tick. A round that overran its interval starts the next one at once and the
    /// schedule restarts from now, rather than bursting to catch up.
    pub fn wait(&mut self) {
        self.next += self.interval;
        let now = Instant::now();
        if self.next > now {
            std::thread::sleep(self.next - now);
        } else {
            self.next = now;
        }
    }
}
