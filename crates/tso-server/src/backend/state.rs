//! The oracle's one durable record and the changes to it: the merge rules, written once.
//!
//! Every backend keeps an [`OracleState`] and changes it only through [`OracleState::apply`]:
//! the high-water and each dense-sequence counter take the `max`, and the stamping-lease record
//! is replaced unless a later term's record is already there. Invariant: whatever the order or
//! repetition of commands, the high-water and every counter never decrease and the lease term
//! never goes back.

#[cfg(feature = "raft")]
use serde::{Deserialize, Serialize};
use tso_core::{Epoch, PHYSICAL_MAX_MS};

use super::{BackendError, SeqCounters, SeqEnds};

/// Everything the oracle keeps durable.
///
/// In the raft backend's snapshot these fields sit inline, in this order, inside the state
/// machine's state: a new field here changes the snapshot layout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "raft", derive(Serialize, Deserialize))]
pub struct OracleState {
    /// The durable high-water, in milliseconds.
    pub high_water_ms: u64,
    /// Each dense-sequence key's next unissued value (a key never advanced is absent).
    pub sequences: SeqCounters,
    /// The raft term that wrote `leases` (0 when none did).
    pub lease_term: u64,
    /// The stamping-lease set, encoded by `stamping.rs` (opaque here; empty when never written).
    pub leases: Vec<u8>,
}

/// One durable change to the [`OracleState`].
///
/// The variant order is the raft log's encoding (the variant index is what a stored entry
/// carries, and `backend::raft`'s log command starts with these three): new variants go last.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "raft", derive(Serialize, Deserialize))]
pub enum OracleCommand {
    /// Raise the high-water to at least this many milliseconds.
    AdvanceHighWater { at_least_ms: u64 },
    /// Raise each counter to at least its end (one group commit of the leader; keys distinct).
    AdvanceSequences { ends: SeqEnds },
    /// Replace the stamping-lease record with one computed by the leader of `term`.
    ReplaceLeases { term: u64, record: Vec<u8> },
}

/// What applying one command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged {
    /// The state includes the command now (raised, replaced, or already at least as high).
    Included,
    /// A lease record of the later term `lease_term` stays: the command changed nothing.
    Superseded { lease_term: u64 },
}

impl OracleCommand {
    /// Replaces the lease record with `record`, written under `epoch`: the record carries the
    /// epoch's term (its high half; on the file backend, with one writer, always 0).
    pub fn replace_leases(record: Vec<u8>, epoch: Epoch) -> OracleCommand {
        OracleCommand::ReplaceLeases {
            term: epoch.hi(),
            record,
        }
    }

    /// Refuses, before anything is written, a command no backend may apply under `epoch`: a
    /// high-water past the 46-bit timestamp layout, or a lease record of another term than the
    /// epoch's (a caller's bug). Both are `Permanent`.
    pub fn check(&self, epoch: Epoch) -> Result<(), BackendError> {
        match self {
            OracleCommand::AdvanceHighWater { at_least_ms } if *at_least_ms > PHYSICAL_MAX_MS => {
                Err(BackendError::Permanent(format!(
                    "high-water {at_least_ms} ms is past the 46-bit timestamp layout \
                     ({PHYSICAL_MAX_MS} ms)"
                )))
            }
            OracleCommand::ReplaceLeases { term, .. } if *term != epoch.hi() => {
                Err(BackendError::Permanent(format!(
                    "a lease record of term {term} written under epoch {epoch}: build it with \
                     OracleCommand::replace_leases"
                )))
            }
            _ => Ok(()),
        }
    }
}

impl OracleState {
    /// Applies one command with the merge rules: `max` for the high-water, `max` per key for
    /// the counters, and for the lease record a replace unless a later term's record is there.
    pub fn apply(&mut self, cmd: &OracleCommand) -> Merged {
        match cmd {
            OracleCommand::AdvanceHighWater { at_least_ms } => {
                merge_high_water(&mut self.high_water_ms, *at_least_ms);
                Merged::Included
            }
            OracleCommand::AdvanceSequences { ends } => {
                merge_sequences(&mut self.sequences, ends);
                Merged::Included
            }
            OracleCommand::ReplaceLeases { term, record } => {
                merge_leases((&mut self.lease_term, &mut self.leases), *term, record)
            }
        }
    }

    /// Whether this state, read after `cmd` was durably applied, includes it: `Fenced` if a
    /// later term's lease record won (the write was superseded), `Permanent` if the state lacks
    /// the command's effect (the backend lost the write, or reads another state than it applies
    /// to). Only the part `cmd` changes is read.
    pub fn includes(&self, cmd: &OracleCommand) -> Result<(), BackendError> {
        let lost = |what: String| {
            Err(BackendError::Permanent(format!(
                "broken invariant: {what}; the state machine does not apply the oracle's \
                 commands, or the backend reads another state than it applies to"
            )))
        };
        match cmd {
            OracleCommand::AdvanceHighWater { at_least_ms } => {
                let applied = self.high_water_ms;
                if applied < *at_least_ms {
                    return lost(format!(
                        "the high-water reads {applied} ms after {at_least_ms} ms was applied"
                    ));
                }
                Ok(())
            }
            OracleCommand::AdvanceSequences { ends } => {
                for (key, end) in ends {
                    let applied = self.sequences.get(key).copied().unwrap_or(0);
                    if applied < *end {
                        return lost(format!(
                            "counter {key:?} reads {applied} after it was advanced to {end}"
                        ));
                    }
                }
                Ok(())
            }
            OracleCommand::ReplaceLeases { term, .. } => match self.lease_term.cmp(term) {
                std::cmp::Ordering::Equal => Ok(()),
                std::cmp::Ordering::Greater => Err(BackendError::Fenced {
                    expected: Epoch::from_parts(*term, 0),
                    current: Epoch::from_parts(self.lease_term, 0),
                }),
                std::cmp::Ordering::Less => lost(format!(
                    "the lease record of term {term} was applied, but term {}'s is there",
                    self.lease_term
                )),
            },
        }
    }
}

/// The high-water's merge rule: `max`.
pub(crate) fn merge_high_water(stored_ms: &mut u64, at_least_ms: u64) {
    *stored_ms = (*stored_ms).max(at_least_ms);
}

/// The counters' merge rule: `max` per key.
pub(crate) fn merge_sequences(stored: &mut SeqCounters, ends: &[(String, u64)]) {
    for (key, end) in ends {
        let counter = stored.entry(key.clone()).or_insert(0);
        *counter = (*counter).max(*end);
    }
}

/// The lease record's merge rule: `record` of `term` replaces the stored `(term, record)`
/// unless the stored one is of a later term (a set computed by a deposed leader must not make
/// a newer leader's leases vanish).
pub(crate) fn merge_leases(stored: (&mut u64, &mut Vec<u8>), term: u64, record: &[u8]) -> Merged {
    let (stored_term, stored_record) = stored;
    if term < *stored_term {
        return Merged::Superseded {
            lease_term: *stored_term,
        };
    }
    *stored_term = term;
    stored_record.clear();
    stored_record.extend_from_slice(record);
    Merged::Included
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn hw(at_least_ms: u64) -> OracleCommand {
        OracleCommand::AdvanceHighWater { at_least_ms }
    }

    fn seq(ends: &[(&str, u64)]) -> OracleCommand {
        OracleCommand::AdvanceSequences {
            ends: ends.iter().map(|(k, e)| (k.to_string(), *e)).collect(),
        }
    }

    fn leases(term: u64, record: &[u8]) -> OracleCommand {
        OracleCommand::ReplaceLeases {
            term,
            record: record.to_vec(),
        }
    }

    #[test]
    fn the_high_water_takes_the_max() {
        let mut s = OracleState::default();
        assert_eq!(s.apply(&hw(10)), Merged::Included);
        assert_eq!(
            s.apply(&hw(5)),
            Merged::Included,
            "a lower value is absorbed"
        );
        assert_eq!(s.high_water_ms, 10);
        assert_eq!(s.includes(&hw(5)), Ok(()));
        assert!(matches!(
            s.includes(&hw(11)),
            Err(BackendError::Permanent(_))
        ));
    }

    #[test]
    fn counters_take_the_max_per_key() {
        let mut s = OracleState::default();
        s.apply(&seq(&[("a", 10), ("b", 4)]));
        s.apply(&seq(&[("a", 7), ("c", 1)]));
        let expected: SeqCounters = [("a", 10), ("b", 4), ("c", 1)]
            .map(|(k, v)| (k.to_string(), v))
            .into();
        assert_eq!(s.sequences, expected);
        assert_eq!(s.includes(&seq(&[("a", 9), ("b", 4)])), Ok(()));
        assert!(matches!(
            s.includes(&seq(&[("a", 1), ("d", 1)])),
            Err(BackendError::Permanent(_))
        ));
        assert_eq!(
            s.includes(&seq(&[("d", 0)])),
            Ok(()),
            "an absent key is at 0"
        );
    }

    #[test]
    fn a_lease_record_is_replaced_unless_a_later_term_wrote_it() {
        let mut s = OracleState::default();
        assert_eq!(s.apply(&leases(3, b"x")), Merged::Included);
        assert_eq!(
            s.apply(&leases(3, b"y")),
            Merged::Included,
            "same term replaces"
        );
        assert_eq!(
            s.apply(&leases(2, b"old")),
            Merged::Superseded { lease_term: 3 }
        );
        assert_eq!((s.lease_term, s.leases.as_slice()), (3, &b"y"[..]));
        assert_eq!(s.includes(&leases(3, b"anything")), Ok(()));
        assert_eq!(
            s.includes(&leases(2, b"old")),
            Err(BackendError::Fenced {
                expected: Epoch::from_parts(2, 0),
                current: Epoch::from_parts(3, 0),
            }),
            "a later term's record won"
        );
        assert!(matches!(
            s.includes(&leases(4, b"")),
            Err(BackendError::Permanent(_))
        ));
        assert_eq!(s.apply(&leases(5, b"")), Merged::Included);
        assert_eq!((s.lease_term, s.leases.len()), (5, 0));
    }

    #[test]
    fn a_command_changes_only_its_part() {
        let mut s = OracleState::default();
        s.apply(&hw(7));
        let before = s.clone();
        s.apply(&seq(&[("k", 1)]));
        assert_eq!((s.high_water_ms, s.lease_term), (7, 0));
        s.apply(&leases(1, b"r"));
        assert_eq!(s.sequences.len(), 1);
        assert_ne!(s, before);
    }

    #[test]
    fn check_refuses_an_out_of_range_high_water_and_a_foreign_term() {
        let epoch = Epoch::from_parts(3, 1);
        let permanent = |r| matches!(r, Err(BackendError::Permanent(_)));
        assert_eq!(hw(PHYSICAL_MAX_MS).check(epoch), Ok(()));
        assert!(permanent(hw(PHYSICAL_MAX_MS + 1).check(epoch)));
        let mine = OracleCommand::replace_leases(b"r".to_vec(), epoch);
        assert_eq!(mine, leases(3, b"r"));
        assert_eq!(mine.check(epoch), Ok(()));
        assert!(permanent(leases(2, b"r").check(epoch)));
        assert_eq!(seq(&[("k", u64::MAX)]).check(epoch), Ok(()));
    }

    fn command() -> impl Strategy<Value = OracleCommand> {
        let key = prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(str::to_owned);
        let ends = prop::collection::btree_map(key, 0..1_000u64, 0..4)
            .prop_map(|m| m.into_iter().collect::<SeqEnds>());
        prop_oneof![
            (0..1_000u64).prop_map(|at_least_ms| OracleCommand::AdvanceHighWater { at_least_ms }),
            ends.prop_map(|ends| OracleCommand::AdvanceSequences { ends }),
            (0..6u64, prop::collection::vec(any::<u8>(), 0..4))
                .prop_map(|(term, record)| OracleCommand::ReplaceLeases { term, record }),
        ]
    }

    fn applied(cmds: &[OracleCommand]) -> OracleState {
        let mut s = OracleState::default();
        for c in cmds {
            s.apply(c);
        }
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Nothing ever goes back, and after each apply the state includes the command unless
        /// a later term's lease record stayed, which `includes` reports as `Fenced`.
        #[test]
        fn apply_ratchets_and_includes_agrees(cmds in prop::collection::vec(command(), 0..40)) {
            let mut s = OracleState::default();
            for c in &cmds {
                let before = s.clone();
                let merged = s.apply(c);
                prop_assert!(s.high_water_ms >= before.high_water_ms);
                prop_assert!(s.lease_term >= before.lease_term);
                for (key, value) in &before.sequences {
                    prop_assert!(s.sequences[key] >= *value);
                }
                match merged {
                    Merged::Included => prop_assert_eq!(s.includes(c), Ok(())),
                    Merged::Superseded { lease_term } => {
                        prop_assert_eq!(&s, &before, "a superseded command changes nothing");
                        prop_assert_eq!(lease_term, s.lease_term);
                        let fenced = matches!(s.includes(c), Err(BackendError::Fenced { .. }));
                        prop_assert!(fenced);
                    }
                }
            }
        }

        /// Applying a command twice is applying it once.
        #[test]
        fn apply_is_idempotent(cmds in prop::collection::vec(command(), 0..20)) {
            let doubled: Vec<OracleCommand> =
                cmds.iter().flat_map(|c| [c.clone(), c.clone()]).collect();
            prop_assert_eq!(applied(&cmds), applied(&doubled));
        }

        /// The high-water and the counters do not depend on the order of the commands; the
        /// lease record is the one of the highest term (the last of that term, in log order).
        #[test]
        fn order_matters_only_within_a_lease_term(
            cmds in prop::collection::vec(command(), 0..30),
            seed in any::<u64>(),
        ) {
            let mut shuffled = cmds.clone();
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let (a, b) = (applied(&cmds), applied(&shuffled));
            prop_assert_eq!(a.high_water_ms, b.high_water_ms);
            prop_assert_eq!(&a.sequences, &b.sequences);
            prop_assert_eq!(a.lease_term, b.lease_term);
            let last_of_top_term = cmds.iter().rev().find_map(|c| match c {
                OracleCommand::ReplaceLeases { term, record } if *term == a.lease_term => {
                    Some(record.clone())
                }
                _ => None,
            });
            prop_assert_eq!(a.leases, last_of_top_term.unwrap_or_default());
        }
    }
}
