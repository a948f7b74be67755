//! SSH: one connection per run ([`Session`]), host keys verified, and a root shell ([`RootShell`])
//! that runs each step as its own request with its own exit status, output and timeout.

mod marker;
mod session;
mod shell;

pub use marker::{MarkerScanner, Scanned};
pub use session::{ConnectOptions, HostKeyPolicy, Identity, Jump, Session, Target};
pub use shell::{stop_remote, RootShell, Stream};

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong talking to a machine over SSH.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not connect to {target} within {}: {last}", crate::util::fmt_duration(*waited))]
    ConnectTimeout {
        target: String,
        waited: Duration,
        last: String,
    },
    #[error("host key verification failed for {target}: {detail}")]
    HostKey { target: String, detail: String },
    #[error("{target} did not accept the key {identity} for user '{user}' (is its public key in ~{user}/.ssh/authorized_keys?)")]
    AuthRejected {
        target: String,
        user: String,
        identity: String,
    },
    #[error("cannot use identity {}: {detail}", path.display())]
    Identity { path: PathBuf, detail: String },
    #[error("cannot become root on {target}: {detail}")]
    Privilege { target: String, detail: String },
    #[error("the connection to {target} was lost {during}")]
    Lost { target: String, during: String },
    #[error("{target} stopped answering {during} (no end of request after {})", crate::util::fmt_duration(*waited))]
    Unresponsive {
        target: String,
        during: String,
        waited: Duration,
    },
    #[error("SSH error with {target}: {source}")]
    Protocol {
        target: String,
        #[source]
        source: russh::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    LocalIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
