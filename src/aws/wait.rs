//! Polling with jbake's own schedule: a short first interval, then backoff, and a deadline.
//! The SDK waiters sleep 15 s between polls, which wastes most of a build against fast APIs.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long EC2 may deny knowing something it has just created (eventual consistency): a
/// `*.NotFound` for a resource younger than this means "not visible yet", and the call is tried
/// again; an older one, or one EC2 has already shown, is really gone.
///
/// Five minutes: EC2 documents no bound ("Eventual consistency in the Amazon EC2 API" asks for
/// capped exponential backoff); this is what the Terraform AWS provider allows for EC2 changes
/// to propagate (`ec2PropagationTimeout`, used by `RetryWhenNewResourceNotFound`), seen to cover
/// the seconds it takes in practice by two orders of magnitude. It bounds how long a build (or
/// its cleanup) waits for a resource that a lost answer made it unsure about.
pub const PROPAGATION: Duration = Duration::from_secs(300);

/// How long jbake looks, by name or tag, for something a call whose answer never came may have
/// made (a timeout, a dropped connection, a server error after the SDK's retries): a resource EC2
/// made shows in its lists within seconds, so one not seen in a minute was most likely never
/// made — and if it was, it carries the build's tag: the build's final sweep and `jbake gc`
/// still find it. (A resource EC2 gave jbake the id of gets the full [`PROPAGATION`].)
pub const LOST_ANSWER: Duration = Duration::from_secs(60);

/// Whether a `NotFound` about something created at `created` still means "not visible yet".
pub fn not_yet_visible(created: Instant) -> bool {
    created.elapsed() < PROPAGATION
}

/// What one poll saw.
pub enum Poll<T> {
    Ready(T),
    /// Not yet; the text says what the state is (for progress).
    Pending(String),
}

/// Polls `check` until it is ready, fails, or `deadline` passes. Intervals: 250 ms doubling up
/// to `max_interval`. `on_pending` is called with the state text when it changes.
pub async fn until<T, E, F, Fut>(
    deadline: Duration,
    max_interval: Duration,
    mut on_pending: impl FnMut(&str),
    mut check: F,
) -> Result<Result<T, E>, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll<T>, E>>,
{
    let start = Instant::now();
    let mut interval = Duration::from_millis(250);
    let mut last = String::new();
    loop {
        match check().await {
            Err(e) => return Ok(Err(e)),
            Ok(Poll::Ready(v)) => return Ok(Ok(v)),
            Ok(Poll::Pending(state)) => {
                if state != last {
                    on_pending(&state);
                    last = state;
                }
            }
        }
        let waited = start.elapsed();
        if waited >= deadline {
            return Err(last);
        }
        tokio::time::sleep(interval.min(deadline - waited)).await;
        interval = interval.saturating_mul(2).min(max_interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn polls_until_ready_with_backoff() {
        let mut n = 0;
        let mut states = Vec::new();
        let r: Result<Result<u32, ()>, String> = until(
            Duration::from_secs(60),
            Duration::from_secs(5),
            |s| states.push(s.to_string()),
            || {
                n += 1;
                let v = n;
                async move {
                    Ok(if v >= 4 {
                        Poll::Ready(v)
                    } else {
                        Poll::Pending(format!("pending{}", v.min(2)))
                    })
                }
            },
        )
        .await;
        assert!(matches!(r, Ok(Ok(4))));
        assert_eq!(states, ["pending1", "pending2"]);
    }

    #[test]
    fn not_found_means_not_yet_for_a_bounded_time() {
        assert!(not_yet_visible(Instant::now()));
        if let Some(long_ago) = Instant::now().checked_sub(PROPAGATION + Duration::from_secs(1)) {
            assert!(!not_yet_visible(long_ago), "then it is gone");
        }
        assert!(LOST_ANSWER < PROPAGATION);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline() {
        let r: Result<Result<(), ()>, String> = until(
            Duration::from_secs(3),
            Duration::from_secs(1),
            |_| {},
            || async { Ok(Poll::Pending("stopping".into())) },
        )
        .await;
        assert_eq!(r.err().as_deref(), Some("stopping"));
    }
}
