//! Who runs next: the fair queue of builds waiting for one of the daemon's `max_builds` slots.
//!
//! No user may hold every slot (each runs at most `max_running_builds_per_user` at once), and
//! when a slot frees, it goes to the waiting build of the user who runs the fewest builds now,
//! the oldest request first among equals: one user's endless stream of builds cannot keep
//! another's waiting for ever.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The daemon's build slots.
#[derive(Debug)]
pub struct Scheduler {
    max_running: usize,
    per_user: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    running: HashMap<u32, usize>,
    total: usize,
    waiting: Vec<Waiter>,
    next: u64,
    closed: bool,
}

#[derive(Debug)]
struct Waiter {
    uid: u32,
    seq: u64,
    grant: oneshot::Sender<()>,
}

/// A slot held by a build of `uid`; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    scheduler: Arc<Scheduler>,
    uid: u32,
}

/// The scheduler was closed (the daemon is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl State {
    fn running(&self, uid: u32) -> usize {
        self.running.get(&uid).copied().unwrap_or(0)
    }

    fn take(&mut self, uid: u32) {
        *self.running.entry(uid).or_insert(0) += 1;
        self.total += 1;
    }

    fn give_back(&mut self, uid: u32) {
        if let Some(n) = self.running.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(&uid);
            }
        }
        self.total -= 1;
    }
}

impl Scheduler {
    /// `max_running` slots, at most `per_user` of them one user's.
    pub fn new(max_running: usize, per_user: usize) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            max_running,
            per_user: per_user.clamp(1, max_running.max(1)),
            state: Mutex::new(State::default()),
        })
    }

    /// Waits for a slot for a build of `uid`. Cancel-safe: a wait dropped before or after its
    /// grant leaves no slot taken.
    pub async fn acquire(self: &Arc<Self>, uid: u32) -> Result<Slot, Closed> {
        let waiting = {
            let mut state = self.state.lock().expect("scheduler lock");
            if state.closed {
                return Err(Closed);
            }
            let (grant, granted) = oneshot::channel();
            let seq = state.next;
            state.next += 1;
            state.waiting.push(Waiter { uid, seq, grant });
            self.dispatch(&mut state);
            Pending {
                scheduler: self.clone(),
                uid,
                seq,
                granted: Some(granted),
            }
        };
        waiting.wait().await
    }

    /// Gives free slots to the waiting builds that come first: within their user's share,
    /// the user with the fewest running first, then the oldest request.
    fn dispatch(&self, state: &mut State) {
        while state.total < self.max_running {
            let next = state
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, w)| state.running(w.uid) < self.per_user)
                .min_by_key(|(_, w)| (state.running(w.uid), w.seq))
                .map(|(i, _)| i);
            let Some(i) = next else { return };
            let waiter = state.waiting.remove(i);
            state.take(waiter.uid);
            if waiter.grant.send(()).is_err() {
                // Its wait was dropped meanwhile.
                state.give_back(waiter.uid);
            }
        }
    }

    /// Refuses every waiting and future build.
    pub fn close(&self) {
        let mut state = self.state.lock().expect("scheduler lock");
        state.closed = true;
        state.waiting.clear();
    }

    /// Builds running now, and waiting.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state.lock().expect("scheduler lock");
        (state.total, state.waiting.len())
    }
}

/// A build's place in the queue.
struct Pending {
    scheduler: Arc<Scheduler>,
    uid: u32,
    seq: u64,
    granted: Option<oneshot::Receiver<()>>,
}

impl Pending {
    async fn wait(mut self) -> Result<Slot, Closed> {
        let granted = self.granted.as_mut().expect("waiting").await;
        self.granted = None;
        match granted {
            Ok(()) => Ok(Slot {
                scheduler: self.scheduler.clone(),
                uid: self.uid,
            }),
            Err(_) => Err(Closed),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(mut granted) = self.granted.take() else {
            return;
        };
        let mut state = self.scheduler.state.lock().expect("scheduler lock");
        if let Some(i) = state.waiting.iter().position(|w| w.seq == self.seq) {
            state.waiting.remove(i);
        } else if granted.try_recv().is_ok() {
            // Granted, and dropped before it was taken up: the slot goes to the next.
            state.give_back(self.uid);
            self.scheduler.dispatch(&mut state);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.scheduler.state.lock().expect("scheduler lock");
        state.give_back(self.uid);
        self.scheduler.dispatch(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_user_holds_every_slot_and_the_least_served_goes_first() {
        let s = Scheduler::new(4, 2);
        // Alice asks for five builds: two run, three wait, though slots are free.
        let a1 = s.acquire(1).await.unwrap();
        let a2 = s.acquire(1).await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..3 {
            let s = s.clone();
            waiting.push(tokio::spawn(async move { s.acquire(1).await }));
        }
        tokio::task::yield_now().await;
        assert_eq!(s.counts(), (2, 3));
        // Bob's first build runs at once, on a free slot.
        let b1 = tokio::time::timeout(std::time::Duration::from_secs(1), s.acquire(2))
            .await
            .expect("bob is not queued behind alice")
            .unwrap();
        let b2 = s.acquire(2).await.unwrap();
        assert_eq!(s.counts(), (4, 3));
        // Carol waits; when one of alice's ends, carol (running none) goes before alice's.
        let c = {
            let s = s.clone();
            tokio::spawn(async move { s.acquire(3).await })
        };
        tokio::task::yield_now().await;
        drop(a1);
        let c1 = tokio::time::timeout(std::time::Duration::from_secs(1), c)
            .await
            .expect("carol got the slot")
            .unwrap()
            .unwrap();
        assert_eq!(s.counts(), (4, 3));
        drop((a2, b1, b2, c1));
        tokio::task::yield_now().await;
        // Alice's three waiting: two run (her share), one waits.
        assert_eq!(s.counts(), (2, 1));
        s.close();
        let results: Vec<_> = futures::future::join_all(waiting).await;
        assert_eq!(
            results
                .iter()
                .filter(|r| r.as_ref().unwrap().is_ok())
                .count(),
            2
        );
        assert!(s.acquire(4).await.is_err(), "closed");
    }

    #[tokio::test]
    async fn a_dropped_wait_leaves_no_slot_taken() {
        let s = Scheduler::new(1, 1);
        let held = s.acquire(1).await.unwrap();
        let wait = s.acquire(2);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(10), wait)
                .await
                .is_err()
        );
        drop(held);
        // The dropped wait was not given the slot: the next user gets it at once.
        let _next = tokio::time::timeout(std::time::Duration::from_secs(1), s.acquire(3))
            .await
            .expect("the slot is free")
            .unwrap();
        assert_eq!(s.counts(), (1, 0));
    }
}
