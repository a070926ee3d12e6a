//! The frames a link has yet to write, bounded in bytes as well as in count.
//!
//! A frame is encoded when it is queued, so its size is known there: a frame larger than
//! the link allows is refused to its sender at once, and the queue holds at most its byte
//! budget of frames. A sender that finds the budget spent waits (an answer, a stream item),
//! so a peer that stops reading holds up its own answers, never the server's memory. The
//! small frames that keep a link alive or end something (heartbeats, cancels, a close)
//! take no budget: they are bounded by the queue's count.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::protocol::{Envelope, FrameError, encode_frame};

/// One encoded frame, holding its share of the byte budget until it is written.
#[derive(Debug)]
pub(super) struct Outgoing {
    /// Length prefix and body.
    pub(super) frame: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

/// Why a frame was not queued.
#[derive(Debug)]
pub(super) enum Refused {
    /// The link's writer is gone.
    Closed,
    /// The frame is larger than the link's maximum; says how large.
    TooLarge(String),
    /// The byte budget is spent (only from [`Outbox::try_send`]).
    Full,
}

/// The sending end of a link's write queue.
#[derive(Debug)]
pub(super) struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    max_frame: usize,
}

/// Frames that take no budget: small, fixed-size, and needed for the link to live or to
/// release the peer's resources.
fn exempt(envelope: &Envelope) -> bool {
    matches!(
        envelope,
        Envelope::Ping { .. }
            | Envelope::Pong { .. }
            | Envelope::Cancel { .. }
            | Envelope::Close { .. }
    )
}

impl Outbox {
    /// A queue of at most `count` frames and `bytes` bytes (at least one frame of any
    /// size fits: a frame larger than the budget takes all of it), of frames of at most
    /// `max_frame` bytes.
    pub(super) fn new(
        count: usize,
        bytes: usize,
        max_frame: usize,
    ) -> (Outbox, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(count.max(1));
        // A semaphore's permits are counted in u32 per acquisition.
        let budget_bytes = bytes.clamp(1, u32::MAX as usize);
        let outbox = Outbox {
            tx,
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            max_frame,
        };
        (outbox, rx)
    }

    fn encode(&self, envelope: &Envelope) -> Result<Bytes, Refused> {
        match encode_frame(envelope, self.max_frame) {
            Ok(frame) => Ok(Bytes::from(frame)),
            Err(err @ FrameError::TooLarge { .. }) => Err(Refused::TooLarge(err.to_string())),
            Err(err) => Err(Refused::TooLarge(format!("cannot encode the frame: {err}"))),
        }
    }

    fn share(&self, frame: &Bytes) -> u32 {
        frame.len().clamp(1, self.budget_bytes) as u32
    }

    /// Queues a frame, waiting while the queue is full in count or in bytes.
    pub(super) async fn send(&self, envelope: &Envelope) -> Result<(), Refused> {
        let frame = self.encode(envelope)?;
        let budget = if exempt(envelope) {
            None
        } else {
            let share = self.share(&frame);
            let permit = self
                .budget
                .clone()
                .acquire_many_owned(share)
                .await
                .map_err(|_| Refused::Closed)?;
            Some(permit)
        };
        let outgoing = Outgoing {
            frame,
            _budget: budget,
        };
        self.tx.send(outgoing).await.map_err(|_| Refused::Closed)
    }

    /// Queues a frame if there is room now.
    pub(super) fn try_send(&self, envelope: &Envelope) -> Result<(), Refused> {
        let frame = self.encode(envelope)?;
        let budget = if exempt(envelope) {
            None
        } else {
            let share = self.share(&frame);
            Some(
                self.budget
                    .clone()
                    .try_acquire_many_owned(share)
                    .map_err(|_| Refused::Full)?,
            )
        };
        let outgoing = Outgoing {
            frame,
            _budget: budget,
        };
        self.tx.try_send(outgoing).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => Refused::Full,
            mpsc::error::TrySendError::Closed(_) => Refused::Closed,
        })
    }

    /// Bytes of budgeted frames queued and not yet written.
    #[cfg(test)]
    fn queued_bytes(&self) -> usize {
        self.budget_bytes - self.budget.available_permits()
    }

    /// Wakes every sender waiting for budget with [`Refused::Closed`]: the link closed.
    pub(super) fn close(&self) {
        self.budget.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Response, StreamItem};

    fn blob(size: usize) -> Envelope {
        Envelope::StreamItem {
            id: 1,
            item: StreamItem::Blob {
                hash: [0; 32],
                data: vec![7; size],
            },
        }
    }

    #[tokio::test]
    async fn senders_wait_while_the_budget_is_spent_and_heartbeats_pass() {
        let (outbox, mut rx) = Outbox::new(100, 10_000, 1 << 20);
        outbox.send(&blob(6_000)).await.unwrap();
        assert!(outbox.queued_bytes() > 6_000);
        assert!(matches!(outbox.try_send(&blob(6_000)), Err(Refused::Full)));
        let outbox = Arc::new(outbox);
        let waiting = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.send(&blob(6_000)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "over the budget, the sender waits");
        outbox
            .try_send(&Envelope::Ping { seq: 1, sent_us: 0 })
            .expect("a heartbeat takes no budget");
        // Writing the first frame frees its share: the waiting sender goes on.
        let first = rx.recv().await.unwrap();
        assert!(first.frame.len() > 6_000);
        drop(first);
        waiting.await.unwrap().unwrap();
        assert!(matches!(
            rx.recv().await.unwrap().frame.len(),
            n if n < 100
        ));
    }

    #[tokio::test]
    async fn a_frame_over_the_maximum_is_refused_to_its_sender_and_one_over_the_budget_fits_alone()
    {
        let (outbox, mut rx) = Outbox::new(10, 1_000, 4_096);
        assert!(matches!(
            outbox.send(&blob(5_000)).await,
            Err(Refused::TooLarge(why)) if why.contains("4096")
        ));
        outbox.send(&blob(3_000)).await.unwrap();
        assert_eq!(outbox.queued_bytes(), 1_000, "it took the whole budget");
        drop(rx.recv().await);
        assert_eq!(outbox.queued_bytes(), 0);
        let answer = Envelope::Response {
            id: 2,
            result: Ok(Response::Ack),
        };
        outbox.try_send(&answer).unwrap();
        outbox.close();
        assert!(matches!(
            outbox.send(&blob(3_000)).await,
            Err(Refused::Closed)
        ));
    }
}
