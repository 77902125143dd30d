//! runc's command line, as containerd, CRI-O/conmon and podman write it: global flags, the
//! subcommand, and for `create`/`run`/`delete` the bundle and the container id.
//!
//! runc parses flags with Go's `flag` package (through urfave/cli v1): `-flag` and `--flag` are
//! the same, `--flag=value` and `--flag value` are the same for flags that take a value, a
//! boolean flag never takes the next word (`--debug=false` only), `--` ends the flags, and
//! flags may come after positionals (urfave/cli reorders them). Only the flags whose arity
//! matters for finding the subcommand, the bundle and the id are listed; an unknown flag takes
//! the next word only if that word is not itself a flag or (for global flags) a subcommand.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

/// runc's global flags that take a value (runc 1.0–1.2).
const GLOBAL_VALUE_FLAGS: &[&str] = &["root", "log", "log-format", "criu", "rootless"];
/// runc's global boolean flags.
const GLOBAL_BOOL_FLAGS: &[&str] = &["debug", "systemd-cgroup", "help", "h", "version", "v"];
/// runc's subcommands.
const SUBCOMMANDS: &[&str] = &[
    "checkpoint",
    "create",
    "delete",
    "events",
    "exec",
    "features",
    "help",
    "h",
    "init",
    "kill",
    "list",
    "pause",
    "ps",
    "restore",
    "resume",
    "run",
    "spec",
    "start",
    "state",
    "update",
];
/// Value-taking flags of `create` and `run`.
const CREATE_VALUE_FLAGS: &[&str] = &["bundle", "b", "console-socket", "pid-file", "preserve-fds"];
/// Boolean flags of `create` and `run`.
const CREATE_BOOL_FLAGS: &[&str] = &[
    "no-pivot",
    "no-new-keyring",
    "detach",
    "d",
    "keep",
    "no-subreaper",
    "help",
    "h",
];
/// Boolean flags of `delete`.
const DELETE_BOOL_FLAGS: &[&str] = &["force", "f", "help", "h"];
/// Value-taking flags of `exec` (runc 1.1–1.3).
const EXEC_VALUE_FLAGS: &[&str] = &[
    "console-socket",
    "pidfd-socket",
    "pid-file",
    "process",
    "p",
    "cwd",
    "env",
    "e",
    "user",
    "u",
    "additional-gids",
    "g",
    "cap",
    "c",
    "apparmor",
    "process-label",
    "preserve-fds",
    "cgroup",
];
/// Boolean flags of `exec`.
const EXEC_BOOL_FLAGS: &[&str] = &[
    "tty",
    "t",
    "detach",
    "d",
    "no-new-privs",
    "ignore-paused",
    "help",
    "h",
];

/// runc's `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// logrus' text format (runc's default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The global flags nixenv-runc cares about.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GlobalFlags {
    /// `--root`: runc's state directory.
    pub root: Option<OsString>,
    /// `--log`: where runc (and nixenv-runc) write their log.
    pub log: Option<OsString>,
    /// `--log-format`.
    pub log_format: LogFormat,
}

/// What nixenv-runc has to do before exec'ing runc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `create` or `run`: prepare the bundle of container `id`.
    Prepare {
        /// `create` or `run`.
        subcommand: &'static str,
        /// `--bundle`/`-b`; `None` means the working directory.
        bundle: Option<OsString>,
        /// The container id (the last positional).
        id: OsString,
    },
    /// `delete`: release container `id`'s pin after runc deleted it.
    Delete {
        /// The container id.
        id: OsString,
    },
    /// `exec`: give the process the environment changes of container `id`, if it has any.
    Exec {
        /// The container id (the first positional: the command, if any, follows it).
        id: OsString,
        /// `--process`/`-p`, if given (else the process comes from positional arguments and
        /// runc builds it from the container's own, rewritten, config).
        process: Option<ProcessArg>,
        /// `--preserve-fds`: descriptors 3 to 3+N-1 go to the process.
        preserve_fds: u32,
    },
    /// Anything else (including a `create` without an id, which runc itself will refuse).
    PassThrough,
}

/// Where `exec`'s `--process` file is named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessArg {
    /// The file.
    pub path: OsString,
    /// The index in argv (without `argv[0]`) of the word holding the path: the flag's own
    /// (`--process=FILE`) or the next one (`--process FILE`).
    pub index: usize,
    /// For `--process=FILE` (or `-p=FILE`), the word up to and including the `=`.
    pub inline_prefix: Option<OsString>,
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// Global flags.
    pub global: GlobalFlags,
    /// What to do.
    pub action: Action,
}

/// A flag word split into its name and inline value: `--root=/x` → (`root`, Some(`/x`)).
fn split_flag(arg: &OsStr) -> Option<(&str, Option<&OsStr>)> {
    let bytes = arg.as_bytes();
    if bytes.len() < 2 || bytes[0] != b'-' || bytes == b"--" {
        return None;
    }
    let body = if bytes.starts_with(b"--") {
        &bytes[2..]
    } else {
        &bytes[1..]
    };
    let (name, value) = match body.iter().position(|&b| b == b'=') {
        Some(i) => (&body[..i], Some(OsStr::from_bytes(&body[i + 1..]))),
        None => (body, None),
    };
    // Flag names are ASCII; anything else is not a flag runc knows, treat it as a boolean flag.
    Some((std::str::from_utf8(name).unwrap_or(""), value))
}

fn is_flag(arg: &OsStr) -> bool {
    split_flag(arg).is_some()
}

fn is_subcommand(arg: &OsStr) -> bool {
    arg.to_str().is_some_and(|s| SUBCOMMANDS.contains(&s))
}

/// Parses runc's argv without `argv[0]`.
pub fn parse(args: &[OsString]) -> Invocation {
    let mut global = GlobalFlags::default();
    let mut i = 0;
    let mut subcommand: Option<&OsStr> = None;
    while i < args.len() {
        let arg = args[i].as_os_str();
        if arg.as_bytes() == b"--" {
            i += 1;
            subcommand = args.get(i).map(OsString::as_os_str);
            break;
        }
        let Some((name, inline)) = split_flag(arg) else {
            subcommand = Some(arg);
            break;
        };
        let takes_value = if GLOBAL_VALUE_FLAGS.contains(&name) {
            true
        } else if GLOBAL_BOOL_FLAGS.contains(&name) {
            false
        } else {
            // Unknown: it takes the next word unless that word is a flag or a subcommand.
            args.get(i + 1)
                .is_some_and(|next| !is_flag(next) && !is_subcommand(next))
        };
        let value = match (takes_value, inline) {
            (_, Some(v)) => Some(v.to_owned()),
            (true, None) => {
                i += 1;
                args.get(i).cloned()
            }
            (false, None) => None,
        };
        match (name, value) {
            ("root", Some(v)) => global.root = Some(v),
            ("log", Some(v)) => global.log = Some(v),
            ("log-format", Some(v)) => {
                global.log_format = if v.as_bytes() == b"json" {
                    LogFormat::Json
                } else {
                    LogFormat::Text
                }
            }
            _ => {}
        }
        i += 1;
    }
    let rest = if subcommand.is_some() {
        &args[(i + 1).min(args.len())..]
    } else {
        &[][..]
    };
    let action = match subcommand.and_then(OsStr::to_str) {
        Some(sub @ ("create" | "run")) => {
            let parsed = parse_sub(rest, CREATE_VALUE_FLAGS, CREATE_BOOL_FLAGS, Layout::IdLast);
            match parsed.positionals.last() {
                Some(id) if !parsed.help => Action::Prepare {
                    subcommand: if sub == "create" { "create" } else { "run" },
                    bundle: parsed.value_of(&["bundle", "b"]),
                    id: id.clone(),
                },
                _ => Action::PassThrough,
            }
        }
        Some("delete") => {
            let parsed = parse_sub(rest, &[], DELETE_BOOL_FLAGS, Layout::IdLast);
            match parsed.positionals.last() {
                Some(id) if !parsed.help => Action::Delete { id: id.clone() },
                _ => Action::PassThrough,
            }
        }
        Some("exec") => {
            let offset = (i + 1).min(args.len());
            let parsed = parse_sub(
                rest,
                EXEC_VALUE_FLAGS,
                EXEC_BOOL_FLAGS,
                Layout::IdThenCommand,
            );
            match parsed.positionals.first() {
                Some(id) if !parsed.help => Action::Exec {
                    id: id.clone(),
                    process: parsed.last(&["process", "p"]).map(|v| ProcessArg {
                        path: v.value.clone(),
                        index: offset + v.index,
                        inline_prefix: v.inline_prefix.clone(),
                    }),
                    preserve_fds: parsed
                        .value_of(&["preserve-fds"])
                        .and_then(|v| v.to_str()?.parse().ok())
                        .unwrap_or(0),
                },
                _ => Action::PassThrough,
            }
        }
        _ => Action::PassThrough,
    };
    Invocation { global, action }
}

/// A flag's value as given on the command line.
struct FlagValue {
    name: String,
    value: OsString,
    /// The index (in the subcommand's arguments) of the word holding the value.
    index: usize,
    /// For `--flag=value`, the word up to and including the `=`.
    inline_prefix: Option<OsString>,
}

struct SubArgs {
    values: Vec<FlagValue>,
    positionals: Vec<OsString>,
    help: bool,
}

impl SubArgs {
    /// The last value given for any of `names` (Go's flag package keeps the last).
    fn last(&self, names: &[&str]) -> Option<&FlagValue> {
        self.values
            .iter()
            .rev()
            .find(|v| names.contains(&v.name.as_str()))
    }

    fn value_of(&self, names: &[&str]) -> Option<OsString> {
        self.last(names).map(|v| v.value.clone())
    }

    /// Records the value of flag `name` at `args[i]` (`inline` after its `=`, else the next
    /// word if it `takes_value`); returns how many words after `args[i]` it used.
    fn take_value(
        &mut self,
        args: &[OsString],
        i: usize,
        name: &str,
        inline: Option<&OsStr>,
        takes_value: bool,
    ) -> usize {
        let (value, index, prefix) = match inline {
            Some(v) => (v.to_owned(), i, Some(inline_prefix(&args[i], v))),
            None if takes_value => match args.get(i + 1) {
                Some(v) => (v.clone(), i + 1, None),
                None => return 1,
            },
            None => return 0,
        };
        self.values.push(FlagValue {
            name: name.to_owned(),
            value,
            index,
            inline_prefix: prefix,
        });
        index - i
    }
}

/// A flag word's part up to and including its `=`, when it has an inline value.
fn inline_prefix(arg: &OsStr, value: &OsStr) -> OsString {
    let b = arg.as_bytes();
    OsStr::from_bytes(&b[..b.len() - value.len()]).to_owned()
}

/// Where a subcommand's container id sits among its positionals.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `create`, `run`, `delete`: the id is the last positional, flags may follow it (runc
    /// reorders them); an unknown flag takes the next word if another positional follows.
    IdLast,
    /// `exec`: flags, the id, then the command, whose words are all positionals (runc does not
    /// reorder exec's arguments); unknown flags are taken as boolean.
    IdThenCommand,
}

fn parse_sub(
    args: &[OsString],
    value_flags: &[&str],
    bool_flags: &[&str],
    layout: Layout,
) -> SubArgs {
    let mut out = SubArgs {
        values: Vec::new(),
        positionals: Vec::new(),
        help: false,
    };
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_os_str();
        if arg.as_bytes() == b"--" {
            out.positionals.extend(args[i + 1..].iter().cloned());
            break;
        }
        match split_flag(arg) {
            None if layout == Layout::IdThenCommand => {
                out.positionals.extend(args[i..].iter().cloned());
                break;
            }
            None => out.positionals.push(arg.to_owned()),
            Some((name, inline)) => {
                if name == "help" || name == "h" {
                    out.help = true;
                }
                let takes_value = if value_flags.contains(&name) {
                    true
                } else if bool_flags.contains(&name) || layout == Layout::IdThenCommand {
                    false
                } else {
                    // Unknown flag: a following non-flag word is its value only if another
                    // positional comes after it (the id is always last).
                    inline.is_none()
                        && args.get(i + 1).is_some_and(|n| !is_flag(n))
                        && args[i + 2..].iter().any(|a| !is_flag(a))
                };
                i += out.take_value(args, i, name, inline, takes_value);
            }
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(line: &str) -> Invocation {
        let args: Vec<OsString> = line.split_whitespace().map(OsString::from).collect();
        parse(&args)
    }

    fn prepare(sub: &'static str, bundle: Option<&str>, id: &str) -> Action {
        Action::Prepare {
            subcommand: sub,
            bundle: bundle.map(OsString::from),
            id: id.into(),
        }
    }

    #[test]
    fn invocations_as_runtimes_issue_them() {
        let cases: &[(&str, Action)] = &[
            // containerd's runc shim (go-runc): root, log, log-format json, systemd cgroups.
            (
                "--root /run/containerd/runc/k8s.io --log /run/containerd/io.containerd.runtime.v2.task/k8s.io/c1/log.json --log-format json --systemd-cgroup create --bundle /run/containerd/io.containerd.runtime.v2.task/k8s.io/c1 --pid-file /run/containerd/io.containerd.runtime.v2.task/k8s.io/c1/init.pid c1",
                prepare("create", Some("/run/containerd/io.containerd.runtime.v2.task/k8s.io/c1"), "c1"),
            ),
            (
                "--root /run/containerd/runc/default --log /x/log.json --log-format json create --bundle /b --pid-file /b/init.pid --console-socket /tmp/pty123/pty.sock --no-pivot c2",
                prepare("create", Some("/b"), "c2"),
            ),
            ("--root /run/containerd/runc/k8s.io --log /x/log.json --log-format json delete c1", Action::Delete { id: "c1".into() }),
            ("--root /run/containerd/runc/k8s.io --log /x/log.json --log-format json delete --force c1", Action::Delete { id: "c1".into() }),
            ("--root /run/containerd/runc/k8s.io --log /x/log.json --log-format json start c1", Action::PassThrough),
            ("--root /run/containerd/runc/k8s.io --log /x/log.json --log-format json kill --all c1 9", Action::PassThrough),
            ("--root /run/containerd/runc/k8s.io --log /x/log.json --log-format json state c1", Action::PassThrough),
            ("--rootless=false --root /r create --bundle /b c3", prepare("create", Some("/b"), "c3")),
            // conmon as CRI-O drives it (runtime args first, then create).
            (
                "--root=/run/runc --systemd-cgroup create --bundle /var/run/containers/storage/overlay-containers/abc/userdata --pid-file /var/run/containers/storage/overlay-containers/abc/userdata/pidfile abc",
                prepare("create", Some("/var/run/containers/storage/overlay-containers/abc/userdata"), "abc"),
            ),
            (
                "--systemd-cgroup --root=/run/runc create --bundle /u --pid-file /u/pidfile --no-new-keyring --console-socket /tmp/conmon-term.X abc",
                prepare("create", Some("/u"), "abc"),
            ),
            // podman through conmon: --log-format=json --log=... as runtime args.
            (
                "--root /run/runc --log-format=json --log=/var/lib/containers/storage/overlay-containers/abc/userdata/oci-log create --bundle /u --pid-file /u/pidfile abc",
                prepare("create", Some("/u"), "abc"),
            ),
            ("--root /run/runc --systemd-cgroup delete --force abc", Action::Delete { id: "abc".into() }),
            ("--root /run/runc state abc", Action::PassThrough),
            ("--root /run/runc kill abc 15", Action::PassThrough),
            ("--root /run/runc features", Action::PassThrough),
            // Single dash, `=` forms, short flags, flags after the id, `--`.
            ("-root /r create -b /b c4", prepare("create", Some("/b"), "c4")),
            ("create -b=/b c5", prepare("create", Some("/b"), "c5")),
            ("create c6 --bundle /b", prepare("create", Some("/b"), "c6")),
            ("create --bundle=/b -- c7", prepare("create", Some("/b"), "c7")),
            ("create c8", prepare("create", None, "c8")),
            ("run -d --bundle /b --keep c9", prepare("run", Some("/b"), "c9")),
            ("run c10", prepare("run", None, "c10")),
            ("--debug create --bundle /b c11", prepare("create", Some("/b"), "c11")),
            ("--debug=true create --bundle /b c11", prepare("create", Some("/b"), "c11")),
            // Unknown global flags: boolean before a subcommand, value otherwise.
            ("--future-bool create --bundle /b c12", prepare("create", Some("/b"), "c12")),
            ("--future-value x create --bundle /b c13", prepare("create", Some("/b"), "c13")),
            ("--future-value=x create --bundle /b c14", prepare("create", Some("/b"), "c14")),
            // Unknown create flags.
            ("create --future-value v --bundle /b c15", prepare("create", Some("/b"), "c15")),
            ("create --bundle /b --future-bool c16", prepare("create", Some("/b"), "c16")),
            // Nothing to prepare.
            ("create", Action::PassThrough),
            ("create --bundle /b", Action::PassThrough),
            ("create --help", Action::PassThrough),
            ("delete", Action::PassThrough),
            ("--version", Action::PassThrough),
            ("-v", Action::PassThrough),
            ("", Action::PassThrough),
            ("--root /r", Action::PassThrough),
            ("list", Action::PassThrough),
            ("spec --bundle /b", Action::PassThrough),
        ];
        for (line, want) in cases {
            assert_eq!(&inv(line).action, want, "{line}");
        }
    }

    fn exec(id: &str, process: Option<(&str, usize, Option<&str>)>, preserve_fds: u32) -> Action {
        Action::Exec {
            id: id.into(),
            process: process.map(|(path, index, prefix)| ProcessArg {
                path: path.into(),
                index,
                inline_prefix: prefix.map(OsString::from),
            }),
            preserve_fds,
        }
    }

    #[test]
    fn exec_invocations_as_runtimes_issue_them() {
        let cases: &[(&str, Action)] = &[
            // containerd's runc shim (go-runc).
            (
                "--root /r --log /x/log.json --log-format json exec --process /tmp/p.json --detach --pid-file /tmp/e.pid c1",
                exec("c1", Some(("/tmp/p.json", 8, None)), 0),
            ),
            // conmon for CRI-O's ExecSync (runtime args, then exec's own).
            (
                "--root=/run/runc exec --pid-file /tmp/pidfile1 --process /tmp/exec-process-1 --detach c1",
                exec("c1", Some(("/tmp/exec-process-1", 5, None)), 0),
            ),
            // CRI-O's streaming Exec, without conmon.
            (
                "--root /run/runc --systemd-cgroup exec --process /tmp/exec-process-2 c1",
                exec("c1", Some(("/tmp/exec-process-2", 5, None)), 0),
            ),
            // podman through conmon, with a terminal.
            (
                "--root /run/runc --log-format=json --log=/u/oci-log exec --pid-file /u/p --process /u/exec.json --detach --tty --console-socket /tmp/s c1",
                exec("c1", Some(("/u/exec.json", 8, None)), 0),
            ),
            ("exec -p /p.json c2", exec("c2", Some(("/p.json", 2, None)), 0)),
            ("exec --process=/p.json c3", exec("c3", Some(("/p.json", 1, Some("--process="))), 0)),
            ("exec -p=/p.json --preserve-fds 2 c4", exec("c4", Some(("/p.json", 1, Some("-p="))), 2)),
            // The last --process wins, as in Go's flag package.
            ("exec -p /a -p /b c5", exec("c5", Some(("/b", 4, None)), 0)),
            // Positional process: id first, the command (with its own flags) after.
            ("exec -t c6 sh -c --process", exec("c6", None, 0)),
            ("exec --env A=1 --user 0:0 c7 ls -l", exec("c7", None, 0)),
            ("exec -- c8 ls", exec("c8", None, 0)),
            ("exec", Action::PassThrough),
            ("exec --help c1", Action::PassThrough),
            ("exec --process /p.json", Action::PassThrough),
        ];
        for (line, want) in cases {
            assert_eq!(&inv(line).action, want, "{line}");
        }
    }

    #[test]
    fn global_flags() {
        let g = inv("--root /r --log /l --log-format json state x").global;
        assert_eq!(g.root.as_deref(), Some(OsStr::new("/r")));
        assert_eq!(g.log.as_deref(), Some(OsStr::new("/l")));
        assert_eq!(g.log_format, LogFormat::Json);
        let g = inv("--log-format=json --log=/l create --log /notglobal x").global;
        assert_eq!(g.log.as_deref(), Some(OsStr::new("/l")));
        assert_eq!(g.log_format, LogFormat::Json);
        let g = inv("--log /l --log-format text kill x").global;
        assert_eq!(g.log_format, LogFormat::Text);
        assert_eq!(inv("state x").global, GlobalFlags::default());
    }

    #[test]
    fn non_utf8_arguments_are_kept() {
        let id = OsString::from(OsStr::from_bytes(b"c\xff"));
        let bundle = OsString::from(OsStr::from_bytes(b"/b\xfe"));
        let args = vec![
            "create".into(),
            "--bundle".into(),
            bundle.clone(),
            id.clone(),
        ];
        assert_eq!(
            parse(&args).action,
            Action::Prepare {
                subcommand: "create",
                bundle: Some(bundle),
                id
            }
        );
    }
}
