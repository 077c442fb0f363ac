//! What the integration test binaries of the tso crates share.
//!
//! Each crate's tests are one binary (`tests/it/main.rs`) with a module per topic, and libtest
//! runs a binary's tests on a shared thread pool. The process and cluster tests of one topic
//! must not compete for the machine with another topic's, as they never did when every topic
//! was a binary of its own (binaries run one after another): every test takes its topic's turn
//! first, with [`topic`]. The etcd backend's tests share a real etcd process ([`etcd`]).

pub mod etcd;
pub mod ports;

/// Whose turn it is: the topic (test module) whose tests are running, and how many of them.
struct Turn {
    topic: Option<&'static str>,
    running: usize,
}

static TURN: std::sync::Mutex<Turn> = std::sync::Mutex::new(Turn {
    topic: None,
    running: 0,
});
static TURN_CHANGED: std::sync::Condvar = std::sync::Condvar::new();

/// Held by a running test; the last test of a topic to finish hands the turn on.
pub struct TopicTurn;

/// Waits until no test of another topic runs, then counts this test in. Every test of this
/// binary calls it first with its `module_path!()`: the tests of one topic run side by side, as
/// when each topic was a test binary of its own, and tests of two topics never do, so the
/// process and cluster tests of one topic never compete for the machine with another's.
pub fn topic(module_path: &'static str) -> TopicTurn {
    let topic = module_path.split("::").nth(1).unwrap_or(module_path);
    let mut turn = TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    while turn.topic.is_some_and(|running| running != topic) {
        turn = TURN_CHANGED
            .wait(turn)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
    turn.topic = Some(topic);
    turn.running += 1;
    TopicTurn
}

impl Drop for TopicTurn {
    fn drop(&mut self) {
        let mut turn = TURN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        turn.running -= 1;
        if turn.running == 0 {
            turn.topic = None;
            TURN_CHANGED.notify_all();
        }
    }
}
