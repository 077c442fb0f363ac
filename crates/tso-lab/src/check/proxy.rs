//! A loopback TCP proxy for one directed peer link, which the checker can cut.
//!
//! Node A reaches node B's peer port through the proxy of the link A→B only (A's own
//! `/etc/hosts` maps B's name to this proxy's address), so cutting it partitions exactly that
//! direction. A cut blackholes: bytes are read and dropped, nothing is answered, as on a real
//! partition where packets vanish. When the link heals, connections that lived through the cut
//! are closed (their streams lost bytes) and both ends reconnect through the healed proxy.
//!
//! A link can also be slowed: every byte the target sends back (the replies to the requests
//! of the node that dialed) is held for a set time before it is passed on, in order. Requests
//! still arrive at once, so the target acts on them while their sender learns of it late.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bytes copied per read.
const BUFFER_BYTES: usize = 16 * 1024;
/// Chunks held back on one slowed connection at most (each up to `BUFFER_BYTES`: 4 MiB); a
/// full queue stops reading from the target until the oldest chunk is passed on.
const DELAYED_CHUNKS_MAX: usize = 256;

/// One directed link's proxy; dropping it stops accepting (live connections end on their own).
pub struct LinkProxy {
    cut: watch::Sender<bool>,
    delay: watch::Sender<Duration>,
    task: JoinHandle<()>,
}

impl LinkProxy {
    /// Listens on `listen` and forwards every connection to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> anyhow::Result<LinkProxy> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the link proxy on {listen}"))?;
        let (cut, cut_rx) = watch::channel(false);
        let (delay, delay_rx) = watch::channel(Duration::ZERO);
        let task = tokio::spawn(accept(listener, target, cut_rx, delay_rx));
        Ok(LinkProxy { cut, delay, task })
    }

    /// Blackholes the link (`true`) or heals it (`false`).
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    /// Holds every byte the target sends back for `delay` from now on (`Duration::ZERO`: none).
    pub fn set_reply_delay(&self, delay: Duration) {
        self.delay.send_replace(delay);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    cut: watch::Receiver<bool>,
    delay: watch::Receiver<Duration>,
) {
    while let Ok((inbound, _)) = listener.accept().await {
        let _ = inbound.set_nodelay(true);
        tokio::spawn(relay(inbound, target, cut.clone(), delay.clone()));
    }
}

/// Relays one connection until either side closes or a cut heals.
async fn relay(
    inbound: TcpStream,
    target: SocketAddr,
    mut cut: watch::Receiver<bool>,
    delay: watch::Receiver<Duration>,
) {
    if *cut.borrow_and_update() {
        blackhole(inbound, None, &mut cut).await;
        return;
    }
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = outbound.set_nodelay(true);
    let (mut in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    let forward = async {
        tokio::select! {
            _ = copy(&mut in_read, &mut out_write) => {}
            _ = copy_delayed(&mut out_read, &mut in_write, &delay) => {}
        }
    };
    tokio::select! {
        _ = forward => return,
        _ = cut.wait_for(|&c| c) => {}
    }
    let inbound = in_read.reunite(in_write).expect("halves of one stream");
    let outbound = out_read.reunite(out_write).expect("halves of one stream");
    blackhole(inbound, Some(outbound), &mut cut).await;
}

async fn copy(from: &mut tokio::net::tcp::OwnedReadHalf, to: &mut tokio::net::tcp::OwnedWriteHalf) {
    let mut buf = vec![0u8; BUFFER_BYTES];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Copies like [`copy`], holding each chunk for the link's reply delay as it was when the chunk
/// was read; chunks keep their order.
async fn copy_delayed(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    delay: &watch::Receiver<Duration>,
) {
    let (held, mut due) =
        tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(DELAYED_CHUNKS_MAX);
    let read = async move {
        let mut buf = vec![0u8; BUFFER_BYTES];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let at = tokio::time::Instant::now() + *delay.borrow();
                    if held.send((at, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write = async {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The reader ends first when the target closes (dropping its sender); what it held back
    // is still passed on.
    tokio::join!(read, write);
}

/// Reads and drops everything from both sides until the link heals, then closes both.
async fn blackhole(mut a: TcpStream, b: Option<TcpStream>, cut: &mut watch::Receiver<bool>) {
    let mut buf_a = vec![0u8; BUFFER_BYTES];
    let mut buf_b = vec![0u8; BUFFER_BYTES];
    let mut b = b;
    let (mut a_open, mut b_open) = (true, b.is_some());
    loop {
        tokio::select! {
            _ = cut.wait_for(|&c| !c) => return,
            n = a.read(&mut buf_a), if a_open => a_open = matches!(n, Ok(n) if n > 0),
            n = async { b.as_mut().expect("b is open").read(&mut buf_b).await }, if b_open => {
                b_open = matches!(n, Ok(n) if n > 0)
            }
            else => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An echo server on a free port.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, within: Duration) -> Option<()> {
        stream.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(within, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) if &buf == b"ping" => Some(()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_slowed_link_holds_replies_back_in_order() {
        let target = echo().await;
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = LinkProxy::start(listen, target).await.unwrap();
        let mut stream = TcpStream::connect(listen).await.unwrap();
        assert!(
            round_trip(&mut stream, Duration::from_secs(5))
                .await
                .is_some()
        );
        proxy.set_reply_delay(Duration::from_millis(300));
        let sent = tokio::time::Instant::now();
        stream.write_all(b"ab").await.unwrap();
        stream.write_all(b"cd").await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"abcd");
        assert!(sent.elapsed() >= Duration::from_millis(300));
        proxy.set_reply_delay(Duration::ZERO);
        assert!(
            round_trip(&mut stream, Duration::from_millis(250))
                .await
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_cut_blackholes_and_a_heal_restores_new_connections() {
        let target = echo().await;
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = LinkProxy::start(listen, target).await.unwrap();
        let mut live = TcpStream::connect(listen).await.unwrap();
        assert!(
            round_trip(&mut live, Duration::from_secs(5))
                .await
                .is_some()
        );

        proxy.set_cut(true);
        // Nothing comes back on the live connection, nor on a new one (no reset either: the
        // writes are accepted and vanish).
        assert!(
            round_trip(&mut live, Duration::from_millis(200))
                .await
                .is_none()
        );
        let mut during = TcpStream::connect(listen).await.unwrap();
        assert!(
            round_trip(&mut during, Duration::from_millis(200))
                .await
                .is_none()
        );

        proxy.set_cut(false);
        let mut after = TcpStream::connect(listen).await.unwrap();
        assert!(
            round_trip(&mut after, Duration::from_secs(5))
                .await
                .is_some()
        );
        // Connections that lived through the cut are closed, so their ends reconnect.
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(5), live.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    }
}
