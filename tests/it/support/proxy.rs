//! A loopback TCP proxy that can cut the first connection (or every one) after the server
//! has sent a given number of bytes ("the server dropped the connection in the middle of
//! a FETCH", "the link drops every few seconds"),
//! or every connection whose server data carries a marker ("this message never comes
//! through"), or the connection on which a client first sends a marker, before passing it
//! on ("the connection died as the MOVE was sent"), can rewrite the server's answers (to play Exchange's error texts),
//! records what clients sent (to check which commands a client used), counts connections
//! (to check that a session stayed open), and can play an
//! outage (every connection cut, new ones refused) until told to recover.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running proxy; it stops with the runtime that started it.
pub struct CuttingProxy {
    /// The port to connect to instead of the server's.
    pub port: u16,
    cuts: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    /// Connections open now, and the most ever open at once.
    open: Arc<(AtomicUsize, AtomicUsize)>,
    sent_by_clients: Arc<std::sync::Mutex<Vec<u8>>>,
    down: Arc<tokio::sync::watch::Sender<bool>>,
}

/// When the proxy cuts a connection.
#[derive(Clone)]
enum Cut {
    /// The first connection, after the server has sent this many bytes.
    FirstAfter(usize),
    /// Every connection, after the server has sent this many bytes through it.
    EveryAfter(usize),
    /// Every connection, as soon as the server's data holds this marker.
    OnMarker(Vec<u8>),
    /// The first connection whose client sends this marker, before it is passed on.
    OnClientMarker(Vec<u8>),
    /// Never; everything passes unchanged.
    Pass,
    /// Never; the server's `from` bytes are replaced by `to` (within one read).
    Rewrite(Vec<u8>, Vec<u8>),
}

impl CuttingProxy {
    /// Forwards to `127.0.0.1:target`; the first connection is closed once the server has
    /// sent `cut_after` bytes through it.
    pub async fn start(target: u16, cut_after: usize) -> CuttingProxy {
        Self::start_with(target, Cut::FirstAfter(cut_after)).await
    }

    /// Forwards to `127.0.0.1:target`; every connection is closed once the server has sent
    /// `cut_after` bytes through it (a link that keeps dropping).
    pub async fn start_cutting_every(target: u16, cut_after: usize) -> CuttingProxy {
        Self::start_with(target, Cut::EveryAfter(cut_after)).await
    }

    /// Forwards to `127.0.0.1:target`; any connection is closed, before the marker is
    /// passed on, when the server sends `marker` (plain IMAP only: TLS hides it).
    pub async fn start_cutting_on(target: u16, marker: &[u8]) -> CuttingProxy {
        Self::start_with(target, Cut::OnMarker(marker.to_vec())).await
    }

    /// Forwards to `127.0.0.1:target`; the first connection on which the client sends
    /// `marker` is closed before the marker reaches the server (plain IMAP only).
    pub async fn start_cutting_on_client(target: u16, marker: &[u8]) -> CuttingProxy {
        Self::start_with(target, Cut::OnClientMarker(marker.to_vec())).await
    }

    /// Forwards to `127.0.0.1:target`, cutting nothing (to count connections).
    pub async fn start_passing(target: u16) -> CuttingProxy {
        Self::start_with(target, Cut::Pass).await
    }

    /// Forwards to `127.0.0.1:target`, replacing `from` with `to` in what the server sends
    /// (plain IMAP only; a short `from` arrives within one read).
    pub async fn start_rewriting(target: u16, from: &[u8], to: &[u8]) -> CuttingProxy {
        Self::start_with(target, Cut::Rewrite(from.to_vec(), to.to_vec())).await
    }

    async fn start_with(target: u16, rule: Cut) -> CuttingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cuts = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let accepting = accepted.clone();
        let open = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let opening = open.clone();
        let armed = Arc::new(AtomicBool::new(true));
        let counter = cuts.clone();
        let sent_by_clients = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorder = sent_by_clients.clone();
        let down = Arc::new(tokio::sync::watch::channel(false).0);
        let outage = down.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut outage = outage.subscribe();
                if *outage.borrow() {
                    continue; // refused: dropped at once
                }
                accepting.fetch_add(1, Ordering::SeqCst);
                let now_open = opening.0.fetch_add(1, Ordering::SeqCst) + 1;
                opening.1.fetch_max(now_open, Ordering::SeqCst);
                let closing = opening.clone();
                let (cut, marker, rewrite) = match &rule {
                    Cut::FirstAfter(n) => (
                        armed.swap(false, Ordering::SeqCst).then_some(*n),
                        None,
                        None,
                    ),
                    Cut::EveryAfter(n) => (Some(*n), None, None),
                    Cut::OnMarker(m) => (None, Some(m.clone()), None),
                    Cut::Rewrite(from, to) => (None, None, Some((from.clone(), to.clone()))),
                    Cut::Pass | Cut::OnClientMarker(_) => (None, None, None),
                };
                let client_marker = match &rule {
                    Cut::OnClientMarker(m) => Some((m.clone(), armed.clone())),
                    _ => None,
                };
                let cut_by_client = Arc::new(tokio::sync::Notify::new());
                let cutting = cut_by_client.clone();
                let counter = counter.clone();
                let recorder = recorder.clone();
                tokio::spawn(async move {
                    // Counted closed when the client's side ends (the server's may linger).
                    let closed = Closed(closing);
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let client_counter = counter.clone();
                    let upstream = tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut client_marker =
                            client_marker.map(|(marker, armed)| (Watch::new(marker), armed));
                        while let Ok(n) = cr.read(&mut buf).await {
                            if let Some((watch, armed)) = &mut client_marker
                                && watch.seen(&buf[..n])
                                && armed.swap(false, Ordering::SeqCst)
                            {
                                client_counter.fetch_add(1, Ordering::SeqCst);
                                cutting.notify_one();
                                break;
                            }
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            recorder.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        drop(closed);
                    });
                    let downstream = async {
                        let mut sent = 0usize;
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut marker = marker.map(Watch::new);
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if let Some(watch) = &mut marker
                                && watch.seen(&buf[..n])
                            {
                                counter.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            if let Some(limit) = cut
                                && sent + n >= limit
                            {
                                let _ = cw.write_all(&buf[..limit - sent]).await;
                                counter.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            sent += n;
                            let chunk = match &rewrite {
                                Some((from, to)) => replace_all(&buf[..n], from, to),
                                None => buf[..n].to_vec(),
                            };
                            if cw.write_all(&chunk).await.is_err() {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = downstream => {}
                        _ = outage.wait_for(|down| *down) => {}
                        _ = cut_by_client.notified() => {}
                    }
                    let _ = cw.shutdown().await;
                    upstream.abort();
                });
            }
        });
        CuttingProxy {
            port,
            cuts,
            accepted,
            open,
            sent_by_clients,
            down,
        }
    }

    /// Starts (`true`) or ends (`false`) an outage: while it lasts, open connections are
    /// cut and new ones dropped.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    /// Everything clients have sent so far, as text.
    pub fn client_traffic(&self) -> String {
        String::from_utf8_lossy(&self.sent_by_clients.lock().unwrap()).into_owned()
    }

    /// How many connections were passed on to the server.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The most connections that were open at the same time.
    pub fn most_open_at_once(&self) -> usize {
        self.open.1.load(Ordering::SeqCst)
    }

    /// How many connections were cut.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

/// Counts a connection closed when dropped.
struct Closed(Arc<(AtomicUsize, AtomicUsize)>);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn replace_all(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

/// Watches one direction of a connection for a marker, also when it is split across reads.
struct Watch {
    marker: Vec<u8>,
    /// The last bytes read, as many as the marker has.
    window: Vec<u8>,
}

impl Watch {
    fn new(marker: Vec<u8>) -> Self {
        Watch {
            marker,
            window: Vec::new(),
        }
    }

    /// True when the marker is in what was read so far, up to and including `read`.
    fn seen(&mut self, read: &[u8]) -> bool {
        self.window.extend_from_slice(read);
        let seen = (self.window)
            .windows(self.marker.len())
            .any(|w| w == self.marker.as_slice());
        let keep = self.window.len().saturating_sub(self.marker.len());
        self.window.drain(..keep);
        seen
    }
}
