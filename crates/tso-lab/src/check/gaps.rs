//! What each fault cost the clients: the longest stretch around it in which no call of the
//! clients that follow the leader succeeded. It is a figure for the report, never a verdict:
//! how long an election takes depends on the machine.

use super::history::Answered;

/// The end times of every counted successful call, sorted: the instants the service answered.
pub struct Answers(Vec<u64>);

impl Answers {
    pub fn new<C: Answered>(calls: &[C], counts: impl Fn(&C) -> bool) -> Answers {
        let mut ends: Vec<u64> = calls
            .iter()
            .filter(|c| c.succeeded() && counts(c))
            .map(Answered::end_ns)
            .collect();
        ends.sort_unstable();
        Answers(ends)
    }

    /// The longest stretch of `from_ns..to_ns` without an answer: between two successive
    /// answers, from `from_ns` to the first, and from the last to `to_ns`. The stretch that
    /// holds `from_ns` is counted from the last answer before it, so a gap that began just
    /// before the fault (say, a kill that landed between two calls) is counted whole.
    pub fn longest_gap_ns(&self, from_ns: u64, to_ns: u64) -> u64 {
        if to_ns <= from_ns {
            return 0;
        }
        let first = self.0.partition_point(|&end| end < from_ns);
        let mut previous = if first > 0 {
            self.0[first - 1]
        } else {
            from_ns
        };
        let mut longest = 0;
        for &end in self.0[first..].iter().take_while(|&&end| end <= to_ns) {
            longest = longest.max(end - previous);
            previous = end;
        }
        longest.max(to_ns - previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Done(u64, bool);

    impl Answered for Done {
        fn client(&self) -> u32 {
            0
        }
        fn end_ns(&self) -> u64 {
            self.0
        }
        fn succeeded(&self) -> bool {
            self.1
        }
    }

    #[test]
    fn the_longest_stretch_without_an_answer_is_found() {
        let calls = [
            Done(100, true),
            Done(200, true),
            Done(250, false),
            Done(900, true),
            Done(950, true),
        ];
        let answers = Answers::new(&calls, |_| true);
        // 200..900: the failed call at 250 does not count as an answer.
        assert_eq!(answers.longest_gap_ns(150, 1_000), 700);
        // The stretch holding the window's start counts from the answer before it.
        assert_eq!(answers.longest_gap_ns(300, 1_000), 700);
        // The tail after the last answer counts up to the window's end.
        assert_eq!(answers.longest_gap_ns(940, 1_500), 550);
        // No answer at all: the whole window.
        assert_eq!(
            Answers::new(&calls[..0], |_| true).longest_gap_ns(10, 60),
            50
        );
        assert_eq!(answers.longest_gap_ns(60, 10), 0);
    }
}
