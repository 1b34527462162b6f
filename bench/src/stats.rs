//! Medians, percentiles and the figures collected over the rounds.

use std::collections::BTreeMap;
use std::time::Duration;

/// The value at percentile `p` (0–100) of `values`, nearest rank; `None`
/// when there are none.
pub(crate) fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Latencies in microseconds.
pub(crate) fn micros(latencies: &[Duration]) -> Vec<f64> {
    latencies.iter().map(|d| d.as_secs_f64() * 1e6).collect()
}

/// Median, min and max of one figure over the rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Summary {
    /// The median (the mean of the middle two for an even count).
    pub(crate) median: f64,
    /// The smallest value.
    pub(crate) min: f64,
    /// The largest value.
    pub(crate) max: f64,
}

/// The summary of `values`; `None` when there are none.
pub(crate) fn summarize(values: &[f64]) -> Option<Summary> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let (first, last) = (*sorted.first()?, *sorted.last()?);
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: first,
        max: last,
    })
}

/// Every figure measured, one value per round, by name.
#[derive(Debug, Default)]
pub(crate) struct Figures {
    values: BTreeMap<String, Vec<f64>>,
}

impl Figures {
    /// Record this round's value of `name` (nothing when `value` is `None`).
    pub(crate) fn push(&mut self, name: impl Into<String>, value: Option<f64>) {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            self.values.entry(name.into()).or_default().push(v);
        }
    }

    /// The summary of `name` over the rounds.
    pub(crate) fn get(&self, name: &str) -> Option<Summary> {
        self.values.get(name).and_then(|v| summarize(v))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(summarize(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn figures_skip_missing_values() {
        let mut f = Figures::default();
        f.push("a", Some(1.0));
        f.push("a", None);
        f.push("a", Some(3.0));
        assert_eq!(f.get("a").unwrap().median, 2.0);
        assert!(f.get("b").is_none());
    }
}
