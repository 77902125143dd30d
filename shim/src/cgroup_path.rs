//! Where a spec's `linux.cgroupsPath` puts the container, as a path below each cgroup
//! hierarchy's root.
//!
//! With the cgroupfs driver the path is a path. With the systemd driver (runc's
//! `--systemd-cgroup`, containerd's `SystemdCgroup = true`, the kubelet's `cgroupDriver:
//! systemd`) it is `slice:prefix:name`, and runc asks systemd for a transient unit whose
//! cgroup is the slice's expanded path followed by the unit: `prefix-name.scope`, or `name`
//! itself when it is a slice. A slice name's dashes make its parents (`a-b.slice` lives in
//! `a.slice`). An empty slice is `system.slice`; an empty `cgroupsPath` is
//! `system.slice:runc:<id>`. These are runc's rules (opencontainers/cgroups `systemd`
//! package), written down here so the shim reads the directories runc made.

use std::path::PathBuf;

const SLICE: &str = ".slice";

/// Why a `cgroupsPath` names no cgroup.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CgroupPathError {
    #[error("cgroupsPath {path:?} is not slice:prefix:name, as the systemd cgroup driver needs")]
    NotSystemd { path: String },
    #[error("invalid systemd slice name {slice:?}")]
    Slice { slice: String },
}

/// The cgroupfs path of systemd slice `slice`: `kubepods-burstable.slice` is
/// `/kubepods.slice/kubepods-burstable.slice`; `-.slice` is the root `/`.
pub fn expand_slice(slice: &str) -> Result<String, CgroupPathError> {
    let invalid = || CgroupPathError::Slice {
        slice: slice.to_owned(),
    };
    let name = slice.strip_suffix(SLICE).ok_or_else(invalid)?;
    if slice.contains('/') {
        return Err(invalid());
    }
    if name == "-" {
        return Ok("/".to_owned());
    }
    let mut path = String::new();
    let mut end = 0;
    for part in name.split('-') {
        // Empty parts (`a--b.slice`, `-a.slice`, `.slice`) are not slice names.
        if part.is_empty() {
            return Err(invalid());
        }
        end += part.len();
        path.push('/');
        path.push_str(&name[..end]);
        path.push_str(SLICE);
        end += 1;
    }
    Ok(path)
}

/// The systemd unit of `prefix` and `name`: a scope, unless `name` is a slice itself.
fn unit_name(prefix: &str, name: &str) -> String {
    if name.ends_with(SLICE) {
        name.to_owned()
    } else {
        format!("{prefix}-{name}.scope")
    }
}

/// The cgroup of container `id` whose spec says `cgroups_path`, relative to a hierarchy's
/// root; `systemd` is whether runc runs with `--systemd-cgroup`. `None` when runc places the
/// cgroup relative to its own (a relative or empty cgroupfs path): that place is runc's
/// cgroup, not known from the spec.
pub fn relative(
    cgroups_path: &str,
    id: &str,
    systemd: bool,
) -> Result<Option<PathBuf>, CgroupPathError> {
    if !systemd {
        let Some(abs) = cgroups_path.strip_prefix('/') else {
            return Ok(None);
        };
        // Lexically cleaned, as runc cleans it (`..` stops at the root).
        let mut clean = PathBuf::new();
        for part in abs.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    clean.pop();
                }
                part => clean.push(part),
            }
        }
        return Ok(Some(clean));
    }
    let (slice, prefix, name) = if cgroups_path.is_empty() {
        ("", "runc", id)
    } else {
        match cgroups_path.split(':').collect::<Vec<_>>()[..] {
            [slice, prefix, name] => (slice, prefix, name),
            _ => {
                return Err(CgroupPathError::NotSystemd {
                    path: cgroups_path.to_owned(),
                })
            }
        }
    };
    let slice = if slice.is_empty() {
        "/system.slice".to_owned()
    } else {
        expand_slice(slice)?
    };
    let unit = unit_name(prefix, name);
    Ok(Some(
        PathBuf::from(slice.trim_start_matches('/')).join(unit),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubelet_pod_slice_expands_to_its_parents() {
        assert_eq!(
            expand_slice("kubepods-burstable-pod123.slice").unwrap(),
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod123.slice"
        );
        assert_eq!(expand_slice("system.slice").unwrap(), "/system.slice");
        assert_eq!(expand_slice("-.slice").unwrap(), "/");
    }

    #[test]
    fn malformed_slices_are_refused() {
        for bad in [
            "a--b.slice",
            "-a.slice",
            "a-.slice",
            ".slice",
            "a.scope",
            "a/b.slice",
        ] {
            assert_eq!(
                expand_slice(bad),
                Err(CgroupPathError::Slice {
                    slice: bad.to_owned()
                }),
                "{bad}"
            );
        }
    }

    /// `relative(path, id, systemd)` for each case, against the expected relative path.
    fn check(cases: &[(&str, &str, bool, Option<&str>)]) {
        for &(path, id, systemd, want) in cases {
            assert_eq!(
                relative(path, id, systemd).unwrap(),
                want.map(PathBuf::from),
                "{path:?} (systemd: {systemd})"
            );
        }
    }

    #[test]
    fn a_systemd_cgroups_path_is_the_slice_then_the_scope() {
        check(&[
            (
                "kubepods-burstable-pod123.slice:cri-containerd:abc",
                "abc",
                true,
                Some("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod123.slice/cri-containerd-abc.scope"),
            ),
            // A name that is a slice is the unit itself; an empty slice is system.slice, an
            // empty path system.slice:runc:<id>.
            ("a-b.slice:x:c.slice", "id", true, Some("a.slice/a-b.slice/c.slice")),
            (":docker:1234", "id", true, Some("system.slice/docker-1234.scope")),
            ("", "c1", true, Some("system.slice/runc-c1.scope")),
        ]);
    }

    #[test]
    fn a_systemd_driver_refuses_a_plain_path() {
        assert_eq!(
            relative("/kubepods/pod1/abc", "abc", true),
            Err(CgroupPathError::NotSystemd {
                path: "/kubepods/pod1/abc".into()
            })
        );
        assert!(matches!(
            relative("a.scope:p:n", "n", true),
            Err(CgroupPathError::Slice { .. })
        ));
    }

    #[test]
    fn a_cgroupfs_path_is_a_path_from_the_root() {
        check(&[
            (
                "/kubepods/burstable/pod1/../pod2/./abc/",
                "abc",
                false,
                Some("kubepods/burstable/pod2/abc"),
            ),
            // With the cgroupfs driver a colon is just a character.
            ("/a:b:c", "c", false, Some("a:b:c")),
            // Relative to runc's own cgroup: not known from the spec.
            ("k8s.io/abc", "abc", false, None),
            ("", "abc", false, None),
        ]);
    }
}
