//! What a build created, undone in reverse order on any exit (Packer's `multistep` cleanup).
//!
//! Each resource is recorded the moment the API returns its id, before the step that made it
//! goes on, so a failure (or Ctrl-C) in the middle of a step still undoes what that step made.
//! On success the image is "kept": it leaves the stack, and everything else is undone.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::aws::{self, wait, Aws};
use crate::progress::Progress;

/// A temporary resource of a build.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    KeyPair { name: String },
    SecurityGroup { id: String },
    Instance { id: String },
    Image { id: String, snapshots: Vec<String> },
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::KeyPair { name } => write!(f, "key pair {name}"),
            Resource::SecurityGroup { id } => write!(f, "security group {id}"),
            Resource::Instance { id } => write!(f, "instance {id}"),
            Resource::Image { id, snapshots } if snapshots.is_empty() => write!(f, "image {id}"),
            Resource::Image { id, snapshots } => {
                write!(f, "image {id} (snapshots {})", snapshots.join(", "))
            }
        }
    }
}

/// The stack of resources to undo. Shared (behind a mutex) with the interrupt handler so a
/// second Ctrl-C can say what is still being cleaned up.
#[derive(Debug, Clone, Default)]
pub struct Undo {
    stack: Arc<Mutex<Vec<Resource>>>,
}

impl Undo {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Resource>> {
        self.stack.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, r: Resource) {
        self.lock().push(r);
    }

    /// Updates a recorded image with its snapshots (known once it is available).
    pub fn set_snapshots(&self, image_id: &str, snaps: &[String]) {
        for r in self.lock().iter_mut() {
            if let Resource::Image { id, snapshots } = r {
                if id == image_id {
                    *snapshots = snaps.to_vec();
                }
            }
        }
    }

    /// The build succeeded: keep this resource (the image).
    pub fn keep(&self, r: &Resource) {
        self.lock().retain(|x| x != r);
    }

    pub fn remaining(&self) -> Vec<Resource> {
        self.lock().clone()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Undoes everything, newest first. Failures are reported, and the rest still runs; what
    /// could not be removed is returned (it is tagged, so `jbake gc` finds it).
    pub async fn run(&self, aws: &Aws, progress: &Progress) -> Vec<(Resource, aws::Error)> {
        let mut failed = Vec::new();
        loop {
            let Some(r) = self.lock().last().cloned() else {
                break;
            };
            progress.info("cleanup", &format!("removing {r}"));
            if let Err(e) = undo_one(aws, &r, progress).await {
                progress.warn(&format!("could not remove {r}: {e}"));
                failed.push((r.clone(), e));
            }
            self.lock().retain(|x| x != &r);
        }
        failed
    }
}

/// Removes one resource, waiting where the next one depends on it (a security group cannot be
/// deleted while a terminating instance still uses it).
pub async fn undo_one(aws: &Aws, r: &Resource, progress: &Progress) -> Result<(), aws::Error> {
    match r {
        Resource::KeyPair { name } => aws.ec2.delete_key_pair(name).await,
        Resource::Instance { id } => {
            aws.ec2.terminate_instance(id).await?;
            let waited = wait::until(
                Duration::from_secs(600),
                Duration::from_secs(5),
                |s| progress.info("waiting", &format!("instance {id} is {s}")),
                || async {
                    Ok::<_, aws::Error>(match aws.ec2.instance(id).await? {
                        None => wait::Poll::Ready(()),
                        Some(i) if i.state == "terminated" => wait::Poll::Ready(()),
                        Some(i) => wait::Poll::Pending(i.state),
                    })
                },
            )
            .await;
            match waited {
                Ok(r) => r,
                Err(state) => Err(aws::Error::other(
                    format!("terminating {id}"),
                    aws.ec2.region(),
                    format!("still {state} after 10 minutes"),
                )),
            }
        }
        Resource::SecurityGroup { id } => {
            let waited = wait::until(
                Duration::from_secs(180),
                Duration::from_secs(5),
                |_| {},
                || async {
                    match aws.ec2.delete_security_group(id).await {
                        Ok(()) => Ok(wait::Poll::Ready(())),
                        Err(e) if e.is_code("InvalidGroup.NotFound") => Ok(wait::Poll::Ready(())),
                        Err(e) if e.is_code("DependencyViolation") => {
                            Ok(wait::Poll::Pending("in use".to_string()))
                        }
                        Err(e) => Err(e),
                    }
                },
            )
            .await;
            match waited {
                Ok(r) => r,
                Err(_) => Err(aws::Error::other(
                    format!("deleting {id}"),
                    aws.ec2.region(),
                    "still in use after 3 minutes",
                )),
            }
        }
        Resource::Image { id, snapshots } => {
            aws.ec2.deregister_image(id).await?;
            for s in snapshots {
                aws.ec2.delete_snapshot(s).await?;
            }
            Ok(())
        }
    }
}
