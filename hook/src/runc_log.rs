//! Errors in runc's log format, so that conmon, CRI-O, podman and containerd, which read runc's
//! `--log` file after a failure, show nixenv's message as the runtime's error.
//!
//! runc logs through logrus: with `--log-format json` one object per line with the keys `level`,
//! `msg` and `time` (RFC 3339, whole seconds); otherwise logrus' text format,
//! `time="…" level=error msg="…"`.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::args::LogFormat;

/// One log line (with its trailing newline) in runc's `format`.
pub fn format_line(format: LogFormat, level: &str, msg: &str, time: SystemTime) -> String {
    let time = rfc3339(time);
    match format {
        LogFormat::Json => {
            // serde_json orders the keys as written, which is logrus' (sorted) order.
            let value = serde_json::json!({ "level": level, "msg": msg, "time": time });
            let mut line = value.to_string();
            line.push('\n');
            line
        }
        LogFormat::Text => format!("time=\"{time}\" level={level} msg={}\n", go_quote(msg)),
    }
}

/// Reports `msg` (already prefixed `nixenv: `) on stderr and, when runc was given `--log`, in
/// that file in runc's format. Writing the log is best effort: stderr always has the error.
pub fn report_error(log: Option<&OsStr>, format: LogFormat, msg: &str) {
    report(log, format, "error", msg)
}

/// Like [`report_error`], at level `warning`.
pub fn report_warning(log: Option<&OsStr>, format: LogFormat, msg: &str) {
    report(log, format, "warning", msg)
}

fn report(log: Option<&OsStr>, format: LogFormat, level: &str, msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
    if let Some(path) = log {
        let line = format_line(format, level, msg, SystemTime::now());
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(path);
        if let Ok(mut f) = file {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// `msg` quoted as Go's `%q` does for printable text (what logrus' text formatter uses).
fn go_quote(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len() + 2);
    out.push('"');
    for c in msg.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `time` as RFC 3339 in UTC, whole seconds: `2026-11-21T10:26:21Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift to a calendar whose years start on March 1st, in 400-year eras of 146097 days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(1_795_256_781)), "2026-11-21T10:26:21Z");
        assert_eq!(rfc3339(at(4_107_542_399)), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn json_lines_as_logrus_writes_them() {
        let line = format_line(
            LogFormat::Json,
            "error",
            "nixenv: acme/x@9: generation 9 not found in catalog \"http://c\"",
            at(1_795_256_781),
        );
        assert_eq!(
            line,
            "{\"level\":\"error\",\"msg\":\"nixenv: acme/x@9: generation 9 not found in catalog \\\"http://c\\\"\",\"time\":\"2026-11-21T10:26:21Z\"}\n"
        );
        // What containerd and podman do with it: parse the line, take `msg`.
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["level"], "error");
        assert!(v["msg"].as_str().unwrap().starts_with("nixenv: acme/x@9"));
    }

    #[test]
    fn text_lines_as_logrus_writes_them() {
        assert_eq!(
            format_line(LogFormat::Text, "error", "nixenv: a \"b\"\\c\nd", at(0)),
            "time=\"1970-01-01T00:00:00Z\" level=error msg=\"nixenv: a \\\"b\\\"\\\\c\\nd\"\n"
        );
    }

    #[test]
    fn report_appends_to_the_log_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.json");
        std::fs::write(
            &log,
            "{\"level\":\"info\",\"msg\":\"earlier\",\"time\":\"x\"}\n",
        )
        .unwrap();
        report_error(Some(log.as_os_str()), LogFormat::Json, "nixenv: boom");
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["msg"], "nixenv: boom");
    }
}
