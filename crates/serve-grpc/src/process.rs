//! The server process's own metrics in the Prometheus text format, under the names every
//! Prometheus client library uses (`process_resident_memory_bytes`, ...), appended to
//! `/metrics` after the engine's.
//!
//! They are read from `/proc/self` at each scrape: Linux only, and absent elsewhere (or when
//! `/proc` cannot be read). A soak watches them to tell a leak (memory, file descriptors,
//! threads) from a warm-up.

use std::fmt::Write as _;

/// The process metrics, or an empty string where `/proc/self` cannot be read.
pub(crate) fn text() -> String {
    let mut out = String::new();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| status_value(&status, key).map(|v| v.saturating_mul(1024));
    let mut gauge = |name: &str, help: &str, value: Option<u64>| {
        if let Some(v) = value {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
    };
    gauge(
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        kib("VmRSS:"),
    );
    gauge(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        kib("VmSize:"),
    );
    gauge(
        "process_threads",
        "Threads of the process.",
        status_value(&status, "Threads:"),
    );
    let fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|dir| dir.count() as u64);
    gauge("process_open_fds", "Open file descriptors.", fds);
    out
}

/// The first number after `key` on its line of `/proc/self/status` (`VmRSS:   1234 kB`).
fn status_value(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_values_are_read_by_key() {
        let status = "Name:\tkvserve\nVmSize:\t  20480 kB\nVmRSS:\t   1024 kB\nThreads:\t7\n";
        assert_eq!(status_value(status, "VmRSS:"), Some(1024));
        assert_eq!(status_value(status, "VmSize:"), Some(20480));
        assert_eq!(status_value(status, "Threads:"), Some(7));
        assert_eq!(status_value(status, "VmSwap:"), None);
        assert_eq!(status_value("VmRSS:\tlots kB\n", "VmRSS:"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn on_linux_every_process_metric_is_there_and_positive() {
        let text = text();
        for name in [
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_threads",
            "process_open_fds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} gauge\n")), "{text}");
            let value: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            assert!(value > 0, "{name} in {text}");
        }
    }
}
