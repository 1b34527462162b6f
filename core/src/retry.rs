//! Retry policy: how many retries and how long to wait before each.

use std::time::Duration;

/// Exponential backoff with jitter and a cap.
///
/// The delay before retry `n` (1-based) is `base * factor^(n-1)`, capped at
/// `max`, then with jitter drawn uniformly from its upper half (so retries of
/// many failed requests spread out instead of arriving together).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Retries allowed after the first attempt (a request may override it).
    pub max_retries: u32,
    /// Delay before the first retry.
    pub base: Duration,
    /// Growth per retry.
    pub factor: f64,
    /// Longest delay.
    pub max: Duration,
    /// Whether to randomize the delay.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: crate::request::DEFAULT_MAX_RETRIES,
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(300),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The default policy with `max_retries`.
    pub fn new(max_retries: u32) -> Self {
        RetryPolicy {
            max_retries,
            ..RetryPolicy::default()
        }
    }

    /// Set the base delay.
    pub fn base(mut self, base: Duration) -> Self {
        self.base = base;
        self
    }

    /// Set the cap.
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// Set the growth factor.
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// Turn jitter on or off.
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay before retry number `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        let exp = self
            .factor
            .max(1.0)
            .powi(retry.saturating_sub(1).min(64) as i32);
        let secs = (self.base.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let secs = if self.jitter {
            secs / 2.0 + fastrand::f64() * secs / 2.0
        } else {
            secs
        };
        Duration::from_secs_f64(secs.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let p = RetryPolicy::new(5)
            .base(Duration::from_millis(100))
            .max(Duration::from_secs(1))
            .jitter(false);
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert_eq!(p.delay(4), Duration::from_millis(800));
        assert_eq!(p.delay(5), Duration::from_secs(1));
        assert_eq!(p.delay(1000), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_upper_half() {
        let p = RetryPolicy::new(5).base(Duration::from_secs(2));
        for _ in 0..100 {
            let d = p.delay(1);
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }
}
