//! Interruption comes from the caller, not from a signal handler the bake installs: the CLI turns
//! SIGINT, SIGTERM and SIGHUP into [`Interrupter::interrupt`], and a program running two bakes at
//! once (a nightly controller and agent bake) hands both the same [`Interrupt`].

use tokio::sync::watch;

/// The sending half, kept by whoever decides that the bakes must stop.
#[derive(Debug)]
pub struct Interrupter {
    tx: watch::Sender<(u32, String)>,
}

/// What a bake watches. Cheap to clone; every clone sees every interruption.
#[derive(Debug, Clone)]
pub struct Interrupt {
    rx: watch::Receiver<(u32, String)>,
}

/// A connected pair.
pub fn channel() -> (Interrupter, Interrupt) {
    let (tx, rx) = watch::channel((0, String::new()));
    (Interrupter { tx }, Interrupt { rx })
}

impl Interrupter {
    /// Asks every bake watching to stop; `why` says what happened (`"(SIGINT)"`). A second call
    /// while the bakes clean up only makes them say what they are still removing.
    pub fn interrupt(&self, why: impl Into<String>) {
        let why = why.into();
        self.tx.send_modify(|(n, w)| {
            *n = n.saturating_add(1);
            *w = why;
        });
    }
}

impl Interrupt {
    /// An interrupt that never comes.
    pub fn never() -> Interrupt {
        channel().1
    }

    /// How many interruptions there were so far.
    pub fn count(&self) -> u32 {
        self.rx.borrow().0
    }

    /// Resolves at the first interruption after the first `seen` ones, saying why. Never
    /// resolves when the [`Interrupter`] is gone without interrupting.
    pub async fn after(&mut self, seen: u32) -> String {
        let why = match self.rx.wait_for(|(n, _)| *n > seen).await {
            Ok(v) => Some(v.1.clone()),
            Err(_) => None,
        };
        match why {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_each_interruption() {
        let (tx, rx) = channel();
        let (mut a, mut b) = (rx.clone(), rx);
        tx.interrupt("(SIGINT)");
        assert_eq!(a.after(0).await, "(SIGINT)");
        assert_eq!(b.after(0).await, "(SIGINT)");
        assert_eq!(a.count(), 1);
        tx.interrupt("(SIGHUP)");
        assert_eq!(a.after(1).await, "(SIGHUP)");
        let never = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            Interrupt::never().after(0),
        )
        .await;
        assert!(never.is_err());
    }
}
