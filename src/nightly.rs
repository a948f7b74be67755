//! `jbake nightly`: the unattended night — bake the controller and the agent images at once
//! (each skipped when unchanged, or baked again when older than `--max-age`), then, with
//! `--roll`, roll the controller to its image when the group does not run it yet.
//!
//! What is decided here is pure ([`roll_decision`], [`Summary`]); the lock is a file lock
//! ([`NightlyLock`]). The command itself (flags, the bakes, the roll) is `cli::nightly`.
//!
//! The lock: `flock` on a file (default beside the manifest). A second run finds it taken and
//! exits at once ([`EXIT_LOCKED`]) saying whose it is; the kernel releases it when its holder
//! ends, however it ends, so a crash never leaves a lock to clean up. The file keeps the
//! holder's pid, host and start, and when it finished: a run that finds a start without an end
//! says the previous run did not finish (killed or crashed) — its temporary resources are
//! `jbake gc`'s, its image (if any) is whatever EC2 has.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Exit status of a run that found another run holding the lock (EX_TEMPFAIL: try later).
pub const EXIT_LOCKED: u8 = 75;

/// Who holds (or last held) the lock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    pub started: String,
    /// When it ended (absent while it runs, and after a crash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on {}, started {}",
            self.pid, self.host, self.started
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another jbake nightly is running ({}; lock {}): this run does nothing and exits", holder.as_ref().map(|h| h.to_string()).unwrap_or_else(|| "its pid is not recorded".into()), path.display())]
    Held {
        path: PathBuf,
        holder: Option<Holder>,
    },
    #[error("the lock file {} is a symbolic link: refusing to follow it (remove it, or pass --lock-file)", path.display())]
    Symlink { path: PathBuf },
    #[error("cannot use the lock file {}: {source} (pass --lock-file PATH in a folder this user can write)", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The nightly's lock, held until dropped (or [`NightlyLock::finish`]).
pub struct NightlyLock {
    file: File,
    path: PathBuf,
    holder: Holder,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "this host".to_string())
}

impl NightlyLock {
    /// Takes the lock without waiting. Ok: the lock, and the previous run if it did not finish.
    pub fn acquire(path: &Path) -> Result<(NightlyLock, Option<Holder>), LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(LockError::Symlink {
                path: path.to_path_buf(),
            });
        }
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(io)?
        };
        let mut previous = String::new();
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let _ = file.read_to_string(&mut previous);
                return Err(LockError::Held {
                    path: path.to_path_buf(),
                    holder: serde_json::from_str(&previous).ok(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.read_to_string(&mut previous).map_err(io)?;
        let crashed = serde_json::from_str::<Holder>(&previous)
            .ok()
            .filter(|h| h.finished.is_none());
        let holder = Holder {
            pid: std::process::id(),
            host: hostname(),
            started: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            finished: None,
        };
        let mut lock = NightlyLock {
            file,
            path: path.to_path_buf(),
            holder,
        };
        lock.write().map_err(io)?;
        Ok((lock, crashed))
    }

    fn write(&mut self) -> std::io::Result<()> {
        let text = serde_json::to_string(&self.holder).map_err(std::io::Error::other)?;
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(text.as_bytes())?;
        self.file.write_all(b"\n")?;
        self.file.sync_data()
    }

    /// Records that this run ended (the next run will not report it as crashed) and releases.
    pub fn finish(mut self) -> Result<(), LockError> {
        self.holder.finished =
            Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
        let path = self.path.clone();
        self.write()
            .map_err(|source| LockError::Io { path, source })
    }
}

/// How one of the night's bakes ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum BakeEnd {
    /// A new image.
    Built {
        ami: String,
        name: String,
    },
    /// An image of the same inputs, young enough: nothing was launched.
    Unchanged {
        ami: String,
        name: String,
    },
    Failed {
        error: String,
    },
    Interrupted {
        why: String,
    },
}

impl BakeEnd {
    pub fn image(&self) -> Option<&str> {
        match self {
            BakeEnd::Built { ami, .. } | BakeEnd::Unchanged { ami, .. } => Some(ami),
            _ => None,
        }
    }

    fn short(&self) -> String {
        match self {
            BakeEnd::Built { ami, name } => format!("built {ami} ({name})"),
            BakeEnd::Unchanged { ami, .. } => format!("unchanged ({ami})"),
            BakeEnd::Failed { .. } => "FAILED".to_string(),
            BakeEnd::Interrupted { .. } => "interrupted".to_string(),
        }
    }
}

/// What the night does about the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollDecision {
    /// Roll (or find it up to date) to this image.
    Roll { ami: String },
    /// Not asked (`--roll` not given).
    NotAsked,
    /// A bake failed or was interrupted: nothing is rolled on a night that failed.
    Held { because: String },
}

/// `--roll`: the controller's image (new, or unchanged — the group may not run it yet, after
/// a night whose roll failed) is rolled out unless any bake of the night failed. The roll
/// itself finds out, cheaply, that the group already runs it.
pub fn roll_decision(controller: &BakeEnd, agent: &BakeEnd, roll: bool) -> RollDecision {
    if !roll {
        return RollDecision::NotAsked;
    }
    let failed: Vec<&str> = [("controller", controller), ("agent", agent)]
        .iter()
        .filter(|(_, e)| e.image().is_none())
        .map(|(n, _)| *n)
        .collect();
    if !failed.is_empty() {
        return RollDecision::Held {
            because: format!("the {} bake did not succeed", failed.join(" and the ")),
        };
    }
    match controller.image() {
        Some(ami) => RollDecision::Roll {
            ami: ami.to_string(),
        },
        None => RollDecision::Held {
            because: "no controller image".to_string(),
        },
    }
}

/// How the roll ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RollEnd {
    NotAsked,
    Held { because: String },
    UpToDate { group: String },
    Rolled { ami: String },
    Failed { error: String },
    Interrupted { why: String },
}

/// The night in one line (and one JSON object).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub region: String,
    pub controller: BakeEnd,
    pub agent: BakeEnd,
    pub roll: RollEnd,
    pub elapsed_ms: u128,
}

impl Summary {
    /// Nothing was made or changed: a quiet run prints nothing.
    pub fn is_noop(&self) -> bool {
        matches!(self.controller, BakeEnd::Unchanged { .. })
            && matches!(self.agent, BakeEnd::Unchanged { .. })
            && matches!(self.roll, RollEnd::NotAsked | RollEnd::UpToDate { .. })
    }

    pub fn failed(&self) -> bool {
        self.controller.image().is_none()
            || self.agent.image().is_none()
            || matches!(
                self.roll,
                RollEnd::Failed { .. } | RollEnd::Interrupted { .. }
            )
    }

    pub fn interrupted(&self) -> bool {
        [&self.controller, &self.agent]
            .iter()
            .any(|e| matches!(e, BakeEnd::Interrupted { .. }))
            || matches!(self.roll, RollEnd::Interrupted { .. })
    }

    pub fn line(&self) -> String {
        let roll = match &self.roll {
            RollEnd::NotAsked => String::new(),
            RollEnd::Held { because } => format!(", nothing rolled ({because})"),
            RollEnd::UpToDate { group } => format!(", {group} already runs it"),
            RollEnd::Rolled { ami } => format!(", rolled the controller to {ami}"),
            RollEnd::Failed { .. } => ", the roll FAILED".to_string(),
            RollEnd::Interrupted { .. } => ", the roll was interrupted".to_string(),
        };
        let verdict = if self.failed() {
            "FAILED"
        } else if self.is_noop() {
            "nothing to do"
        } else {
            "done"
        };
        format!(
            "jbake nightly in {}: {verdict}: controller {}, agent {}{roll} ({})",
            self.region,
            self.controller.short(),
            self.agent.short(),
            crate::util::fmt_duration(std::time::Duration::from_millis(
                u64::try_from(self.elapsed_ms).unwrap_or(u64::MAX)
            ))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(a: &str) -> BakeEnd {
        BakeEnd::Built {
            ami: a.into(),
            name: format!("n-{a}"),
        }
    }
    fn same(a: &str) -> BakeEnd {
        BakeEnd::Unchanged {
            ami: a.into(),
            name: format!("n-{a}"),
        }
    }
    fn failed() -> BakeEnd {
        BakeEnd::Failed {
            error: "boom".into(),
        }
    }

    #[test]
    fn a_night_rolls_only_when_asked_and_nothing_failed() {
        assert_eq!(
            roll_decision(&built("c"), &same("a"), true),
            RollDecision::Roll { ami: "c".into() }
        );
        // Unchanged: still handed to roll, which says "up to date" (or finishes a night whose
        // roll had failed).
        assert_eq!(
            roll_decision(&same("c"), &same("a"), true),
            RollDecision::Roll { ami: "c".into() }
        );
        assert_eq!(
            roll_decision(&built("c"), &same("a"), false),
            RollDecision::NotAsked
        );
        assert_eq!(
            roll_decision(&built("c"), &failed(), true),
            RollDecision::Held {
                because: "the agent bake did not succeed".into()
            }
        );
        assert_eq!(
            roll_decision(&failed(), &failed(), true),
            RollDecision::Held {
                because: "the controller and the agent bake did not succeed".into()
            }
        );
    }

    #[test]
    fn summaries() {
        let noop = Summary {
            region: "eu-west-1".into(),
            controller: same("c"),
            agent: same("a"),
            roll: RollEnd::UpToDate {
                group: "jenkins".into(),
            },
            elapsed_ms: 900,
        };
        assert!(noop.is_noop() && !noop.failed());
        assert_eq!(
            noop.line(),
            "jbake nightly in eu-west-1: nothing to do: controller unchanged (c), agent unchanged (a), jenkins already runs it (900ms)"
        );
        let bad = Summary {
            controller: built("c"),
            agent: failed(),
            roll: RollEnd::Held {
                because: "the agent bake did not succeed".into(),
            },
            ..noop.clone()
        };
        assert!(bad.failed() && !bad.is_noop());
        assert!(
            bad.line()
                .contains(": FAILED: controller built c (n-c), agent FAILED, nothing rolled"),
            "{}",
            bad.line()
        );
    }

    #[test]
    fn the_lock_excludes_a_second_run_and_tells_a_crashed_one() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("nightly.lock");
        let (lock, crashed) = NightlyLock::acquire(&path).unwrap();
        assert_eq!(crashed, None);
        match NightlyLock::acquire(&path) {
            Err(LockError::Held {
                holder: Some(h), ..
            }) => assert_eq!(h.pid, std::process::id()),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a second lock was taken"),
        }
        // Dropped without finish(): as a crash leaves it.
        drop(lock);
        let (lock, crashed) = NightlyLock::acquire(&path).unwrap();
        assert_eq!(crashed.map(|h| h.pid), Some(std::process::id()));
        lock.finish().unwrap();
        let (_lock, crashed) = NightlyLock::acquire(&path).unwrap();
        assert_eq!(crashed, None, "a finished run is not reported");
        // A symbolic link is never followed.
        let link = d.path().join("link.lock");
        std::os::unix::fs::symlink(d.path().join("elsewhere"), &link).unwrap();
        assert!(matches!(
            NightlyLock::acquire(&link),
            Err(LockError::Symlink { .. })
        ));
    }
}
