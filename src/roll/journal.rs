//! What a roll has changed so far, recorded the moment each change is made (for a change whose
//! answer may be lost, just before the request): [`super::steps::put_back`] undoes exactly
//! this, from any phase, also from the Ctrl-C handler.

use std::sync::Mutex;

use crate::aws::asg::Sizes;

#[derive(Debug, Clone, Default)]
pub struct JournalState {
    /// The launch template version this roll created.
    pub new_version: Option<i64>,
    /// The template's default version before jbake changed it.
    pub default_was: Option<i64>,
    /// The version to point the group back at: as the group named it, except `$Latest`, which
    /// now means the new version: then the number it meant.
    pub group_was: Option<String>,
    /// The group named `$Latest` before the roll.
    pub group_named_latest: bool,
    /// The processes this roll suspended (not those suspended before it).
    pub suspended: Vec<String>,
    /// This roll protected the old instance from scale-in.
    pub protected_old: bool,
    /// The group's sizes before this roll raised them.
    pub sizes_was: Option<Sizes>,
    /// The handover's successor, once the group shows it.
    pub successor: Option<String>,
    /// Quiet-down was (maybe) sent and not cancelled.
    pub quiet_down: bool,
    /// The old Jenkins was (maybe) told to stop (`/safeExit`).
    pub old_stopping: bool,
    /// The new controller was verified serving.
    pub verified: bool,
    /// The old instance was terminated (handover: lowering the capacity; replace: keeping it).
    pub old_terminated: bool,
    /// A rollback started.
    pub rolling_back: bool,
}

#[derive(Default)]
pub struct Journal(Mutex<JournalState>);

impl Journal {
    pub fn get(&self) -> JournalState {
        self.0.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn update(&self, f: impl FnOnce(&mut JournalState)) {
        if let Ok(mut g) = self.0.lock() {
            f(&mut g)
        }
    }
}
