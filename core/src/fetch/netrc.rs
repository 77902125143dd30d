//! A small `.netrc` parser: `machine`, `default`, `login`, `password` (`account` and
//! `macdef` are understood and ignored), for HTTP authentication per host: an entry with a
//! `login` is HTTP Basic (`login:password`); one with only a `password` is a token, sent as
//! `Authorization: Bearer <password>` (what attic and cachix issue and accept).

use std::path::{Path, PathBuf};

/// Credentials for one machine (or the `default` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `None` when the entry has no `login`: the password is a bearer token.
    pub login: Option<String>,
    pub password: String,
}

/// How [`Credentials`] authenticate a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth<'a> {
    /// HTTP Basic.
    Basic { login: &'a str, password: &'a str },
    /// `Authorization: Bearer <token>`.
    Bearer { token: &'a str },
}

impl Credentials {
    /// Basic with a login, else Bearer with the password as the token.
    pub fn auth(&self) -> Auth<'_> {
        match &self.login {
            Some(login) => Auth::Basic {
                login,
                password: &self.password,
            },
            None => Auth::Bearer {
                token: &self.password,
            },
        }
    }
}

/// A parsed netrc file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Netrc {
    machines: Vec<(String, Credentials)>,
    default: Option<Credentials>,
}

/// Why a netrc file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NetrcError {
    #[error("cannot read netrc file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netrc file {path}: `{token}` without a value")]
    MissingValue { path: PathBuf, token: String },
    #[error("netrc file {path}: unexpected token `{token}`")]
    UnexpectedToken { path: PathBuf, token: String },
}

#[derive(Default)]
struct Entry {
    machine: Option<String>,
    login: Option<String>,
    password: Option<String>,
}

impl Netrc {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Netrc, NetrcError> {
        let text = std::fs::read_to_string(path).map_err(|source| NetrcError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses netrc text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Netrc, NetrcError> {
        let mut out = Netrc::default();
        let mut current: Option<Entry> = None;
        let missing = |token: &str| NetrcError::MissingValue {
            path: path.to_owned(),
            token: token.to_owned(),
        };

        let finish = |out: &mut Netrc, e: Option<Entry>| {
            if let Some(e) = e {
                let creds = Credentials {
                    login: e.login,
                    password: e.password.unwrap_or_default(),
                };
                match e.machine {
                    Some(m) => out.machines.push((m, creds)),
                    None => {
                        if out.default.is_none() {
                            out.default = Some(creds)
                        }
                    }
                }
            }
        };

        // Tokens with their line numbers; comments removed.
        let all_lines: Vec<&str> = text.lines().collect();
        let mut tokens: Vec<(usize, &str)> = Vec::new();
        for (n, line) in all_lines.iter().enumerate() {
            let line = line.split_once('#').map_or(*line, |(a, _)| a);
            tokens.extend(line.split_whitespace().map(|t| (n, t)));
        }
        let mut i = 0;
        while i < tokens.len() {
            let (line_no, token) = tokens[i];
            i += 1;
            let mut value = || -> Result<String, NetrcError> {
                let v = tokens
                    .get(i)
                    .map(|(_, v)| (*v).to_owned())
                    .ok_or_else(|| missing(token))?;
                i += 1;
                Ok(v)
            };
            match token {
                "machine" => {
                    let m = value()?;
                    finish(&mut out, current.take());
                    current = Some(Entry {
                        machine: Some(m),
                        ..Entry::default()
                    });
                }
                "default" => {
                    finish(&mut out, current.take());
                    current = Some(Entry::default());
                }
                "login" | "password" | "account" => {
                    let v = value()?;
                    let Some(e) = current.as_mut() else {
                        return Err(NetrcError::UnexpectedToken {
                            path: path.to_owned(),
                            token: token.to_owned(),
                        });
                    };
                    match token {
                        "login" => e.login = Some(v),
                        "password" => e.password = Some(v),
                        _ => {}
                    }
                }
                "macdef" => {
                    value()?;
                    // The macro body runs from the next line until an empty line.
                    let end = (line_no + 1..all_lines.len())
                        .find(|&n| all_lines[n].trim().is_empty())
                        .unwrap_or(all_lines.len());
                    while i < tokens.len() && tokens[i].0 <= end {
                        i += 1;
                    }
                }
                other => {
                    return Err(NetrcError::UnexpectedToken {
                        path: path.to_owned(),
                        token: other.to_owned(),
                    })
                }
            }
        }
        finish(&mut out, current.take());
        Ok(out)
    }

    /// The credentials for `host`: its `machine` entry, else `default`.
    pub fn lookup(&self, host: &str) -> Option<&Credentials> {
        self.machines
            .iter()
            .find(|(m, _)| m.eq_ignore_ascii_case(host))
            .map(|(_, c)| c)
            .or(self.default.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Netrc, NetrcError> {
        Netrc::parse(s, Path::new("/etc/nixenv/netrc"))
    }

    #[test]
    fn machines_and_default() {
        let n = parse(
            "# private caches\n\
             machine cache.example.org login alice password s3cret\n\
             machine other.example.org\n  login bob\n  password hunter2 # trailing comment\n\
             default login anon password guest\n",
        )
        .unwrap();
        assert_eq!(
            n.lookup("cache.example.org"),
            Some(&Credentials {
                login: Some("alice".into()),
                password: "s3cret".into()
            })
        );
        assert_eq!(
            n.lookup("cache.example.org").unwrap().auth(),
            Auth::Basic {
                login: "alice",
                password: "s3cret"
            }
        );
        assert_eq!(
            n.lookup("OTHER.example.org").unwrap().login.as_deref(),
            Some("bob")
        );
        assert_eq!(n.lookup("OTHER.example.org").unwrap().password, "hunter2");
        assert_eq!(
            n.lookup("unknown.example.org").unwrap().login.as_deref(),
            Some("anon")
        );
    }

    #[test]
    fn an_entry_without_login_is_a_bearer_token() {
        let n = parse(
            "machine attic.example.org password eyJhbGciOi.tok
",
        )
        .unwrap();
        assert_eq!(
            n.lookup("attic.example.org").unwrap().auth(),
            Auth::Bearer {
                token: "eyJhbGciOi.tok"
            }
        );
        assert_eq!(n.lookup("other.example.org"), None);
    }

    #[test]
    fn value_on_next_line_macdef_and_account() {
        let n = parse(
            "machine a login\nx password y account z\n\
             macdef init\ncd /pub\nget file\n\n\
             machine b login u password p\n",
        )
        .unwrap();
        assert_eq!(n.lookup("a").unwrap().login.as_deref(), Some("x"));
        assert_eq!(n.lookup("b").unwrap().password, "p");
        assert_eq!(n.lookup("c"), None);
    }

    #[test]
    fn errors_name_the_file_and_token() {
        let e = parse("machine a login").unwrap_err().to_string();
        assert_eq!(e, "netrc file /etc/nixenv/netrc: `login` without a value");
        let e = parse("machine a user x").unwrap_err().to_string();
        assert_eq!(e, "netrc file /etc/nixenv/netrc: unexpected token `user`");
        let e = parse("login x").unwrap_err().to_string();
        assert!(e.contains("unexpected token `login`"), "{e}");
        assert_eq!(parse("").unwrap(), Netrc::default());
    }
}
