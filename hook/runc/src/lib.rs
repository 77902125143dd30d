//! The decisions of `nixenv-runc`'s first stage, free of I/O and of the standard library.
//!
//! `nixenv-runc` is called for every runc subcommand, and most of them (`state`, `kill`,
//! `delete` of a plain container, `exec`, `ps`, …) need nothing from nixenv. The first stage
//! therefore only decides where argv goes, then execs with argv unchanged:
//!
//! - if any argument is `create`, `run` or `delete`, to `nixenv-hook runc …` next to it, which
//!   parses runc's command line exactly (an argument that merely looks like one of those
//!   subcommands, a container called `run`, costs one more exec and nothing else);
//! - for `exec`, there too if a word after it names a container that nixenv prepared: one that
//!   has an exec record, `<root>/nixenv@<id>` in runc's state root (`--root`, else
//!   `/run/runc`), which nixenv-hook writes at create and removes at delete. One `stat` per
//!   candidate word (not a flag, no `/`), so an exec into any other container (probes run
//!   often) still goes straight to runc;
//! - otherwise to the real runc: `$NIXENV_RUNC`, else the first executable `runc` on `PATH`
//!   that is not this binary (nixenv-runc may be installed as `runc` earlier on `PATH`);
//! - if no runc is found, or the exec fails, to `nixenv-hook runc …` as well, which reports
//!   the error in runc's log format.
#![cfg_attr(not(test), no_std)]

/// The arguments that send argv to `nixenv-hook runc`.
const FULL_STAGE_WORDS: [&[u8]; 3] = [b"create", b"run", b"delete"];

/// `PATH` when the environment has none (as in nixenv-hook).
pub const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The stage argument `nixenv-hook` takes for nixenv-runc's work.
pub const FULL_STAGE: &[u8] = b"runc";

/// The file name of the second stage, next to nixenv-runc.
pub const HOOK_NAME: &[u8] = b"nixenv-hook";

/// The file name prefix of a container's exec record in runc's root (nixenv-hook's
/// `exec_env::RECORD_PREFIX`): `@` is never in a runc container id.
pub const EXEC_RECORD_PREFIX: &[u8] = b"nixenv@";

/// runc's state root when `--root` is not given (as root).
pub const DEFAULT_ROOT: &[u8] = b"/run/runc";

/// Path buffers: `PATH_MAX` and a little more.
pub const PATH_BUF: usize = 4096 + 64;

/// Whether argv (without argv\[0\]) may be a `create`, `run` or `delete`, or an `exec` into a
/// container with an exec record (looked up through `fs`), which `nixenv-hook runc` handles.
pub fn needs_full_stage<'a, S, I>(fs: &S, args: I) -> bool
where
    S: Stat,
    I: IntoIterator<Item = &'a [u8]>,
    I::IntoIter: Clone,
{
    let mut args = args.into_iter();
    if args.clone().any(|a| FULL_STAGE_WORDS.contains(&a)) {
        return true;
    }
    let mut root = DEFAULT_ROOT;
    loop {
        match args.next() {
            None => return false,
            Some(b"exec") => break,
            Some(b"--root" | b"-root") => root = args.next().unwrap_or(root),
            Some(a) => {
                if let Some(v) = a
                    .strip_prefix(b"--root=")
                    .or_else(|| a.strip_prefix(b"-root="))
                {
                    root = v;
                }
            }
        }
    }
    let mut buf = [0u8; PATH_BUF];
    args.filter(|a| !a.is_empty() && !a.starts_with(b"-") && !a.contains(&b'/'))
        .any(|id| {
            exec_record(&mut buf, root, id)
                .and_then(|n| fs.stat(&buf[..=n]))
                .is_some_and(|f| f.is_regular_file())
        })
}

/// Writes `<root>/nixenv@<id>` and a NUL into `buf`; returns the length without the NUL.
pub fn exec_record(buf: &mut [u8], root: &[u8], id: &[u8]) -> Option<usize> {
    let mut name = [0u8; 256];
    let len = EXEC_RECORD_PREFIX.len() + id.len();
    if len > name.len() {
        return None; // longer than a file name can be
    }
    name[..EXEC_RECORD_PREFIX.len()].copy_from_slice(EXEC_RECORD_PREFIX);
    name[EXEC_RECORD_PREFIX.len()..len].copy_from_slice(id);
    join(buf, root, &name[..len])
}

/// The value of `name` among `NAME=value` environment entries (the first one, as libc's
/// `getenv`).
pub fn env_value<'a>(env: impl IntoIterator<Item = &'a [u8]>, name: &[u8]) -> Option<&'a [u8]> {
    env.into_iter().find_map(|entry| {
        let rest = entry.strip_prefix(name)?;
        rest.strip_prefix(b"=")
    })
}

/// Writes `dir/file` and a NUL into `buf`; returns the length without the NUL, or `None` if
/// it does not fit or `dir` or `file` contains a NUL.
pub fn join(buf: &mut [u8], dir: &[u8], file: &[u8]) -> Option<usize> {
    if dir.contains(&0) || file.contains(&0) {
        return None;
    }
    let slash = usize::from(!dir.ends_with(b"/"));
    let len = dir.len() + slash + file.len();
    if len + 1 > buf.len() {
        return None;
    }
    buf[..dir.len()].copy_from_slice(dir);
    if slash == 1 {
        buf[dir.len()] = b'/';
    }
    buf[dir.len() + slash..len].copy_from_slice(file);
    buf[len] = 0;
    Some(len)
}

/// Writes the path of `name` in the directory of `exe` and a NUL into `buf`; returns the
/// length without the NUL.
pub fn sibling(buf: &mut [u8], exe: &[u8], name: &[u8]) -> Option<usize> {
    let dir = match exe.iter().rposition(|&b| b == b'/') {
        Some(0) => &exe[..1],
        Some(i) => &exe[..i],
        None => b".",
    };
    join(buf, dir, name)
}

/// What `stat(2)` says about a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Type and permission bits.
    pub mode: u32,
}

impl FileId {
    /// A regular file.
    pub fn is_regular_file(&self) -> bool {
        const S_IFMT: u32 = 0o170000;
        const S_IFREG: u32 = 0o100000;
        self.mode & S_IFMT == S_IFREG
    }

    /// A regular file that someone may execute.
    pub fn is_executable_file(&self) -> bool {
        self.is_regular_file() && self.mode & 0o111 != 0
    }

    /// The same file as `other`.
    pub fn same_file(&self, other: &FileId) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

/// The one system call the search needs, as a trait so it is testable without a file system.
pub trait Stat {
    /// `stat(2)` (following symlinks) of the NUL-terminated path in `path`; `None` on error.
    fn stat(&self, path: &[u8]) -> Option<FileId>;
}

/// Finds the real runc and writes its NUL-terminated path into `buf`; returns the length
/// without the NUL. `nixenv_runc` is `$NIXENV_RUNC` (taken as it is when not empty), `path`
/// is `$PATH` ([`DEFAULT_PATH`] if unset), `me` the running executable, which is skipped.
pub fn find_runc<S: Stat>(
    fs: &S,
    nixenv_runc: Option<&[u8]>,
    path: Option<&[u8]>,
    me: Option<FileId>,
    buf: &mut [u8],
) -> Option<usize> {
    if let Some(p) = nixenv_runc.filter(|p| !p.is_empty()) {
        if p.contains(&0) || p.len() + 1 > buf.len() {
            return None;
        }
        buf[..p.len()].copy_from_slice(p);
        buf[p.len()] = 0;
        return Some(p.len());
    }
    for dir in path.unwrap_or(DEFAULT_PATH).split(|&b| b == b':') {
        if dir.is_empty() {
            continue;
        }
        let Some(len) = join(buf, dir, b"runc") else {
            continue;
        };
        let Some(id) = fs.stat(&buf[..=len]) else {
            continue;
        };
        if !id.is_executable_file() || me.is_some_and(|me| me.same_file(&id)) {
            continue;
        }
        return Some(len);
    }
    None
}

/// A short description of an `errno` value from `execve(2)`.
pub fn errno_text(errno: isize) -> &'static str {
    match errno {
        1 => "operation not permitted",
        2 => "no such file or directory",
        7 => "argument list too long",
        8 => "exec format error",
        12 => "cannot allocate memory",
        13 => "permission denied",
        20 => "not a directory",
        26 => "text file busy",
        36 => "file name too long",
        40 => "too many levels of symbolic links",
        _ => "error",
    }
}

/// Writes `nixenv-runc: cannot execute PATH: CAUSE (errno N)` and a newline into `buf`,
/// truncating a long path; returns the length.
pub fn exec_error_line(buf: &mut [u8], path: &[u8], errno: isize) -> usize {
    let mut w = Writer { buf, len: 0 };
    w.put(b"nixenv-runc: cannot execute ");
    w.put(path);
    w.put(b": ");
    w.put(errno_text(errno).as_bytes());
    w.put(b" (errno ");
    let mut digits = [0u8; 20];
    let mut n = errno.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    w.put(&digits[i..]);
    w.put(b")\n");
    w.len
}

/// Appends to a fixed buffer, dropping what does not fit but always keeping room for the
/// last byte written (the newline).
struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len + 1 < self.buf.len() || (b == b'\n' && self.len < self.buf.len()) {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn words(line: &str) -> Vec<&[u8]> {
        line.split_whitespace().map(str::as_bytes).collect()
    }

    #[test]
    fn create_run_and_delete_go_to_the_full_stage() {
        let fs = FakeFs(HashMap::new());
        for line in [
            "--root /run/runc create --bundle /b c1",
            "--log /l --log-format json run -d c1",
            "delete --force c1",
            "--systemd-cgroup delete c1",
            // A container called `run`: exact parsing is nixenv-hook's job.
            "state run",
        ] {
            assert!(needs_full_stage(&fs, words(line)), "{line}");
        }
        for line in [
            "--root /run/runc state c1",
            "kill c1 KILL",
            "kill --all c1 9",
            "exec --process /p.json c1",
            "--version",
            "",
            "state created",
            "ps --format json deleted",
        ] {
            assert!(!needs_full_stage(&fs, words(line)), "{line}");
        }
    }

    #[test]
    fn an_exec_goes_to_the_full_stage_only_for_a_recorded_container() {
        let fs = FakeFs(HashMap::from([
            ("/run/runc/nixenv@c1", file(1, 0o100600)),
            ("/r/k8s.io/nixenv@c2", file(2, 0o100600)),
            ("/run/runc/nixenv@dir", file(3, 0o040700)),
        ]));
        for line in [
            "exec --process /p.json c1",
            "--root /run/runc exec --pid-file /p --process /x --detach c1",
            "--root=/r/k8s.io --log /l --log-format json exec -p /x c2",
            "-root /r/k8s.io exec --detach --process=/x c2",
            "--systemd-cgroup exec -t c1 sh -c ls",
        ] {
            assert!(needs_full_stage(&fs, words(line)), "{line}");
        }
        for line in [
            "exec --process /p.json c3",
            // The record is per root.
            "--root /r/k8s.io exec --process /p.json c1",
            "exec --process /p.json c2",
            // Only a regular file is a record; flags and paths are never ids.
            "exec -p /x dir",
            "exec -p /run/runc/nixenv@c1 -c1 c3",
            // c1 is not an exec's word here.
            "state c1",
        ] {
            assert!(!needs_full_stage(&fs, words(line)), "{line}");
        }
        let mut buf = [0u8; 64];
        let n = exec_record(&mut buf, b"/run/runc", b"c1").unwrap();
        assert_eq!(&buf[..=n], b"/run/runc/nixenv@c1\0");
        assert_eq!(exec_record(&mut buf, b"/run/runc", &[b'x'; 300]), None);
    }

    #[test]
    fn environment_lookup_is_exact() {
        let env = words("PATHX=/no NIXENV_RUNC= PATH=/a:/b PATH=/second");
        assert_eq!(env_value(env.clone(), b"PATH"), Some(&b"/a:/b"[..]));
        assert_eq!(env_value(env.clone(), b"NIXENV_RUNC"), Some(&b""[..]));
        assert_eq!(env_value(env, b"HOME"), None);
    }

    #[test]
    fn paths_are_joined_with_a_nul() {
        let mut buf = [0u8; 16];
        assert_eq!(join(&mut buf, b"/usr/bin", b"runc"), Some(13));
        assert_eq!(&buf[..14], b"/usr/bin/runc\0");
        assert_eq!(join(&mut buf, b"/usr/bin/", b"runc"), Some(13));
        assert_eq!(join(&mut buf, b"/usr/local/bin", b"runc"), None);
        assert_eq!(join(&mut buf, b"/a\0b", b"runc"), None);
        let mut buf = [0u8; 64];
        let n = sibling(&mut buf, b"/usr/bin/nixenv-runc", HOOK_NAME).unwrap();
        assert_eq!(&buf[..n], b"/usr/bin/nixenv-hook");
        let n = sibling(&mut buf, b"/nixenv-runc", HOOK_NAME).unwrap();
        assert_eq!(&buf[..n], b"/nixenv-hook");
    }

    struct FakeFs(HashMap<&'static str, FileId>);

    impl Stat for FakeFs {
        fn stat(&self, path: &[u8]) -> Option<FileId> {
            let path = std::str::from_utf8(path.strip_suffix(b"\0")?).ok()?;
            self.0.get(path).copied()
        }
    }

    fn file(ino: u64, mode: u32) -> FileId {
        FileId { dev: 1, ino, mode }
    }

    fn found(fs: &FakeFs, env: Option<&str>, path: Option<&str>, me: Option<FileId>) -> String {
        let mut buf = [0u8; 256];
        match find_runc(
            fs,
            env.map(str::as_bytes),
            path.map(str::as_bytes),
            me,
            &mut buf,
        ) {
            Some(n) => {
                assert_eq!(buf[n], 0);
                String::from_utf8(buf[..n].to_vec()).unwrap()
            }
            None => "none".into(),
        }
    }

    #[test]
    fn runc_is_found_on_path_skipping_this_binary() {
        let me = file(1, 0o100755);
        let fs = FakeFs(HashMap::from([
            ("/a/runc", me),                       // nixenv-runc installed as runc
            ("/b/runc", file(2, 0o100644)),        // not executable
            ("/c/runc", file(3, 0o040755)),        // a directory
            ("/d/runc", file(4, 0o100755)),        // the real one
            ("/usr/sbin/runc", file(5, 0o100755)), // on the default PATH
        ]));
        assert_eq!(found(&fs, None, Some("/a:/b:/c:/d"), Some(me)), "/d/runc");
        assert_eq!(found(&fs, None, Some("::/a:/d/"), Some(me)), "/d/runc");
        assert_eq!(found(&fs, None, Some("/a:/d"), None), "/a/runc");
        assert_eq!(found(&fs, None, Some("/a:/b:/c"), Some(me)), "none");
        assert_eq!(found(&fs, None, None, Some(me)), "/usr/sbin/runc");
        assert_eq!(found(&fs, Some(""), None, Some(me)), "/usr/sbin/runc");
        // $NIXENV_RUNC is taken as it is: exec reports what is wrong with it.
        assert_eq!(
            found(&fs, Some("/opt/runc"), Some("/d"), Some(me)),
            "/opt/runc"
        );
    }

    #[test]
    fn exec_errors_are_one_line() {
        let mut buf = [0u8; 128];
        let n = exec_error_line(&mut buf, b"/usr/bin/nixenv-hook", 2);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "nixenv-runc: cannot execute /usr/bin/nixenv-hook: no such file or directory (errno 2)\n"
        );
        let mut small = [0u8; 40];
        let n = exec_error_line(&mut small, &[b'x'; 100], 13);
        assert_eq!(n, 40);
        assert!(small.ends_with(b"\n"));
        assert_eq!(small.iter().filter(|&&b| b == b'\n').count(), 1);
    }
}
