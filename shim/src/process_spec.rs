//! The exec process spec containerd sends (a runtime-spec `Process`, as JSON), decoded part by
//! part into `oci_spec::runtime::Process`.
//!
//! `Process`'s own deserializer validates `execCPUAffinity` with a regular expression, which
//! links a regex engine (about half a megabyte of code and tables) into the shim, resident in
//! every pod's shim, for a field CRI does not set. Each part is decoded with its own type
//! instead, which accepts exactly what that deserializer accepts except that the affinity
//! lists go to runc unchecked (runc checks them).

use oci_spec::runtime::{ExecCPUAffinity, Process};
use serde::de::{DeserializeOwned, Error as _};
use serde_json::Value;

/// `spec[key]`, absent and `null` alike giving `None`.
fn part<T: DeserializeOwned>(spec: &Value, key: &str) -> Result<Option<T>, serde_json::Error> {
    match spec.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => T::deserialize(v).map(Some),
    }
}

fn required<T: DeserializeOwned>(spec: &Value, key: &'static str) -> Result<T, serde_json::Error> {
    part(spec, key)?.ok_or_else(|| serde_json::Error::missing_field(key))
}

fn affinity(spec: &Value) -> Result<Option<ExecCPUAffinity>, serde_json::Error> {
    let Some(v) = spec.get("execCPUAffinity").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    if !v.is_object() {
        return Err(serde_json::Error::custom(
            "execCPUAffinity: expected an object",
        ));
    }
    let mut a = ExecCPUAffinity::default();
    a.set_initial(part(v, "initial")?);
    a.set_cpu_affinity_final(part(v, "final")?);
    Ok(Some(a))
}

/// Decodes an exec process spec.
pub fn decode(spec: &Value) -> Result<Process, serde_json::Error> {
    if !spec.is_object() {
        return Err(serde_json::Error::custom("expected a process object"));
    }
    let mut p = Process::default();
    p.set_terminal(part(spec, "terminal")?);
    p.set_console_size(part(spec, "consoleSize")?);
    p.set_user(required(spec, "user")?);
    p.set_args(part(spec, "args")?);
    p.set_command_line(part(spec, "commandLine")?);
    p.set_env(part(spec, "env")?);
    p.set_cwd(required(spec, "cwd")?);
    p.set_capabilities(part(spec, "capabilities")?);
    p.set_rlimits(part(spec, "rlimits")?);
    p.set_no_new_privileges(part(spec, "noNewPrivileges")?);
    p.set_apparmor_profile(part(spec, "apparmorProfile")?);
    p.set_oom_score_adj(part(spec, "oomScoreAdj")?);
    p.set_selinux_label(part(spec, "selinuxLabel")?);
    p.set_io_priority(part(spec, "ioPriority")?);
    p.set_scheduler(part(spec, "scheduler")?);
    p.set_exec_cpu_affinity(affinity(spec)?);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exec spec as containerd's CRI sends it, with every optional part set.
    fn full() -> Value {
        serde_json::json!({
            "terminal": true,
            "consoleSize": {"height": 24, "width": 80},
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 18},
            "args": ["sh", "-c", "echo hi"],
            "env": ["PATH=/nix/store/x-echoserver/bin:/bin", "TERM=xterm"],
            "cwd": "/work",
            // One each: oci-spec keeps capability sets unordered.
            "capabilities": {
                "bounding": ["CAP_KILL"],
                "effective": ["CAP_CHOWN"],
                "permitted": ["CAP_KILL"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 1024}],
            "noNewPrivileges": true,
            "apparmorProfile": "cri-containerd.apparmor.d",
            "oomScoreAdj": 500,
            "selinuxLabel": "system_u:system_r:container_t:s0",
            "ioPriority": {"class": "IOPRIO_CLASS_BE", "priority": 4},
            "scheduler": {"policy": "SCHED_OTHER", "nice": 5},
            "execCPUAffinity": {"initial": "0-1", "final": "1"}
        })
    }

    #[test]
    fn decodes_what_oci_specs_deserializer_decodes() {
        for spec in [
            full(),
            serde_json::json!({"user": {"uid": 0, "gid": 0}, "args": ["ls"], "cwd": "/"}),
        ] {
            let ours = decode(&spec).unwrap();
            let theirs: Process = serde_json::from_value(spec.clone()).unwrap();
            assert_eq!(ours, theirs, "{spec}");
            // And runc gets back what containerd sent.
            assert_eq!(serde_json::to_value(&ours).unwrap(), spec);
        }
    }

    #[test]
    fn missing_and_mistyped_parts_are_errors() {
        let e = decode(&serde_json::json!({"args": ["ls"], "cwd": "/"})).unwrap_err();
        assert_eq!(e.to_string(), "missing field `user`");
        let e =
            decode(&serde_json::json!({"user": {"uid": 0, "gid": 0}, "args": "ls", "cwd": "/"}))
                .unwrap_err();
        assert!(e.to_string().contains("expected a sequence"), "{e}");
        assert!(decode(&serde_json::json!(["ls"])).is_err());
        let e = decode(&serde_json::json!({
            "user": {"uid": 0, "gid": 0}, "cwd": "/", "execCPUAffinity": "0-1"
        }))
        .unwrap_err();
        assert!(e.to_string().contains("execCPUAffinity"), "{e}");
    }
}
