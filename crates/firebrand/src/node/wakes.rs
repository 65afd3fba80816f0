//! Writers' wake-ups held back while the task that queues their frames has more to queue.
//!
//! A broadcast queues its frame to every subscriber's [`Outbox`](super::queue::Outbox) and
//! wakes each connection whose queue was empty. When broadcasts arrive together (pipelined
//! `POST /api/broadcast` requests, a burst), waking the writers after the first one lets them
//! run between the broadcasts, each writing a few frames per syscall. [`Holding`] wraps the
//! future of a task that queues frames (an HTTP connection) and holds those wake-ups while
//! that task has more to do at once, then wakes every writer once: each writes the whole burst
//! in one go. The burst's frames reach the kernel in fewer, larger writes, as a server that
//! handles every request it has read before waking any writer does.
//!
//! "More to do at once" is the task being woken while it is polled: hyper yields after 16
//! turns of a connection's loop (a few pipelined requests), a request body handed to its
//! handler wakes the task, and tokio's budget makes a busy task yield, all by waking it. A
//! poll that ends without such a wake (the connection waits for its client, or for a
//! cluster's answer) wakes the held writers, so a lone request holds its writers only until
//! its response is written. At most
//! [`MAX_HELD_POLLS`] polls in a row hold, so a client that never stops pipelining does not
//! starve the writers.

use std::cell::RefCell;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// How many polls in a row may hold the wake-ups (hyper handles up to 16 pipelined requests
/// per poll of a connection, fewer when their bodies come apart from their heads).
pub(crate) const MAX_HELD_POLLS: u32 = 32;

/// Room for held wake-ups kept between bursts.
const KEEP_HELD: usize = 64;

thread_local! {
    /// The wake-ups held by the [`Holding`] being polled on this thread, if any.
    static HELD: RefCell<Option<Vec<Waker>>> = const { RefCell::new(None) };
}

/// Wakes the task waiting on `ready`, or holds its wake-up when a [`Holding`] future is
/// being polled on this thread.
pub(crate) fn wake(ready: &AtomicWaker) {
    let held = HELD.with(|held| match &mut *held.borrow_mut() {
        Some(wakers) => {
            // Taken: a second frame queued before the wake-up finds no waker to hold.
            wakers.extend(ready.take());
            true
        }
        None => false,
    });
    if !held {
        ready.wake();
    }
}

/// A future whose polls hold the writers' wake-ups: see the module docs.
pub(crate) struct Holding<F> {
    /// Boxed, so that this is `Unpin` whatever `F` is (one allocation per wrapped task).
    inner: Pin<Box<F>>,
    held: Vec<Waker>,
    polls: u32,
}

impl<F> Holding<F> {
    pub(crate) fn new(inner: F) -> Self {
        Holding {
            inner: Box::pin(inner),
            held: Vec::new(),
            polls: 0,
        }
    }

    fn release(&mut self) {
        self.polls = 0;
        for waker in self.held.drain(..) {
            waker.wake();
        }
        // A burst to 10k subscribers holds 160 KB of wakers: not kept by an idle keep-alive
        // connection.
        self.held.shrink_to(KEEP_HELD);
    }
}

impl<F> Drop for Holding<F> {
    fn drop(&mut self) {
        self.release();
    }
}

/// A [`Holding`]'s wake-ups installed as this thread's [`HELD`] for one poll, and put back
/// when the poll returns or panics (then the task's drop wakes them).
struct Installed<'a> {
    held: &'a mut Vec<Waker>,
    outer: Option<Vec<Waker>>,
}

impl<'a> Installed<'a> {
    fn new(held: &'a mut Vec<Waker>) -> Self {
        let mine = std::mem::take(held);
        let outer = HELD.with(|h| h.replace(Some(mine)));
        Installed { held, outer }
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        if let Some(mine) = HELD.with(|h| h.replace(self.outer.take())) {
            *self.held = mine;
        }
    }
}

/// The task's waker, noting whether it was woken.
struct Noting {
    woken: AtomicBool,
    waker: Waker,
}

impl Wake for Noting {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Relaxed);
        self.waker.wake_by_ref();
    }
}

impl<F: Future> Future for Holding<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let noting = Arc::new(Noting {
            woken: AtomicBool::new(false),
            waker: cx.waker().clone(),
        });
        let waker = Waker::from(noting.clone());
        let polled = {
            let _installed = Installed::new(&mut this.held);
            this.inner.as_mut().poll(&mut Context::from_waker(&waker))
        };
        this.polls += 1;
        let more = polled.is_pending() && noting.woken.load(Ordering::Relaxed);
        if !more || this.polls >= MAX_HELD_POLLS {
            this.release();
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn writer() -> (AtomicWaker, Arc<Count>) {
        let count = Arc::new(Count::default());
        let ready = AtomicWaker::new();
        ready.register(&Waker::from(count.clone()));
        (ready, count)
    }

    #[test]
    fn outside_a_holding_future_the_writer_is_woken_at_once() {
        let (ready, count) = writer();
        wake(&ready);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn wake_ups_are_held_while_the_task_has_more_to_do_and_released_when_it_waits() {
        let (ready, count) = writer();
        let task = Arc::new(Count::default());
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);
        let mut polls = 0;
        // Two polls that queue a frame each and yield (wake themselves), then one that waits.
        let mut fut = std::pin::pin!(Holding::new(std::future::poll_fn(|cx| {
            polls += 1;
            if polls <= 2 {
                wake(&ready);
                ready.register(&Waker::from(count.clone()));
                cx.waker().wake_by_ref();
            }
            Poll::<()>::Pending
        })));
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::Relaxed), 0, "held while yielding");
        assert_eq!(
            task.0.load(Ordering::Relaxed),
            2,
            "the task's own wakes go through"
        );
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::Relaxed), 2, "released when it waits");
    }

    #[test]
    fn a_task_that_never_stops_yielding_releases_them_every_max_held_polls() {
        let (ready, count) = writer();
        let mut fut = std::pin::pin!(Holding::new(std::future::poll_fn(|cx| {
            wake(&ready);
            ready.register(&Waker::from(count.clone()));
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        })));
        let noop = Waker::noop();
        let mut cx = Context::from_waker(noop);
        for _ in 0..MAX_HELD_POLLS - 1 {
            assert!(fut.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(count.0.load(Ordering::Relaxed), 0);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::Relaxed), MAX_HELD_POLLS as usize);
    }

    #[test]
    fn dropping_it_wakes_what_it_holds() {
        let (ready, count) = writer();
        let mut fut = Box::pin(Holding::new(std::future::poll_fn(|cx| {
            wake(&ready);
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        })));
        let noop = Waker::noop();
        assert!(
            fut.as_mut()
                .poll(&mut Context::from_waker(noop))
                .is_pending()
        );
        assert_eq!(count.0.load(Ordering::Relaxed), 0);
        drop(fut);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
    }
}
