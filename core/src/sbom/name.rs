//! A store path's package name and version, split as Nix's `builtins.parseDrvName` does:
//! the version starts after the first `-` that is not followed by a letter
//! (`python3-3.11.7` → `python3`, `3.11.7`; `gcc-13.2.0-lib` → `gcc`, `13.2.0`, output
//! `lib`). A trailing well-known output name (`-lib`, `-dev`, …) is split off the version.

/// Output names Nix packages commonly have besides `out`.
const OUTPUTS: &[&str] = &[
    "bin", "dev", "lib", "out", "man", "doc", "info", "debug", "static", "devdoc", "data",
];

/// A store path name split into package name, version and output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackageName<'a> {
    pub name: &'a str,
    /// `None` when the name carries no version (`source`, `echoserver-env`).
    pub version: Option<&'a str>,
    /// A well-known output name that ended the version (`lib` of `gcc-13.2.0-lib`).
    pub output: Option<&'a str>,
}

/// Splits a store path's name (the part after `<hash>-`).
pub fn split(store_name: &str) -> PackageName<'_> {
    let bytes = store_name.as_bytes();
    let dash = (0..bytes.len())
        .find(|&i| bytes[i] == b'-' && bytes.get(i + 1).is_some_and(|c| !c.is_ascii_alphabetic()));
    let Some(i) = dash else {
        return PackageName {
            name: store_name,
            version: None,
            output: None,
        };
    };
    let (name, version) = (&store_name[..i], &store_name[i + 1..]);
    let output = version
        .rsplit_once('-')
        .filter(|(v, out)| !v.is_empty() && OUTPUTS.contains(out));
    match output {
        Some((v, out)) => PackageName {
            name,
            version: Some(v),
            output: Some(out),
        },
        None => PackageName {
            name,
            version: (!version.is_empty()).then_some(version),
            output: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(s: &str) -> (&str, Option<&str>, Option<&str>) {
        let p = split(s);
        (p.name, p.version, p.output)
    }

    #[test]
    fn splits_as_parse_drv_name() {
        assert_eq!(parts("hello-2.12.1"), ("hello", Some("2.12.1"), None));
        assert_eq!(parts("python3-3.11.7"), ("python3", Some("3.11.7"), None));
        assert_eq!(
            parts("glibc-2.38-44"),
            ("glibc", Some("2.38-44"), None),
            "the rest after the first dash and digit is the version"
        );
        assert_eq!(
            parts("gcc-13.2.0-lib"),
            ("gcc", Some("13.2.0"), Some("lib"))
        );
        assert_eq!(
            parts("openssl-3.0.13-bin"),
            ("openssl", Some("3.0.13"), Some("bin"))
        );
        assert_eq!(parts("echoserver-env"), ("echoserver-env", None, None));
        assert_eq!(parts("source"), ("source", None, None));
        assert_eq!(parts("font-util-1.4.1"), ("font-util", Some("1.4.1"), None));
        assert_eq!(parts("x-"), ("x-", None, None));
        assert_eq!(parts("x--1"), ("x", Some("-1"), None));
    }
}
