//! The r schedule: how many tokens each block merges away.

use std::fmt;
use std::str::FromStr;

use crate::PassError;

/// `--r` as the user wrote it.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// The same r in every block: `16`.
    Constant(usize),
    /// One r per block, padded with zeros: `16,16,8`.
    List(Vec<usize>),
    /// The paper's `(r, inflect)`: `8:-1` merges 2r in the first block down to 0.
    Inflect { r: usize, inflect: f64 },
}

impl FromStr for Schedule {
    type Err = PassError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| PassError::BadSchedule(format!("'{s}': {why}"));
        let count = |v: &str| -> Result<usize, PassError> {
            let v = v.trim();
            match v.parse::<i64>() {
                Ok(n) if n >= 0 => Ok(n as usize),
                Ok(_) => Err(bad("r counts tokens and must be 0 or more")),
                Err(_) => Err(bad("expected an integer, a comma list like 16,16,8, or R:INFLECT like 8:-1")),
            }
        };
        if let Some((r, inflect)) = s.split_once(':') {
            let inflect: f64 = inflect.trim().parse().map_err(|_| bad("INFLECT in R:INFLECT must be a number"))?;
            if !inflect.is_finite() {
                return Err(bad("INFLECT must be finite"));
            }
            return Ok(Schedule::Inflect { r: count(r)?, inflect });
        }
        if s.contains(',') {
            return Ok(Schedule::List(s.split(',').map(count).collect::<Result<_, _>>()?));
        }
        Ok(Schedule::Constant(count(s)?))
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Schedule::Constant(r) => write!(f, "{r}"),
            Schedule::List(rs) => {
                let parts: Vec<String> = rs.iter().map(|r| r.to_string()).collect();
                write!(f, "{}", parts.join(","))
            }
            Schedule::Inflect { r, inflect } => write!(f, "{r}:{inflect}"),
        }
    }
}

impl Schedule {
    /// The requested r of each of `layers` blocks, before clamping.
    pub fn per_block(&self, layers: usize) -> Result<Vec<usize>, PassError> {
        match self {
            Schedule::Constant(r) => Ok(vec![*r; layers]),
            Schedule::List(rs) if rs.len() > layers => Err(PassError::BadSchedule(format!(
                "the list has {} entries but the model has {layers} blocks",
                rs.len()
            ))),
            Schedule::List(rs) => Ok(rs.iter().copied().chain(std::iter::repeat(0)).take(layers).collect()),
            Schedule::Inflect { r, inflect } => {
                // Python's int() truncates toward zero; negative r means none.
                let lo = (*r as f64 * (1.0 - inflect)).trunc();
                let hi = 2.0 * *r as f64 - lo;
                let step = if layers > 1 { (hi - lo) / (layers - 1) as f64 } else { 0.0 };
                Ok((0..layers).map(|i| (lo + step * i as f64).trunc().max(0.0) as usize).collect())
            }
        }
    }
}

/// What one block does: merge `r` of its `tokens_in` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub requested: usize,
    pub r: usize,
    pub tokens_in: usize,
    pub tokens_out: usize,
}

/// Clamps every block's r to `(N - P) // 2` as the tokens shrink.
pub fn plan(requested: &[usize], tokens: usize, prefix: usize) -> Vec<Step> {
    let mut n = tokens;
    requested
        .iter()
        .map(|&want| {
            let r = want.min(n.saturating_sub(prefix) / 2);
            let step = Step { requested: want, r, tokens_in: n, tokens_out: n - r };
            n -= r;
            step
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decreasing_schedule_matches_the_paper() {
        let s: Schedule = "8:-1".parse().unwrap();
        assert_eq!(s.per_block(6).unwrap(), vec![16, 12, 9, 6, 3, 0]);
    }

    #[test]
    fn vit_b_at_r16_clamps_the_last_block() {
        let steps = plan(&[16; 12], 197, 1);
        let tokens: Vec<usize> = steps.iter().map(|s| s.tokens_in).collect();
        assert_eq!(tokens, vec![197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21]);
        assert_eq!(steps[11].r, 10);
        assert_eq!(steps[11].tokens_out, 11);
    }

    #[test]
    fn lists_pad_with_zeros_and_refuse_extra_entries() {
        let s: Schedule = "4,2".parse().unwrap();
        assert_eq!(s.per_block(4).unwrap(), vec![4, 2, 0, 0]);
        assert!(s.per_block(1).is_err());
    }

    #[test]
    fn negative_and_garbage_r_are_refused() {
        assert!("-1".parse::<Schedule>().is_err());
        assert!("x".parse::<Schedule>().is_err());
        assert!("4,-2".parse::<Schedule>().is_err());
    }
}
