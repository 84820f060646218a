//! A run split over K agent processes (or hosts): agent I of K owns sessions
//! ⌊N·I/K⌋ .. ⌊N·(I+1)/K⌋ of the N, and the same share of the offered rate and the ramp, so
//! the agents together make exactly the run one process would have made.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Agent `index` of `count` (written `I/K` on the command line, 0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Segment {
    /// This agent, 0 ≤ index < count.
    pub index: u32,
    /// Agents in the run.
    pub count: u32,
}

impl Segment {
    /// The whole run as one segment.
    pub const WHOLE: Segment = Segment { index: 0, count: 1 };

    /// The global session ids this agent runs, out of `total`.
    pub fn ids(self, total: usize) -> Range<usize> {
        let bound = |i: u32| (total as u128 * u128::from(i) / u128::from(self.count)) as usize;
        bound(self.index)..bound(self.index + 1)
    }

    /// How many of `total` sessions this agent runs.
    pub fn share(self, total: usize) -> usize {
        self.ids(total).len()
    }

    /// `value` (a rate or a ramp rate for all `total` sessions) scaled to this agent's share.
    pub fn scale(self, value: f64, total: usize) -> f64 {
        if !self.is_split() {
            value
        } else if total == 0 {
            0.0
        } else {
            value * self.share(total) as f64 / total as f64
        }
    }

    /// Where this agent's evenly spaced schedule starts within one gap of the whole run's, as
    /// a fraction of its own gap: equal shares then interleave instead of sending together.
    pub fn phase(self) -> f64 {
        f64::from(self.index) / f64::from(self.count)
    }

    /// Whether this is one agent of several.
    pub fn is_split(self) -> bool {
        self.count > 1
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Segment {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{text:?} is not a segment I/K (0 ≤ I < K, e.g. 0/4)");
        let (index, count) = text.trim().split_once('/').ok_or_else(bad)?;
        let index: u32 = index.trim().parse().map_err(|_| bad())?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Segment { index, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_i_of_k_and_refuses_the_rest() {
        assert_eq!("2/4".parse(), Ok(Segment { index: 2, count: 4 }));
        assert_eq!(" 0 / 1 ".parse(), Ok(Segment::WHOLE));
        for bad in ["4/4", "1/0", "-1/3", "a/3", "3", "1/2/3", ""] {
            assert!(bad.parse::<Segment>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(Segment { index: 3, count: 7 }.to_string(), "3/7");
    }

    #[test]
    fn the_issue_example_splits_as_written() {
        // ⌊N(I+1)/K⌋ − ⌊NI/K⌋ for N = 10, K = 4: 2, 3, 2, 3.
        let shares: Vec<usize> = (0..4)
            .map(|i| Segment { index: i, count: 4 }.share(10))
            .collect();
        assert_eq!(shares, [2, 3, 2, 3]);
    }

    proptest! {
        #[test]
        fn shares_sum_to_n_and_ids_are_disjoint_and_cover(total in 0usize..2_000_000, count in 1u32..300) {
            let mut next = 0;
            let mut rate = 0.0;
            for index in 0..count {
                let segment = Segment { index, count };
                let ids = segment.ids(total);
                // Contiguous and in order: disjoint, and together 0..total.
                prop_assert_eq!(ids.start, next);
                next = ids.end;
                // Never more than one session apart from an even split.
                let even = total as f64 / f64::from(count);
                prop_assert!((segment.share(total) as f64 - even).abs() < 1.0);
                rate += segment.scale(10_000.0, total);
            }
            prop_assert_eq!(next, total);
            if total > 0 {
                prop_assert!((rate - 10_000.0).abs() < 1e-6);
            }
        }
    }
}
