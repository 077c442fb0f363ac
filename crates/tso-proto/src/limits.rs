//! The protocol's limits on request fields (`docs/protocol.md`), defined once: the server
//! refuses past them with `INVALID_ARGUMENT`, the client refuses before sending, and the checker
//! and the bench draw their requests inside them. The count of one `GetTs` call is bounded by
//! the logical part of a timestamp (`tso_core::LOGICAL_COUNT`, 2^18).

/// Longest sequence key, in bytes (a key is 1 to this many bytes of UTF-8).
pub const SEQ_KEY_BYTES_MAX: usize = 128;

/// Most entries (distinct keys) of one `GetSeqBatch` call.
pub const SEQ_BATCH_KEYS_MAX: usize = 128;

/// Most values one sequence block may hold: the protocol's limit and the server's default for
/// `--seq-count-max` (a server may be configured lower, never higher).
pub const SEQ_COUNT_MAX: u32 = 65_536;

/// Longest stamping-lease holder, in bytes (a holder is 1 to this many opaque bytes).
pub const LEASE_HOLDER_BYTES_MAX: usize = 128;
