//! `--device auto|cpu|cuda[:N]`: which backend a command runs on.

use super::cuda;
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 when a GPU is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA device ordinal.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").or_else(|| s.strip_prefix("gpu:"));
                match n.map(|n| n.parse::<usize>()) {
                    Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                    _ => Err(format!("unknown device `{s}`: expected auto, cpu, cuda or cuda:N")),
                }
            }
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// What `auto` (or an explicit choice) comes to on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    Cpu,
    Cuda(usize),
}

/// Whether a CUDA device can be opened: the libraries load and the driver sees a device.
/// Err says why not, for messages ("auto: using the CPU because ...").
pub fn cuda_available() -> Result<usize, String> {
    cuda::libraries_present()?;
    match cuda::device_count()? {
        0 => Err("the CUDA driver reports no devices".into()),
        n => Ok(n),
    }
}

impl DeviceChoice {
    /// `auto` becomes CUDA device 0 when `cuda_available`, else the CPU. Explicit choices
    /// are returned as they are; opening the backend reports what is missing.
    pub fn resolve(self) -> Resolved {
        match self {
            DeviceChoice::Cpu => Resolved::Cpu,
            DeviceChoice::Cuda(n) => Resolved::Cuda(n),
            DeviceChoice::Auto => match cuda_available() {
                Ok(_) => Resolved::Cuda(0),
                Err(_) => Resolved::Cpu,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_strings() {
        assert_eq!("auto".parse::<DeviceChoice>(), Ok(DeviceChoice::Auto));
        assert_eq!("CPU".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(3)));
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn auto_resolves_without_panicking() {
        // On a machine without CUDA this must be the CPU, never a panic.
        let r = DeviceChoice::Auto.resolve();
        if cuda_available().is_err() {
            assert_eq!(r, Resolved::Cpu);
        }
    }
}
