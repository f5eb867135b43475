//! One way to wait for a cloud resource to change state, used by every phase: the first poll
//! comes soon after the call that started the change, later ones back off, and the whole wait
//! has a deadline that names what was waited for when it passes.
//!
//! How late a change is noticed is bounded by the delay between polls, which grows with the
//! time already waited: at most a quarter of a second for short waits (volumes, attachments,
//! small snapshots), at most a twentieth of the time waited for long ones, never more than 5 s.
//! A wait of a second costs about ten calls, one of a minute about seventy, one of an hour
//! about eight hundred. Throttling of the polls themselves is met by the SDK's adaptive retry
//! mode, whose client-side rate limiter slows every call of the daemon once EC2 throttles.
//!
//! Every HTTP request the SDK sends (retries included) is counted, for the task it is sent
//! from ([`counted`]): a build reports how many EC2 requests it made.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amidala::proto::ErrorCode;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Failure;

/// Delays between polls: 100 ms, growing by half each time, capped by [`Backoff::cap`] of
/// the time waited so far.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    /// The longest delay after `waited`: 250 ms, or a twentieth of `waited`, up to 5 s.
    pub fn cap(waited: Duration) -> Duration {
        (waited / 20).clamp(Duration::from_millis(250), Duration::from_secs(5))
    }

    /// The delay before the next poll, `waited` into the wait.
    pub fn next_after(&mut self, waited: Duration) -> Duration {
        let delay = self.next.min(Self::cap(waited));
        self.next = delay * 3 / 2;
        delay
    }
}

/// Counts the EC2 requests sent by the task that set [`CALLS`] ([`counted`]).
#[derive(Debug)]
pub struct CallCounter;

impl aws_sdk_ec2::config::Intercept for CallCounter {
    fn name(&self) -> &'static str {
        "amidala-call-counter"
    }

    fn read_before_transmit(
        &self,
        _context: &aws_sdk_ec2::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _components: &aws_sdk_ec2::config::RuntimeComponents,
        _cfg: &mut aws_sdk_ec2::config::ConfigBag,
    ) -> Result<(), aws_sdk_ec2::error::BoxError> {
        let _ = CALLS.try_with(|c| c.fetch_add(1, Ordering::Relaxed));
        Ok(())
    }
}

/// Runs `work` counting the EC2 requests it sends into `calls`.
pub async fn counted<T>(calls: Arc<AtomicU64>, work: impl Future<Output = T>) -> T {
    CALLS.scope(calls, work).await
}

tokio::task_local! {
    /// Cancels the waits of the task it is set in: a cancelled build stops waiting at once.
    static CANCEL: CancellationToken;
    /// EC2 requests sent by the task it is set in.
    static CALLS: Arc<AtomicU64>;
}

/// Runs `work` with its waits ended early, as `cancelled`, once `token` is cancelled.
pub async fn cancellable<T>(token: CancellationToken, work: impl Future<Output = T>) -> T {
    CANCEL.scope(token, work).await
}

/// Runs `work` with waits no cancellation ends (undoing and tearing down must finish).
pub async fn uncancellable<T>(work: impl Future<Output = T>) -> T {
    CANCEL.scope(CancellationToken::new(), work).await
}

/// Calls `probe` until it yields a value, an error, or `timeout` passes (an error naming
/// `what`). `probe` answers `Ok(None)` for "not yet". In a [`cancellable`] task, a cancel
/// ends the wait at once with a `cancelled` error.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, Failure>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut delays = Backoff::default();
    let cancel = CANCEL.try_with(CancellationToken::clone).ok();
    let cancelled = || {
        Failure::new(
            ErrorCode::Cancelled,
            format!("cancelled while waiting for {what}"),
        )
    };
    loop {
        if cancel.as_ref().is_some_and(CancellationToken::is_cancelled) {
            return Err(cancelled());
        }
        if let Some(value) = probe().await? {
            tracing::debug!(
                what,
                waited_ms = start.elapsed().as_millis() as u64,
                "wait over"
            );
            return Ok(value);
        }
        let delay = delays.next_after(start.elapsed());
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
        let pause = tokio::time::sleep(delay.min(deadline - now));
        match &cancel {
            Some(token) => tokio::select! {
                () = pause => {}
                () = token.cancelled() => return Err(cancelled()),
            },
            None => pause.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_starts_small_and_is_capped_by_the_time_waited() {
        let mut b = Backoff::default();
        let early: Vec<u128> = (0..5)
            .map(|_| b.next_after(Duration::ZERO).as_millis())
            .collect();
        assert_eq!(early, [100, 150, 225, 250, 250]);
        assert_eq!(b.next_after(Duration::from_secs(60)).as_millis(), 375);
        for _ in 0..20 {
            b.next_after(Duration::from_secs(60));
        }
        assert_eq!(
            b.next_after(Duration::from_secs(60)),
            Duration::from_secs(3)
        );
        for _ in 0..20 {
            b.next_after(Duration::from_secs(3600));
        }
        assert_eq!(
            b.next_after(Duration::from_secs(3600)),
            Duration::from_secs(5)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_is_noticed_within_a_quarter_second_of_a_short_wait() {
        // The resource becomes ready 3.01 s in: the wait ends at most 250 ms after.
        let ready_at = Instant::now() + Duration::from_millis(3010);
        let started = Instant::now();
        let calls = AtomicU32::new(0);
        wait_for("thing", Duration::from_secs(10), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok((Instant::now() >= ready_at).then_some(()))
        })
        .await
        .unwrap();
        let late = started.elapsed() - Duration::from_millis(3010);
        assert!(late <= Duration::from_millis(250), "{late:?}");
        assert!(calls.load(Ordering::SeqCst) <= 16, "{calls:?}");
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
