//! The vocabulary of node checks: a [`Finding`] and its [`Status`], shared by `nixenv doctor`
//! ([`crate::doctor`]) and the modules that check their own state ([`crate::gc::doctor`]).
//! A leaf: it imports nothing of the crate.

use serde::Serialize;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Not applicable on this node (e.g. CRI-O not installed).
    Skip,
    Warn,
    Fail,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Skip => "skip",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One finding, with the fix when it is not `ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub status: Status,
    pub check: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    pub(crate) fn new(
        status: Status,
        check: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Finding {
            status,
            check: check.into(),
            message: message.into(),
            fix: None,
        }
    }
    pub(crate) fn ok(check: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(Status::Ok, check, message)
    }
    pub(crate) fn skip(check: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(Status::Skip, check, message)
    }
    pub(crate) fn warn(
        check: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::new(Status::Warn, check, message).with_fix(fix)
    }
    pub(crate) fn fail(
        check: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::new(Status::Fail, check, message).with_fix(fix)
    }
    pub(crate) fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}
