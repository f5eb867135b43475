//! One way to wait for a cloud resource to change state, used by every phase: the first poll
//! comes soon after the call that started the change, later ones back off to a cap, and the
//! whole wait has a deadline that names what was waited for when it passes. Throttling of the
//! polls themselves is retried by the SDK's adaptive retry mode.

use std::future::Future;
use std::time::Duration;

use amidala::proto::ErrorCode;
use tokio::time::Instant;

use crate::error::Failure;

/// Delays between polls: 100 ms, growing by half each time, capped at 2 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        }
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 3 / 2).min(self.cap);
        Some(delay)
    }
}

/// Calls `probe` until it yields a value, an error, or `timeout` passes (an error naming
/// `what`). `probe` answers `Ok(None)` for "not yet".
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, Failure>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut delays = Backoff::default();
    loop {
        if let Some(value) = probe().await? {
            tracing::debug!(
                what,
                waited_ms = start.elapsed().as_millis() as u64,
                "wait over"
            );
            return Ok(value);
        }
        let delay = delays.next().expect("endless");
        let now = Instant::now();
        if now >= deadline {
            return Err(Failure::new(
                ErrorCode::Timeout,
                format!(
                    "timed out after {}s waiting for {what}",
                    timeout.as_secs_f32()
                ),
            ));
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_starts_small_and_is_capped() {
        let delays: Vec<u128> = Backoff::default().take(10).map(|d| d.as_millis()).collect();
        assert_eq!(&delays[..4], &[100, 150, 225, 337]);
        assert_eq!(delays[9], 2000);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_until_ready() {
        let calls = AtomicU32::new(0);
        let got = wait_for("thing", Duration::from_secs(10), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Ok((n == 3).then_some(n))
        })
        .await
        .unwrap();
        assert_eq!(got, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_names_what_was_awaited() {
        let started = Instant::now();
        let err = wait_for::<(), _, _>(
            "volume vol-1 to become available",
            Duration::from_secs(5),
            || async { Ok(None) },
        )
        .await
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::Timeout);
        assert!(
            err.message.contains("volume vol-1 to become available"),
            "{}",
            err.message
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn errors_end_the_wait() {
        let err = wait_for::<(), _, _>("x", Duration::from_secs(5), || async {
            Err(Failure::new(ErrorCode::Cloud, "gone"))
        })
        .await
        .unwrap_err();
        assert_eq!(err.message, "gone");
    }
}
