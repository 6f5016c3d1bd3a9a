//! A TCP proxy for peer traffic that a test can cut: every connection open
//! through it is closed at once (both directions, mid-message), as a
//! dropped link or a restarting NAT would. New connections go through
//! again right away, so the nodes reconnect by themselves.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

pub struct Proxy {
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    cuts: watch::Sender<u64>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port; forwards once a target is set.
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy listens");
        let addr = listener.local_addr().expect("proxy address");
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (cuts, _) = watch::channel(0u64);
        let accepting = tokio::spawn(accept(listener, target.clone(), cuts.clone()));
        Proxy { addr, target, cuts, accepting }
    }

    pub fn set_target(&self, target: SocketAddr) {
        *self.target.lock().expect("target") = Some(target);
    }

    /// Closes every connection open through the proxy now.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    /// How many times the proxy was cut.
    pub fn cuts(&self) -> u64 {
        *self.cuts.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}

async fn accept(listener: TcpListener, target: Arc<Mutex<Option<SocketAddr>>>, cuts: watch::Sender<u64>) {
    while let Ok((inbound, _)) = listener.accept().await {
        let Some(to) = *target.lock().expect("target") else { continue };
        let mut cut = cuts.subscribe();
        cut.borrow_and_update();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(to).await else { return };
            let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
            let (mut inbound, mut outbound) = (inbound, outbound);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cut.changed() => {}
            }
            // Both sockets dropped here: each side sees its connection end.
        });
    }
}
