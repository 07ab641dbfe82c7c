//! The process's own cost as Prometheus metrics, under the names every Prometheus client library
//! exports (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`), so that dashboards and alerts written for any other exporter
//! work on the CA, the agent and the proxy. Read from `/proc/self` on each scrape (Linux only,
//! as sigil is): a file that cannot be read leaves its metrics out of that scrape, logged, and
//! never fails the scrape.

use std::path::{Path, PathBuf};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Clock ticks per second of the times in `/proc/<pid>/stat` (`USER_HZ`). The kernel fixes it
/// at 100 for user space on every architecture sigil builds for; reading it from `sysconf` would
/// take `libc` and `unsafe` for a constant (Prometheus's own Go `procfs` hard-codes it too).
const USER_HZ: f64 = 100.0;

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no {field}")]
    Missing { path: PathBuf, field: &'static str },
    #[error("{path}: {field} is not a number")]
    Number {
        path: PathBuf,
        field: &'static str,
        #[source]
        source: std::num::ParseIntError,
    },
}

/// The [`Collector`] to register once in a process's root registry.
#[derive(Debug)]
pub struct ProcessMetrics {
    /// `/proc/self` in production; a copy of one in tests.
    proc_self: PathBuf,
    /// `/proc/stat` (the boot time the start time counts from).
    proc_stat: PathBuf,
}

impl Default for ProcessMetrics {
    fn default() -> Self {
        ProcessMetrics {
            proc_self: PathBuf::from("/proc/self"),
            proc_stat: PathBuf::from("/proc/stat"),
        }
    }
}

/// CPU time used and when the process started, from `/proc/<pid>/stat`.
#[derive(Debug, PartialEq)]
struct Times {
    cpu_seconds: f64,
    start_time_seconds: f64,
}

/// Memory from `/proc/<pid>/status` (`VmRSS`, `VmSize`).
#[derive(Debug, PartialEq)]
struct Memory {
    resident_bytes: u64,
    virtual_bytes: u64,
}

impl ProcessMetrics {
    fn file(&self, name: &str) -> PathBuf {
        self.proc_self.join(name)
    }

    fn times(&self) -> Result<Times, ProcError> {
        let stat_path = self.file("stat");
        let stat = read(&stat_path)?;
        let boot = read(&self.proc_stat)?;
        parse_times(&stat, &stat_path, &boot, &self.proc_stat)
    }

    fn memory(&self) -> Result<Memory, ProcError> {
        let path = self.file("status");
        parse_memory(&read(&path)?, &path)
    }

    fn open_fds(&self) -> Result<u64, ProcError> {
        let path = self.file("fd");
        let entries = std::fs::read_dir(&path).map_err(|source| ProcError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(entries.count() as u64)
    }

    /// The soft limit on open files; `None` when unlimited.
    fn max_fds(&self) -> Result<Option<u64>, ProcError> {
        let path = self.file("limits");
        parse_max_fds(&read(&path)?, &path)
    }
}

impl Collector for ProcessMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match self.times() {
            Ok(times) => {
                let cpu = ConstCounter::new(times.cpu_seconds);
                cpu.encode(encoder.encode_descriptor(
                    "process_cpu_seconds",
                    "Total user and system CPU time spent in seconds",
                    None,
                    cpu.metric_type(),
                )?)?;
                gauge(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds",
                    times.start_time_seconds,
                )?;
            }
            Err(e) => unavailable(&e),
        }
        match self.memory() {
            Ok(memory) => {
                gauge(
                    &mut encoder,
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes",
                    memory.resident_bytes as f64,
                )?;
                gauge(
                    &mut encoder,
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes",
                    memory.virtual_bytes as f64,
                )?;
            }
            Err(e) => unavailable(&e),
        }
        match self.open_fds() {
            Ok(fds) => gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                fds as f64,
            )?,
            Err(e) => unavailable(&e),
        }
        match self.max_fds() {
            Ok(Some(max)) => gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                max as f64,
            )?,
            Ok(None) => {}
            Err(e) => unavailable(&e),
        }
        Ok(())
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

fn unavailable(error: &ProcError) {
    tracing::warn!(
        error = %error,
        cause = ?std::error::Error::source(error).map(ToString::to_string),
        "process metrics left out of this scrape"
    );
}

fn read(path: &Path) -> Result<String, ProcError> {
    std::fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn number(text: &str, path: &Path, field: &'static str) -> Result<u64, ProcError> {
    text.parse().map_err(|source| ProcError::Number {
        path: path.to_path_buf(),
        field,
        source,
    })
}

/// `utime + stime` and `starttime` of `/proc/<pid>/stat` (fields 14, 15 and 22, in clock ticks;
/// the second field, the command in parentheses, may itself hold spaces and parentheses, so
/// fields are counted after its last `)`), and `btime` of `/proc/stat`.
fn parse_times(
    stat: &str,
    stat_path: &Path,
    boot: &str,
    boot_path: &Path,
) -> Result<Times, ProcError> {
    let after_command =
        stat.rfind(')')
            .map(|end| &stat[end + 1..])
            .ok_or_else(|| ProcError::Missing {
                path: stat_path.to_path_buf(),
                field: "command",
            })?;
    // Fields from the third (state) on: the nth field of stat(5) is at index n - 3.
    let fields: Vec<&str> = after_command.split_whitespace().collect();
    let field = |n: usize, name: &'static str| {
        let text = fields.get(n - 3).ok_or_else(|| ProcError::Missing {
            path: stat_path.to_path_buf(),
            field: name,
        })?;
        number(text, stat_path, name)
    };
    let cpu_ticks = field(14, "utime")? + field(15, "stime")?;
    let start_ticks = field(22, "starttime")?;
    let boot_time = boot
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .ok_or_else(|| ProcError::Missing {
            path: boot_path.to_path_buf(),
            field: "btime",
        })?;
    let boot_time = number(boot_time.trim(), boot_path, "btime")?;
    Ok(Times {
        cpu_seconds: cpu_ticks as f64 / USER_HZ,
        start_time_seconds: boot_time as f64 + start_ticks as f64 / USER_HZ,
    })
}

/// `VmRSS` and `VmSize` of `/proc/<pid>/status`, given in kB (KiB).
fn parse_memory(status: &str, path: &Path) -> Result<Memory, ProcError> {
    let kib = |field: &'static str| {
        let value = status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next())
            .ok_or_else(|| ProcError::Missing {
                path: path.to_path_buf(),
                field,
            })?;
        Ok(number(value, path, field)? * 1024)
    };
    Ok(Memory {
        resident_bytes: kib("VmRSS")?,
        virtual_bytes: kib("VmSize")?,
    })
}

/// The soft limit of the `Max open files` row of `/proc/<pid>/limits`; `None` if `unlimited`.
fn parse_max_fds(limits: &str, path: &Path) -> Result<Option<u64>, ProcError> {
    let soft = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or_else(|| ProcError::Missing {
            path: path.to_path_buf(),
            field: "Max open files",
        })?;
    if soft == "unlimited" {
        return Ok(None);
    }
    number(soft, path, "Max open files").map(Some)
}

#[cfg(test)]
mod tests;
