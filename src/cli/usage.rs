//! Usage errors: what the user typed is wrong, exit status 2 (see main.rs).
//!
//! A value clap can check alone is checked by clap through one of the parsers here, so it is
//! refused with clap's message before anything runs; what needs two flags or a file to judge
//! is a [`UsageError`] returned from the command, which main maps to exit 2 as well.

use falcon_batch::job::JobError;
use falcon_batch::schedule::tune::TuneError;
use falcon_batch::schedule::ScheduleError;
use falcon_batch::score::Norm;
use falcon_batch::tensor::DType;
use falcon_batch::units;
use thiserror::Error;

/// A flag whose value, or combination with other flags, cannot work.
#[derive(Debug, Error)]
#[error("{flag}: {msg}")]
pub struct UsageError {
    pub flag: &'static str,
    pub msg: String,
}

impl UsageError {
    pub fn new(flag: &'static str, msg: impl Into<String>) -> UsageError {
        UsageError { flag, msg: msg.into() }
    }
}

/// A count that 0 would make meaningless (tokens per batch, ranks, layers per group...).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("expected a whole number: {e}")),
    }
}

fn number(s: &str) -> Result<f64, String> {
    s.trim().parse::<f64>().map_err(|e| format!("expected a number: {e}")).and_then(|v| if v.is_finite() { Ok(v) } else { Err("must be finite".into()) })
}

/// A share of a whole (top-p's probability mass, a fraction of peak speed): in (0, 1].
pub fn fraction(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("must be in (0, 1], found {v}"))
    }
}

pub fn probability(s: &str) -> Result<f32, String> {
    fraction(s).map(|v| v as f32)
}

pub fn non_negative(s: &str) -> Result<f32, String> {
    let v = number(s)?;
    if v >= 0.0 {
        Ok(v as f32)
    } else {
        Err(format!("must be 0 or more, found {v}"))
    }
}

pub fn positive(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be positive, found {v}"))
    }
}

pub fn positive_f32(s: &str) -> Result<f32, String> {
    positive(s).map(|v| v as f32)
}

pub fn norm(s: &str) -> Result<Norm, String> {
    Norm::parse(s).ok_or_else(|| format!("expected sum, mean or char, found `{s}`"))
}

pub fn dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).ok_or_else(|| format!("expected bf16, f16 or f32, found `{s}`"))
}

pub fn size(s: &str) -> Result<u64, String> {
    units::parse_bytes(s).map_err(|e| e.to_string())
}

pub fn rate(s: &str) -> Result<f64, String> {
    units::parse_rate(s).map_err(|e| e.to_string())
}

pub fn duration(s: &str) -> Result<f64, String> {
    units::parse_seconds(s).map_err(|e| e.to_string())
}

/// Whether `e`, or an error it wraps, is a usage error (exit 2): ours, a job's, or the
/// planner's refusal of a schedule flag (--rank-speed for another number of ranks...).
pub fn is_usage(e: &anyhow::Error) -> bool {
    let bad_option = |s: Option<&ScheduleError>| matches!(s, Some(ScheduleError::BadOption { .. }));
    e.chain().any(|c| {
        c.is::<UsageError>()
            || matches!(c.downcast_ref::<JobError>(), Some(JobError::Usage { .. }))
            || bad_option(c.downcast_ref::<ScheduleError>())
            || bad_option(match c.downcast_ref::<TuneError>() {
                Some(TuneError::Plan(s)) => Some(s),
                _ => None,
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert!(at_least_one("0").is_err() && at_least_one("x").is_err() && at_least_one("3") == Ok(3));
        assert!(probability("2").is_err() && probability("0").is_err() && probability("1") == Ok(1.0));
        assert!(non_negative("-1").is_err() && non_negative("0") == Ok(0.0));
        assert!(positive("0").is_err() && positive("nan").is_err() && positive("inf").is_err());
    }
}
