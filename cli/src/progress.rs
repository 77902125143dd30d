//! Progress on stderr: a bar on a terminal, plain lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nixenv_core::nix::StorePath;
use nixenv_core::substituter::Progress;
use url::Url;

/// `1.2 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Renders substituter events.
pub enum CliProgress {
    Bar {
        bar: ProgressBar,
        started: AtomicU64,
        finished: AtomicU64,
    },
    Lines,
}

impl CliProgress {
    /// A bar if stderr is a terminal, else plain lines.
    pub fn for_stderr() -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            CliProgress::Bar {
                bar,
                started: AtomicU64::new(0),
                finished: AtomicU64::new(0),
            }
        } else {
            CliProgress::Lines
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let CliProgress::Bar { bar, .. } = self {
            bar.finish_and_clear();
        }
    }
}

impl Progress for CliProgress {
    fn download_started(
        &self,
        path: &StorePath,
        _url: &Url,
        file_size: Option<u64>,
        nar_size: u64,
    ) {
        let size = file_size.unwrap_or(nar_size);
        match self {
            CliProgress::Bar {
                bar,
                started,
                finished,
            } => {
                bar.inc_length(size);
                let s = started.fetch_add(1, Ordering::SeqCst) + 1;
                let f = finished.load(Ordering::SeqCst);
                bar.set_message(format!("{f}/{s} paths, fetching {}", path.name()));
            }
            CliProgress::Lines => eprintln!("fetching {path} ({})", human_bytes(size)),
        }
    }

    fn download_bytes(&self, _path: &StorePath, bytes: u64) {
        if let CliProgress::Bar { bar, .. } = self {
            bar.inc(bytes);
        }
    }

    fn download_restarted(&self, path: &StorePath, received: u64, error: &str) {
        match self {
            CliProgress::Bar { bar, .. } => {
                bar.set_position(bar.position().saturating_sub(received));
                bar.println(format!("retrying {path}: {error}"));
            }
            CliProgress::Lines => eprintln!("retrying {path}: {error}"),
        }
    }

    fn download_finished(&self, _path: &StorePath) {
        if let CliProgress::Bar {
            bar,
            started,
            finished,
        } = self
        {
            let f = finished.fetch_add(1, Ordering::SeqCst) + 1;
            let s = started.load(Ordering::SeqCst);
            bar.set_message(format!("{f}/{s} paths"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1_258_291), "1.2 MiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
