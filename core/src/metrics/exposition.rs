//! The Prometheus text exposition format (version 0.0.4), written: `# HELP` and `# TYPE`
//! lines, then one sample per line, label values escaped.

use std::fmt::Write;

use super::histogram::Histogram;

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One sample: the family name plus `suffix` (`_bucket`, `_sum`, `_count` or empty), labels,
/// value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub suffix: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// A metric family: its full name (counters end in `_total`, units are suffixes: `_bytes`,
/// `_seconds`), help text, type and samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub samples: Vec<Sample>,
}

impl Family {
    /// A family of one unlabelled sample.
    pub fn single(name: &'static str, help: &'static str, kind: Kind, value: f64) -> Family {
        Family {
            name,
            help,
            kind,
            samples: vec![Sample {
                suffix: "",
                labels: Vec::new(),
                value,
            }],
        }
    }

    /// A histogram family: cumulative `_bucket` samples (`le`, the last `+Inf`), `_sum`,
    /// `_count`.
    pub fn histogram(name: &'static str, help: &'static str, h: &Histogram) -> Family {
        let mut samples: Vec<Sample> = h
            .cumulative()
            .into_iter()
            .map(|(le, n)| Sample {
                suffix: "_bucket",
                labels: vec![("le", number(le))],
                value: n as f64,
            })
            .collect();
        samples.push(Sample {
            suffix: "_sum",
            labels: Vec::new(),
            value: h.sum,
        });
        samples.push(Sample {
            suffix: "_count",
            labels: Vec::new(),
            value: h.count as f64,
        });
        Family {
            name,
            help,
            kind: Kind::Histogram,
            samples,
        }
    }
}

/// A value as the format spells it: `+Inf`, `-Inf`, `NaN`, else the shortest decimal that
/// reads back the same, never in exponent form (`1`, `0.25`).
pub fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        format!("{v}")
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Help text with `\` and newlines escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The families as exposition text, each family's lines together, ending with a newline.
pub fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(f.help));
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.as_str());
        for s in &f.samples {
            out.push_str(f.name);
            out.push_str(s.suffix);
            if !s.labels.is_empty() {
                let labels: Vec<String> = s
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                    .collect();
                let _ = write!(out, "{{{}}}", labels.join(","));
            }
            let _ = writeln!(out, " {}", number(s.value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_help_type_labels_and_histograms() {
        let mut h = Histogram::new(&[0.5, 1.0]);
        h.observe(0.25);
        h.observe(2.0);
        let families = [
            Family {
                name: "x_failures_total",
                help: "Failures,\nby cause \\ kind.",
                kind: Kind::Counter,
                samples: vec![Sample {
                    suffix: "",
                    labels: vec![("cause", "a\"b\\c\nd".to_owned())],
                    value: 3.0,
                }],
            },
            Family::single("x_size_bytes", "Size.", Kind::Gauge, 1e21),
            Family::histogram("x_duration_seconds", "Duration.", &h),
        ];
        assert_eq!(
            render(&families),
            "# HELP x_failures_total Failures,\\nby cause \\\\ kind.\n\
             # TYPE x_failures_total counter\n\
             x_failures_total{cause=\"a\\\"b\\\\c\\nd\"} 3\n\
             # HELP x_size_bytes Size.\n\
             # TYPE x_size_bytes gauge\n\
             x_size_bytes 1000000000000000000000\n\
             # HELP x_duration_seconds Duration.\n\
             # TYPE x_duration_seconds histogram\n\
             x_duration_seconds_bucket{le=\"0.5\"} 1\n\
             x_duration_seconds_bucket{le=\"1\"} 1\n\
             x_duration_seconds_bucket{le=\"+Inf\"} 2\n\
             x_duration_seconds_sum 2.25\n\
             x_duration_seconds_count 2\n"
        );
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
    }
}
