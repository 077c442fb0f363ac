//! Dense sequences (SEMANTICS §11): argument checks and the group committer of one term.
//!
//! Each serving term owns at most one [`Sequencer`]. Calls queue on it; one writer task at a
//! time takes every call queued at that moment, hands out their blocks in arrival order from
//! the counters it holds, and makes all of them durable in one write (one fsync, one raft
//! entry). Calls that arrive during a write wait for the next one, never longer.
//!
//! Invariants:
//! - the writer's counters are loaded from the backend (a linearizable read) before the first
//!   block of the term, and only this term's writer advances them, so a block starts where the
//!   last durable or possibly-durable one ended (D1, D2);
//! - a block is answered only after the write that covers it returned (D3), under the epoch the
//!   backend fenced it with;
//! - a write that fails leaves its blocks spent in the counters: it may have reached the disk
//!   or the log, so handing them out again could issue them twice. Its callers learn that the
//!   outcome is unknown (`UNAVAILABLE`, a fenced write included); only refusals made before
//!   the write ("not leader", a bad argument, a cap) are definite;
//! - a term that has ended writes none of the groups still queued on it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tso_core::Epoch;
use tso_proto::limits::{SEQ_BATCH_KEYS_MAX, SEQ_KEY_BYTES_MAX};

use crate::backend::{OracleCommand, SeqCounters};
use crate::metrics;
use crate::refusal::{Call, Refusal};
use crate::term::{EXHAUSTED_WAIT_MAX, TermIo};

/// Default cap on distinct keys (SEMANTICS §11; `--seq-keys-max`).
pub const SEQ_KEYS_MAX_DEFAULT: usize = 10_000;
/// Calls waiting for the next write of one term; past it a call is refused with
/// `RESOURCE_EXHAUSTED` before anything is written. 16 384 calls of up to 128 keys stay well
/// below a hundred megabytes, and cover 256 callers on each of 64 connections.
pub const SEQ_QUEUE_MAX: usize = 16_384;

/// One checked call: distinct keys, each with a count in range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SeqCall {
    pub entries: Vec<(String, u32)>,
}

/// Checks one call's keys and counts against SEMANTICS §11 and the configured count cap.
/// Every error says which entry is wrong.
pub(crate) fn check_call(entries: Vec<(Vec<u8>, u32)>, count_max: u32) -> Result<SeqCall, String> {
    if entries.is_empty() {
        return Err("the batch is empty: ask for at least one key".into());
    }
    if entries.len() > SEQ_BATCH_KEYS_MAX {
        return Err(format!(
            "the batch has {} keys, more than the {SEQ_BATCH_KEYS_MAX} allowed",
            entries.len()
        ));
    }
    let mut checked = Vec::with_capacity(entries.len());
    for (i, (key, count)) in entries.into_iter().enumerate() {
        if count == 0 || count > count_max {
            return Err(format!(
                "entry {i}: count {count} is out of range: ask for 1 to {count_max}"
            ));
        }
        if key.is_empty() || key.len() > SEQ_KEY_BYTES_MAX {
            return Err(format!(
                "entry {i}: the key is {} bytes: keys are 1 to {SEQ_KEY_BYTES_MAX} bytes",
                key.len()
            ));
        }
        let key = String::from_utf8(key).map_err(|_| format!("entry {i}: the key is not UTF-8"))?;
        checked.push((key, count));
    }
    // At most 128 entries: comparing each with those before it costs less than hashing.
    for (i, (key, _)) in checked.iter().enumerate() {
        if checked[..i].iter().any(|(earlier, _)| earlier == key) {
            return Err(format!("key {key:?} appears twice in the batch"));
        }
    }
    Ok(SeqCall { entries: checked })
}

/// A call's blocks: the call itself, the first value of each entry's block in request order,
/// and the epoch that made them durable.
pub(crate) type SeqStarts = (SeqCall, Vec<u64>, Epoch);

struct Waiting {
    call: SeqCall,
    reply: oneshot::Sender<Result<SeqStarts, Refusal>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// A writer task is running; it takes the queue before it stops.
    writing: bool,
}

/// The group committer of one term; it writes through that term's [`TermIo`].
#[derive(Default)]
pub(crate) struct Sequencer {
    queue: Mutex<Queue>,
    /// The counters as the writer knows them; `None` until loaded. Only the writer touches it.
    counters: Mutex<Option<SeqCounters>>,
}

impl Sequencer {
    /// Calls waiting for the next write.
    pub fn queued(&self) -> usize {
        self.queue
            .lock()
            .expect("sequence queue lock")
            .waiting
            .len()
    }

    /// How many keys the writer's counters hold; `None` until loaded (or while a write holds
    /// them).
    pub fn key_count(&self) -> Option<usize> {
        self.counters
            .lock()
            .expect("sequence counters lock")
            .as_ref()
            .map(|c| c.len())
    }

    /// Queues `call` and waits for its blocks. Starts a writer if none runs, on `io`, the
    /// access of the term that owns this sequencer.
    pub async fn submit(
        self: &Arc<Self>,
        io: Arc<TermIo>,
        call: SeqCall,
    ) -> Result<SeqStarts, Refusal> {
        let (reply, answer) = oneshot::channel();
        let start_writer = {
            let mut queue = self.queue.lock().expect("sequence queue lock");
            if queue.waiting.len() >= SEQ_QUEUE_MAX {
                return Err(Refusal::ResourceExhausted(format!(
                    "{SEQ_QUEUE_MAX} sequence calls are already waiting for a write; retry"
                )));
            }
            queue.waiting.push(Waiting { call, reply });
            !std::mem::replace(&mut queue.writing, true)
        };
        if start_writer {
            // Its own task: a caller that goes away must not stop the writes of the others.
            tokio::spawn(Arc::clone(self).write_all(io));
        }
        match tokio::time::timeout(EXHAUSTED_WAIT_MAX, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Refusal::Unavailable(
                "the sequence writer stopped before answering; the block may have been spent"
                    .into(),
            )),
            Err(_) => Err(Refusal::Unavailable(format!(
                "the sequence write did not finish within {} ms; the block may have been spent",
                EXHAUSTED_WAIT_MAX.as_millis()
            ))),
        }
    }

    /// Writes group after group until the queue is empty.
    async fn write_all(self: Arc<Self>, io: Arc<TermIo>) {
        loop {
            let group = {
                let mut queue = self.queue.lock().expect("sequence queue lock");
                if queue.waiting.is_empty() {
                    queue.writing = false;
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            self.write_group(&io, group).await;
        }
    }

    /// Hands out the blocks of one group and makes them durable in one write.
    async fn write_group(&self, io: &TermIo, group: Vec<Waiting>) {
        // A term that has ended writes nothing more: its queued callers hear "not leader", which
        // is definite because nothing was written for them.
        if io.high_water_ms().is_none() {
            let refusal = Refusal::NotLeader(io.hint());
            for waiting in group {
                let _ = waiting.reply.send(Err(refusal.clone()));
            }
            return;
        }
        let mut counters = match self.loaded_counters(io).await {
            Ok(counters) => counters,
            Err(refusal) => {
                for waiting in group {
                    let _ = waiting.reply.send(Err(refusal.clone()));
                }
                return;
            }
        };
        let keys_max = io.limits.seq_keys_max;
        let mut planned = Planned::default();
        let mut granted = Vec::with_capacity(group.len());
        for waiting in group {
            match plan(&counters, &mut planned, &waiting.call, keys_max) {
                Ok(starts) => granted.push((waiting, starts)),
                Err(refusal) => {
                    let _ = waiting.reply.send(Err(refusal));
                }
            }
        }
        if granted.is_empty() {
            *self.counters.lock().expect("sequence counters lock") = Some(counters);
            return;
        }
        let ends: Vec<(String, u64)> = planned.ends.into_iter().collect();
        // Spent from here on, whatever the write's outcome (see the module comment).
        for (key, end) in &ends {
            counters.insert(key.clone(), *end);
        }
        let keys = counters.len();
        *self.counters.lock().expect("sequence counters lock") = Some(counters);
        let cmd = OracleCommand::AdvanceSequences { ends };
        let result = io.backend.apply(cmd, io.epoch).await.map(drop);
        metrics::seq_write(result.is_ok(), granted.len());
        if io.high_water_ms().is_some() {
            metrics::seq_keys(keys);
        }
        // Only "not leader" is definite (the backend refuses before writing); any other failure
        // may have made the blocks durable. `Fenced` among them: raft reports it for an entry
        // that committed in a later term of this same node, after its leadership watch fell
        // behind, and the state machine applied it.
        let answer = result.map_err(|e| io.refusal(e, Call::Spend("the sequence write")));
        for (waiting, starts) in granted {
            let mut reply = answer.clone().map(|()| (waiting.call, starts, io.epoch));
            if io.limits.unsafe_seq_burn_refused && reply.is_ok() && burn_this_one() {
                reply = Err(Refusal::ResourceExhausted(
                    "refused after its block was spent (--unsafe-seq-burn-refused)".into(),
                ));
            }
            let _ = waiting.reply.send(reply);
        }
    }

    /// The counters, loaded from the backend on the term's first write.
    async fn loaded_counters(&self, io: &TermIo) -> Result<SeqCounters, Refusal> {
        if let Some(counters) = self.counters.lock().expect("sequence counters lock").take() {
            return Ok(counters);
        }
        if io.limits.unsafe_seq_skip_load {
            return Ok(SeqCounters::new());
        }
        let loaded = io.backend.load().await.map(|state| state.sequences);
        // Nothing was written yet: the load failing is a definite refusal.
        loaded.map_err(|e| io.refusal(e, Call::Read("reading the sequence counters")))
    }
}

/// For the burnt-refusal control: one granted call in 50.
fn burn_this_one() -> bool {
    static GRANTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    GRANTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 50 == 49
}

/// The ends one write will make durable, planned call by call.
#[derive(Debug, Default)]
struct Planned {
    ends: BTreeMap<String, u64>,
    /// Keys in `ends` that the counters do not hold yet.
    new_keys: usize,
}

/// Plans the blocks of one call on top of the counters and what this write already planned;
/// all of the call's entries or none. Returns each entry's start.
fn plan(
    counters: &SeqCounters,
    planned: &mut Planned,
    call: &SeqCall,
    keys_max: usize,
) -> Result<Vec<u64>, Refusal> {
    let mut new_keys = 0;
    let mut starts = Vec::with_capacity(call.entries.len());
    for (key, count) in &call.entries {
        let start = match planned.ends.get(key).or_else(|| counters.get(key)) {
            Some(next) => *next,
            None => {
                new_keys += 1;
                if counters.len() + planned.new_keys + new_keys > keys_max {
                    return Err(Refusal::ResourceExhausted(format!(
                        "the server holds its maximum of {keys_max} sequence keys and {key:?} \
                         is a new one (raise --seq-keys-max)"
                    )));
                }
                0
            }
        };
        if start.checked_add(u64::from(*count)).is_none() {
            return Err(Refusal::FailedPrecondition(format!(
                "sequence {key:?} is at {start}: {count} more would pass {}",
                u64::MAX
            )));
        }
        starts.push(start);
    }
    planned.new_keys += new_keys;
    for ((key, count), start) in call.entries.iter().zip(&starts) {
        let end = start + u64::from(*count);
        match planned.ends.get_mut(key) {
            Some(planned_end) => *planned_end = end,
            None => {
                planned.ends.insert(key.clone(), end);
            }
        }
    }
    Ok(starts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(entries: &[(&str, u32)]) -> SeqCall {
        SeqCall {
            entries: entries.iter().map(|(k, c)| (k.to_string(), *c)).collect(),
        }
    }

    type Raw = Vec<(Vec<u8>, u32)>;

    fn raw(entries: &[(&[u8], u32)]) -> Raw {
        entries.iter().map(|(k, c)| (k.to_vec(), *c)).collect()
    }

    #[test]
    fn calls_are_checked_entry_by_entry() {
        let long = [b'k'; SEQ_KEY_BYTES_MAX + 1];
        let max_key = [b'k'; SEQ_KEY_BYTES_MAX];
        let cases: Vec<(Raw, Option<&str>)> = vec![
            (raw(&[(b"a", 1)]), None),
            (raw(&[(&max_key, tso_proto::limits::SEQ_COUNT_MAX)]), None),
            (raw(&[]), Some("empty")),
            (raw(&[(b"a", 0)]), Some("count 0")),
            (raw(&[(b"a", 65_537)]), Some("count 65537")),
            (raw(&[(b"", 1)]), Some("0 bytes")),
            (raw(&[(&long, 1)]), Some("129 bytes")),
            (raw(&[(b"\xff", 1)]), Some("not UTF-8")),
            (raw(&[(b"a", 1), (b"b", 1), (b"a", 2)]), Some("twice")),
        ];
        for (entries, error) in cases {
            let result = check_call(entries.clone(), tso_proto::limits::SEQ_COUNT_MAX);
            match error {
                None => assert!(result.is_ok(), "{entries:?}: {result:?}"),
                Some(text) => {
                    let err = result.expect_err("must be refused");
                    assert!(err.contains(text), "{entries:?}: {err}");
                }
            }
        }
        let many: Vec<(Vec<u8>, u32)> = (0..=SEQ_BATCH_KEYS_MAX)
            .map(|i| (format!("k{i}").into_bytes(), 1))
            .collect();
        assert!(check_call(many[..SEQ_BATCH_KEYS_MAX].to_vec(), 10).is_ok());
        assert!(check_call(many, 10).unwrap_err().contains("129 keys"));
    }

    #[test]
    fn blocks_follow_each_other_within_one_write() {
        let counters: SeqCounters = [("a".to_string(), 10)].into_iter().collect();
        let mut planned = Planned::default();
        assert_eq!(
            plan(&counters, &mut planned, &call(&[("a", 5)]), 10),
            Ok(vec![10])
        );
        assert_eq!(
            plan(&counters, &mut planned, &call(&[("b", 3), ("a", 1)]), 10),
            Ok(vec![0, 15])
        );
        assert_eq!(planned.ends.get("a"), Some(&16));
        assert_eq!(planned.ends.get("b"), Some(&3));
    }

    #[test]
    fn a_refused_call_plans_nothing() {
        let counters: SeqCounters = [("full".to_string(), u64::MAX - 5)].into_iter().collect();
        let mut planned = Planned::default();
        let refused = plan(&counters, &mut planned, &call(&[("x", 1), ("full", 6)]), 10);
        assert!(matches!(refused, Err(Refusal::FailedPrecondition(_))));
        assert!(planned.ends.is_empty());
        assert_eq!(planned.new_keys, 0);
        assert_eq!(
            plan(&counters, &mut planned, &call(&[("full", 5)]), 10),
            Ok(vec![u64::MAX - 5])
        );
        assert_eq!(planned.ends.get("full"), Some(&u64::MAX));
    }

    #[test]
    fn the_key_cap_counts_keys_planned_in_the_same_write() {
        let counters: SeqCounters = [("a".to_string(), 1)].into_iter().collect();
        let mut planned = Planned::default();
        assert!(plan(&counters, &mut planned, &call(&[("b", 1)]), 2).is_ok());
        assert!(plan(&counters, &mut planned, &call(&[("a", 1), ("b", 1)]), 2).is_ok());
        let refused = plan(&counters, &mut planned, &call(&[("c", 1)]), 2);
        assert!(matches!(refused, Err(Refusal::ResourceExhausted(_))));
    }
}
