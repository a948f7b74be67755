//! The cleanup policy: after the stages end, however they end, the ledger is undone (or, with
//! `--on-error abort`, left and listed), then the build's tag is swept for anything it made but
//! could not record; what is left is reported once, with the gc command that removes it.

use crate::aws::{self, Aws};
use crate::progress::Progress;

use super::gc;
use super::interrupt::Interrupt;
use super::ledger::{Ledger, Resource};

/// What a build's cleanup did not remove, for its last line.
#[derive(Debug, Default, Clone)]
pub struct Leftovers {
    /// Left on purpose (`--on-error abort`).
    pub kept: Vec<String>,
    /// Could not be removed (each once).
    pub failed: Vec<String>,
    /// Why the sweep by tag could not look for what the build made but could not record.
    pub unchecked: Option<String>,
}

impl Leftovers {
    /// Nothing left and everything checked.
    pub fn is_clean(&self) -> bool {
        self.kept.is_empty() && self.failed.is_empty() && self.unchecked.is_none()
    }

    /// `None` when everything was removed and checked; else what is left and what to do.
    /// `gc_hint` is like "`jbake gc --region R --build-id B` removes them".
    pub fn sentence(&self, gc_hint: &str) -> Option<String> {
        if !self.kept.is_empty() {
            Some(format!(
                "left for debugging (--on-error abort): {}; {gc_hint}",
                self.kept.join(", ")
            ))
        } else if !self.failed.is_empty() {
            Some(format!(
                "its cleanup failed, these are left: {}; {gc_hint}",
                self.failed.join("; ")
            ))
        } else {
            self.unchecked.as_ref().map(|why| {
                format!(
                    "what it recorded was removed, but it could not check for leftovers ({why}); \
                     {}",
                    gc_hint.replace(" removes them", " finds and removes any")
                )
            })
        }
    }
}

/// `--on-error abort`: nothing is removed; what is left is listed.
pub fn abandon(ledger: &Ledger, region: &str, progress: &Progress) -> Leftovers {
    let left = ledger.remaining();
    let mut text = String::from("--on-error abort: these were left for debugging:");
    for r in &left {
        text.push_str(&format!("\n  {r}"));
    }
    text.push_str(&format!(
        "\nremove them with: jbake gc --region {region}{} --build-id {}",
        regions_flag(&ledger.regions()),
        ledger.build_id()
    ));
    progress.warn(&text);
    Leftovers {
        kept: left.iter().map(|r| r.to_string()).collect(),
        ..Leftovers::default()
    }
}

/// ` --regions A,B` for gc, when a build made something in other regions.
pub fn regions_flag(regions: &[String]) -> String {
    if regions.is_empty() {
        String::new()
    } else {
        format!(" --regions {}", regions.join(","))
    }
}

/// Undoes what the build recorded, then sweeps by tag for anything it made but could not record
/// (in its own region, and in the regions of its copies).
/// An interruption during the cleanup (beyond the `seen` ones) only says what is still being
/// removed: the cleanup goes on. Returns what is left.
pub async fn run(
    aws: &Aws,
    ledger: &Ledger,
    progress: &Progress,
    mut interrupt: Interrupt,
    seen: u32,
) -> Leftovers {
    let build_id = ledger.build_id().to_string();
    let work = async {
        let mut failed = ledger.undo(aws, progress).await;
        let sel = gc::Selector {
            older_than: None,
            build_id: Some(build_id.clone()),
        };
        let mut unchecked = None;
        let mut regional = Vec::new();
        for r in ledger.regions() {
            regional.push(aws.in_region(&r).await);
        }
        for there in std::iter::once(aws).chain(regional.iter()) {
            match gc::find(there, &sel, gc::Busy::Remove).await {
                Ok(found) => {
                    for s in &found.skipped {
                        progress.warn(&format!("left {}: {}", s.what, s.why));
                    }
                    failed.extend(gc::remove(there, &found, progress).await);
                }
                Err(e) => {
                    progress.warn(&format!(
                        "could not check for leftovers of build {build_id} in {}: {e}",
                        there.region
                    ));
                    unchecked = Some(e.to_string());
                }
            }
        }
        (failed, unchecked)
    };
    let nag = async {
        let mut seen = seen;
        loop {
            let what = interrupt.after(seen).await;
            seen = interrupt.count();
            let left: Vec<String> = ledger.remaining().iter().map(|r| r.to_string()).collect();
            progress.warn(&format!(
                "{what} again: still removing {}; jbake exits when it is done (kill -9 leaves them to `jbake gc`)",
                if left.is_empty() { "the last resources".to_string() } else { left.join(", ") }
            ));
        }
    };
    let (failed, unchecked): (Vec<(Resource, aws::Error)>, Option<String>) = tokio::select! {
        f = work => f,
        _ = nag => (Vec::new(), None),
    };
    // A resource the ledger failed on is found again by the sweep: name it once, with the last
    // error.
    let mut left: Vec<(String, String)> = Vec::new();
    for (r, e) in &failed {
        let name = r.to_string();
        match left.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = e.to_string(),
            None => left.push((name, e.to_string())),
        }
    }
    if !left.is_empty() {
        let list: Vec<String> = left.iter().map(|(r, e)| format!("{r} ({e})")).collect();
        progress.warn(&format!(
            "cleanup could not remove: {}; they are tagged jbake:build-id={build_id}: `jbake gc --region {}{} --build-id {build_id}` removes them",
            list.join("; "),
            aws.region,
            regions_flag(&ledger.regions())
        ));
    }
    Leftovers {
        kept: Vec::new(),
        failed: left.into_iter().map(|(r, _)| r).collect(),
        unchecked,
    }
}
