//! The Prometheus textfile for node_exporter's textfile collector (`--metrics-file`,
//! `metrics_file` in the configuration).
//!
//! After each backup run the workflow calls [`record_run`] with the file and the run's
//! [`BackupOutcome`]. The file keeps one series per VM (labels `host` and `vm`); the values of
//! the other VMs are read back from the file itself and kept. It is written atomically
//! (temporary file, fsync, rename), so the collector never reads half a file.
//!
//! | metric | meaning |
//! | --- | --- |
//! | `vm_backup_last_run_timestamp_seconds` | end of the latest run, success or not |
//! | `vm_backup_last_run_result` | exit status of the latest run: 0 success, 1 pre-check failed, 2 failed, 3 warning |
//! | `vm_backup_last_run_success` | 1 when the latest run published a backup (success or warning), else 0 |
//! | `vm_backup_last_success_timestamp_seconds` | end of the latest run that published a backup |
//! | `vm_backup_last_duration_seconds` | wall time of the latest published backup |
//! | `vm_backup_last_bytes` | bytes of disk images in the latest published backup |
//! | `vm_backup_last_throughput_bytes_per_second` | copy throughput of the latest published backup |
//! | `vm_backup_last_frozen_seconds` | frozen window of the latest published backup (0 without freeze) |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;

use crate::ops::outcome::BackupOutcome;
use crate::ExitStatus;

/// The metric families, with their help text, in the order written.
const FAMILIES: [(&str, &str); 8] = [
    (
        "vm_backup_last_run_timestamp_seconds",
        "End of the latest backup run, success or not (Unix time).",
    ),
    (
        "vm_backup_last_run_result",
        "Exit status of the latest run: 0 success, 1 pre-check failed, 2 failed, 3 warning.",
    ),
    (
        "vm_backup_last_run_success",
        "1 when the latest run published a backup, else 0.",
    ),
    (
        "vm_backup_last_success_timestamp_seconds",
        "End of the latest run that published a backup (Unix time).",
    ),
    (
        "vm_backup_last_duration_seconds",
        "Wall time of the latest published backup.",
    ),
    (
        "vm_backup_last_bytes",
        "Bytes of disk images in the latest published backup.",
    ),
    (
        "vm_backup_last_throughput_bytes_per_second",
        "Copy throughput of the latest published backup.",
    ),
    (
        "vm_backup_last_frozen_seconds",
        "Guest filesystems frozen window of the latest published backup.",
    ),
];

/// Values per (host, vm), per metric name.
type Series = BTreeMap<(String, String), BTreeMap<String, f64>>;

/// Updates the textfile with one run's outcome, keeping the other VMs' series.
pub fn record_run(path: &Path, outcome: &BackupOutcome<'_>) -> io::Result<()> {
    let mut series = match fs::read_to_string(path) {
        Ok(text) => parse(&text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Series::new(),
        Err(e) => return Err(e),
    };
    apply(&mut series, outcome);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    crate::store::write_atomic(path, render(&series).as_bytes()).map_err(io::Error::from)
}

/// Sets the series of the run's VM from its outcome.
fn apply(series: &mut Series, outcome: &BackupOutcome<'_>) {
    let unix = |rfc: &str| {
        chrono::DateTime::parse_from_rfc3339(rfc)
            .map(|t| t.timestamp_millis() as f64 / 1000.0)
            .unwrap_or_else(|_| chrono::Utc::now().timestamp_millis() as f64 / 1000.0)
    };
    match outcome {
        BackupOutcome::Published(meta) => {
            let m = series
                .entry((meta.host.clone(), meta.vm_name.clone()))
                .or_default();
            let end = unix(&meta.finished_at);
            m.insert(FAMILIES[0].0.into(), end);
            m.insert(FAMILIES[1].0.into(), meta.result.code() as f64);
            let published = matches!(meta.result, ExitStatus::Success | ExitStatus::Warning);
            m.insert(FAMILIES[2].0.into(), if published { 1.0 } else { 0.0 });
            if published {
                let duration = crate::store::catalog::run_seconds(
                    &meta.started_at,
                    &meta.finished_at,
                    &meta.phases,
                );
                m.insert(FAMILIES[3].0.into(), end);
                m.insert(FAMILIES[4].0.into(), duration);
                m.insert(FAMILIES[5].0.into(), meta.total_bytes as f64);
                m.insert(FAMILIES[6].0.into(), meta.bytes_per_sec);
                m.insert(FAMILIES[7].0.into(), meta.frozen_ms.unwrap_or(0.0) / 1000.0);
            }
        }
        BackupOutcome::Failed(f) => {
            let m = series.entry((f.host.clone(), f.vm.clone())).or_default();
            m.insert(FAMILIES[0].0.into(), unix(&f.finished_at));
            m.insert(FAMILIES[1].0.into(), f.result.code() as f64);
            m.insert(FAMILIES[2].0.into(), 0.0);
        }
    }
}

/// Renders the series in the Prometheus text exposition format.
fn render(series: &Series) -> String {
    let mut out = String::new();
    for (name, help) in FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for ((host, vm), values) in series {
            if let Some(v) = values.get(name) {
                let _ = writeln!(
                    out,
                    "{name}{{host=\"{}\",vm=\"{}\"}} {v}",
                    escape(host),
                    escape(vm)
                );
            }
        }
    }
    out
}

/// Reads back the samples of a file written by [`render`]; other lines are ignored.
fn parse(text: &str) -> Series {
    let mut series = Series::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let labels = parse_labels(labels);
        if let (Some(host), Some(vm)) = (labels.get("host"), labels.get("vm")) {
            series
                .entry((host.clone(), vm.clone()))
                .or_default()
                .insert(name.to_string(), value);
        }
    }
    series
}

/// Parses `k="v",k2="v2"` with Prometheus escapes.
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

/// Escapes a label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_with_escapes() {
        let mut s = Series::new();
        s.entry(("h\"1".into(), "vm\\a\nb".into()))
            .or_default()
            .insert(FAMILIES[1].0.into(), 3.0);
        s.entry(("h2".into(), "web".into()))
            .or_default()
            .insert(FAMILIES[5].0.into(), 1e12);
        assert_eq!(parse(&render(&s)), s);
    }
}
