//! Loopback ports for servers a test starts in another process.
//!
//! A port picked by binding port 0 comes from the kernel's ephemeral range, which every
//! outgoing connection also draws its local port from: between the pick and the server's own
//! bind, a client connecting anywhere on the machine can take it ("Address already in use").
//! So ports are picked below that range, where no outgoing connection lands, at random (other
//! test processes pick too), checked free by a bind, and never handed out twice by one process.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// The lowest port picked.
const LOW: u16 = 10_000;

/// Ports this process handed out already.
static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// The start of the kernel's ephemeral port range (32768 when it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .filter(|&low: &u16| low > LOW + 1_000)
        .unwrap_or(32_768)
}

/// A port on 127.0.0.1 that was free a moment ago, below the ephemeral range.
pub fn free_port() -> u16 {
    let high = ephemeral_low();
    let span = u64::from(high - LOW);
    let mut state = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 32);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..10_000 {
        // xorshift: enough to spread picks of several processes.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let port = LOW + (state % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {high}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_distinct() {
        let high = ephemeral_low();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        assert!(ports.iter().all(|&p| (LOW..high).contains(&p)), "{ports:?}");
    }
}
