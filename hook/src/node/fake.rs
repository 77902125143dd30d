//! [`FakeNode`]: the one [`Node`] the tests of the wrapper, the hook and the shim's helper drive.
//! It records each call and answers as told; a preparation of a spec that is rewritten sets
//! the spec's hostname to `rewritten`, so callers can tell which spec they got back.

use std::path::{Path, PathBuf};

use nixenv_core::runtime::{Decision, Owner, Prepared};
use oci_spec::runtime::Spec;

use super::Node;

/// A [`Node`] that records its calls and answers as its fields say.
#[derive(Debug, Default)]
pub(crate) struct FakeNode {
    /// Each call, in order: `prepare KEY` (a spec), `prepare ID BUNDLE RUNTIME_ROOT` (a bundle),
    /// `pinned? ID`, `release ID`.
    pub calls: Vec<String>,
    /// The owner of each preparation, in order.
    pub owners: Vec<Owner>,
    /// What a preparation prepared; `None`: it passes through.
    pub prepared: Option<Prepared>,
    /// The error of every preparation and release.
    pub fail: Option<String>,
    /// Whether every container may hold a pin.
    pub pinned: bool,
    /// The configured runc.
    pub runc: Option<PathBuf>,
}

impl FakeNode {
    fn decide(&mut self, call: String, owner: &Owner) -> Result<Decision, String> {
        self.calls.push(call);
        self.owners.push(owner.clone());
        if let Some(e) = &self.fail {
            return Err(e.clone());
        }
        Ok(self
            .prepared
            .clone()
            .map_or(Decision::PassThrough, Decision::Rewritten))
    }
}

impl Node for FakeNode {
    type Error = String;

    fn prepare_spec(
        &mut self,
        key: &str,
        spec: &mut Spec,
        owner: &Owner,
    ) -> Result<Decision, String> {
        let decision = self.decide(format!("prepare {key}"), owner)?;
        if let Decision::Rewritten(_) = decision {
            spec.set_hostname(Some("rewritten".into()));
        }
        Ok(decision)
    }

    fn prepare_bundle(
        &mut self,
        id: &str,
        bundle: &Path,
        owner: &Owner,
    ) -> Result<Decision, String> {
        let call = format!("prepare {id} {} {:?}", bundle.display(), owner.runtime_root);
        self.decide(call, owner)
    }

    fn release(&mut self, id: &str) -> Result<(), String> {
        self.calls.push(format!("release {id}"));
        self.fail.clone().map_or(Ok(()), Err)
    }

    fn may_be_pinned(&mut self, id: &str) -> bool {
        self.calls.push(format!("pinned? {id}"));
        self.pinned
    }

    fn runc(&mut self) -> Result<Option<PathBuf>, String> {
        Ok(self.runc.clone())
    }

    fn store_dir(&self) -> PathBuf {
        "/var/lib/nixenv/store".into()
    }
}
