use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;

use super::*;

/// A `/proc/<pid>/stat` line whose command holds spaces and parentheses: utime 250, stime 50,
/// starttime 360000 ticks.
const STAT: &str = "4242 (sigil (proxy) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 50 0 0 20 0 \
                    9 0 360000 52428800 2560 18446744073709551615 1 1 0 0 0 0 0 4096 1260 0 0 \
                    0 17 1 0 0 0 0 0\n";
const BOOT: &str = "cpu  1 2 3 4\nintr 5\nctxt 6\nbtime 1700000000\nprocesses 7\n";
const STATUS: &str = "Name:\tsigil\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t   61440 kB\n\
                      VmSize:\t   51200 kB\nVmHWM:\t   12000 kB\nVmRSS:\t   10240 kB\nThreads:\t9\n";
const LIMITS: &str = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";

fn encode(collector: ProcessMetrics) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

/// The value of the one sample named `name` (no labels) in `text`.
fn sample(text: &str, name: &str) -> f64 {
    let prefix = format!("{name} ");
    let values: Vec<f64> = text
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .map(|value| value.parse().unwrap())
        .collect();
    assert_eq!(values.len(), 1, "one sample of {name} in\n{text}");
    values[0]
}

#[test]
fn the_fields_are_read_where_the_kernel_writes_them() {
    let times = parse_times(STAT, Path::new("stat"), BOOT, Path::new("/proc/stat")).unwrap();
    assert_eq!(
        times,
        Times {
            cpu_seconds: 3.0,
            start_time_seconds: 1_700_003_600.0
        }
    );
    let memory = parse_memory(STATUS, Path::new("status")).unwrap();
    assert_eq!(
        memory,
        Memory {
            resident_bytes: 10240 * 1024,
            virtual_bytes: 51200 * 1024
        }
    );
    assert_eq!(
        parse_max_fds(LIMITS, Path::new("limits")).unwrap(),
        Some(1024)
    );
    let unlimited = LIMITS.replace("1024   ", "unlimited");
    assert_eq!(
        parse_max_fds(&unlimited, Path::new("limits")).unwrap(),
        None
    );
}

#[test]
fn a_file_of_another_shape_is_an_error_naming_the_file_and_field() {
    let truncated = &STAT[..STAT.find(" 250 ").unwrap()];
    let error = parse_times(
        truncated,
        Path::new("/proc/self/stat"),
        BOOT,
        Path::new("b"),
    )
    .unwrap_err();
    assert_eq!(error.to_string(), "/proc/self/stat: no utime");
    let error = parse_times(STAT, Path::new("s"), "cpu 1\n", Path::new("/proc/stat")).unwrap_err();
    assert_eq!(error.to_string(), "/proc/stat: no btime");
    let error = parse_memory(
        &STATUS.replace("10240", "lots"),
        Path::new("/proc/self/status"),
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "/proc/self/status: VmRSS is not a number"
    );
    assert!(std::error::Error::source(&error).is_some());
}

#[test]
fn a_scrape_exports_the_standard_names_from_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let proc_self = dir.path().join("self");
    std::fs::create_dir_all(proc_self.join("fd")).unwrap();
    for fd in ["0", "1", "2"] {
        std::fs::write(proc_self.join("fd").join(fd), "").unwrap();
    }
    std::fs::write(proc_self.join("stat"), STAT).unwrap();
    std::fs::write(proc_self.join("status"), STATUS).unwrap();
    std::fs::write(proc_self.join("limits"), LIMITS).unwrap();
    std::fs::write(dir.path().join("stat"), BOOT).unwrap();
    let text = encode(ProcessMetrics {
        proc_self,
        proc_stat: dir.path().join("stat"),
    });
    for line in [
        "# TYPE process_cpu_seconds counter",
        "process_cpu_seconds_total 3.0",
        "# TYPE process_start_time_seconds gauge",
        "process_start_time_seconds 1700003600.0",
        "process_resident_memory_bytes 10485760.0",
        "process_virtual_memory_bytes 52428800.0",
        "process_open_fds 3.0",
        "process_max_fds 1024.0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
    }
}

#[test]
fn an_unreadable_file_leaves_out_only_its_metrics() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("status"), STATUS).unwrap();
    let text = encode(ProcessMetrics {
        proc_self: dir.path().to_path_buf(),
        proc_stat: dir.path().join("absent"),
    });
    assert_eq!(sample(&text, "process_resident_memory_bytes"), 10485760.0);
    for absent in ["process_cpu_seconds", "process_open_fds", "process_max_fds"] {
        assert!(!text.contains(absent), "{absent} in\n{text}");
    }
}

#[test]
fn this_process_is_measured_as_it_runs() {
    let before = encode(ProcessMetrics::default());
    let files: Vec<std::fs::File> = (0..20).map(|_| tempfile::tempfile().unwrap()).collect();
    // Burn CPU until the kernel has accounted at least two more ticks to this process.
    let cpu_before = sample(&before, "process_cpu_seconds_total");
    let mut spins = 0u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sample(
        &encode(ProcessMetrics::default()),
        "process_cpu_seconds_total",
    ) < cpu_before + 0.02
    {
        assert!(
            std::time::Instant::now() < deadline,
            "10 s of spinning and the CPU time did not rise by 0.02 s"
        );
        for i in 0..1_000_000u64 {
            spins = std::hint::black_box(spins.wrapping_add(i));
        }
    }
    let after = encode(ProcessMetrics::default());
    // Other tests of this binary open and close files meanwhile, so the count is checked
    // against what this test holds (its 20 files and stdio), not against `before`.
    assert!(
        sample(&after, "process_open_fds") >= 23.0,
        "at least the 20 files held and stdio open:\n{after}"
    );
    drop(files);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = sample(&after, "process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "a test started within the hour: {started} (now {now})"
    );
    let resident = sample(&after, "process_resident_memory_bytes");
    assert!(resident > 1_000_000.0, "{after}");
    assert!(
        resident < sample(&after, "process_virtual_memory_bytes"),
        "{after}"
    );
    assert!(
        sample(&after, "process_max_fds") >= sample(&after, "process_open_fds"),
        "{after}"
    );
}
