//! nftproxy's HTTP servers: `/healthz` and `/livez` (kube-proxy's health port), `/metrics`
//! (and the metrics port's `/healthz` and `/proxyMode`), each a small hyper server.
//!
//! They face the network: a request head must arrive within [`HEADER_READ_TIMEOUT`], no
//! connection lives longer than [`MAX_CONNECTION_AGE`], a head over 16 KiB is answered
//! 431, connections are capped ([`Connections`]), and a failed accept backs off.
//!
//! Invariant: handlers only read the [`Monitor`] (and count their answers); nothing served
//! here can change what the sync loop does, or take the descriptors it needs.

mod connections;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use nftproxy_proxier::Monitor;
use nftproxy_proxier::health::Report;
use nftproxy_proxier::metrics::connections_text;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

pub use self::connections::{Caps, Connections, Server, Slot};
use crate::counters::Counters;

/// A response: status, content type, body, extra headers.
pub struct Answer {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
}

impl Answer {
    fn text(status: StatusCode, body: impl Into<String>) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// A JSON answer with kube-proxy's `nosniff` header.
    pub fn json(status: StatusCode, body: String) -> Answer {
        Answer {
            status,
            content_type: "application/json",
            body,
            headers: vec![("x-content-type-options", "nosniff".to_owned())],
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        response
    }
}

/// How long a client may take to send a request head, also the first on a connection
/// and each after a kept-alive one: an idle or slow connection is closed after it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest any connection stays open, whatever it does (a request body or a response
/// that never ends).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// The largest request head read; a larger one is answered 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The most headers in a request head; more are answered 431.
const MAX_HEADERS: usize = 64;
/// Failed accepts back off from this long …
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
/// … doubling up to this.
const ACCEPT_BACKOFF_MOST: Duration = Duration::from_secs(1);

/// Serves `handler` (given the request path) on `address` until the runtime ends. As in
/// kube-proxy, a server that cannot bind (the port is taken, the address is not up yet)
/// does not stop the proxy: the failure is logged and binding is retried every 5 s.
pub fn serve(
    server: Server,
    connections: Arc<Connections>,
    address: SocketAddr,
    handler: impl Fn(&str) -> Answer + Send + Sync + 'static,
) {
    tokio::spawn(async move {
        let mut failed = false;
        let listener = loop {
            match TcpListener::bind(address).await {
                Ok(listener) => break listener,
                Err(error) => {
                    if !std::mem::replace(&mut failed, true) {
                        warn!(%address, %error, "cannot serve {}; retrying every 5 s", server.label());
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        info!(%address, "serving {}", server.label());
        let _ = serve_on(listener, server, connections, handler).await;
    });
}

/// Serves `handler` on a bound listener, one task per connection admitted by
/// `connections`, until the returned task is aborted (which closes the listener).
pub fn serve_on(
    listener: TcpListener,
    server: Server,
    connections: Arc<Connections>,
    handler: impl Fn(&str) -> Answer + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        let mut backoff = ACCEPT_BACKOFF_FIRST;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => {
                    backoff = ACCEPT_BACKOFF_FIRST;
                    stream
                }
                Err(error) => {
                    // Out of descriptors or buffers, the listener stays readable: trying
                    // again at once would spin. Back off, and let closing connections
                    // give their descriptors back.
                    let name = accept_error_name(&error);
                    connections
                        .metrics()
                        .http_accept_failed(server.label(), name);
                    debug!(%error, server = server.label(), "accept failed; backing off {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MOST);
                    continue;
                }
            };
            let (slot, displaced) = connections.admit(&server);
            tokio::spawn(connection(stream, slot, displaced, handler.clone()));
            // Connections displaced by this one close on their own tasks: let them run
            // before the next accept takes another descriptor.
            tokio::task::yield_now().await;
        }
    })
}

/// Serves one connection until the client is done, its head is late, it gets too old,
/// or a newer connection displaces it.
async fn connection<H: Fn(&str) -> Answer + Send + Sync + 'static>(
    stream: TcpStream,
    slot: Arc<Slot>,
    mut displaced: tokio::sync::oneshot::Receiver<()>,
    handler: Arc<H>,
) {
    let too_old = tokio::time::Instant::now() + MAX_CONNECTION_AGE;
    // Until its first byte a connection is a socket and this task: the parser's buffers
    // (16 KiB) are only allocated for one that sends something.
    let first_byte = tokio::time::timeout(HEADER_READ_TIMEOUT, stream.readable());
    let shed = tokio::select! {
        waited = first_byte => match waited {
            Ok(_) => None,
            Err(_) => Some("header_timeout"),
        },
        _ = &mut displaced => Some("over_cap"),
    };
    if let Some(reason) = shed {
        slot.shed(reason);
        return;
    }
    let active = slot.clone();
    let service = hyper::service::service_fn(move |request: Request<_>| {
        active.active();
        let answer = handler(request.uri().path());
        async move { Ok::<_, Infallible>(answer.into_response()) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .serve_connection(TokioIo::new(stream), service);
    let shed = tokio::select! {
        result = served => match result {
            Err(error) if error.is_timeout() => Some("header_timeout"),
            _ => None,
        },
        _ = displaced => Some("over_cap"),
        () = tokio::time::sleep_until(too_old) => Some("max_age"),
    };
    if let Some(reason) = shed {
        slot.shed(reason);
    }
}

/// The errno name of a failed accept, as the metrics label it.
fn accept_error_name(error: &std::io::Error) -> &'static str {
    use rustix::io::Errno;
    match Errno::from_io_error(error) {
        Some(Errno::MFILE) => "EMFILE",
        Some(Errno::NFILE) => "ENFILE",
        Some(Errno::NOBUFS) => "ENOBUFS",
        Some(Errno::NOMEM) => "ENOMEM",
        Some(Errno::CONNABORTED) => "ECONNABORTED",
        _ => "other",
    }
}

fn not_found(path: &str) -> Answer {
    Answer::text(
        StatusCode::NOT_FOUND,
        format!("404 page not found: {path}\n"),
    )
}

fn health_answer(report: Report) -> Answer {
    let status = if report.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Answer::json(status, report.body)
}

/// kube-proxy's health port: `/healthz` and `/livez`.
pub fn health_handler(monitor: Arc<Monitor>) -> impl Fn(&str) -> Answer + Send + Sync {
    move |path| {
        let now = SystemTime::now();
        match path {
            "/healthz" => {
                let report = monitor.health.healthz(now);
                monitor.metrics.healthz_answered(report.code());
                health_answer(report)
            }
            "/livez" => {
                let report = monitor.health.livez(now);
                monitor.metrics.livez_answered(report.code());
                health_answer(report)
            }
            other => not_found(other),
        }
    }
}

/// kube-proxy's metrics port: `/metrics`, plus its `/healthz` ("ok") and `/proxyMode`.
/// With `counters`, `/metrics` also reads the kernel's connection counters, on a thread
/// that may block (the read is a few netlink dumps).
pub fn metrics_handler(
    monitor: Arc<Monitor>,
    counters: Option<Arc<Counters>>,
) -> impl Fn(&str) -> Answer + Send + Sync {
    move |path| match path {
        "/metrics" => {
            let mut body = monitor.metrics.render();
            if let Some(counters) = &counters {
                match tokio::task::block_in_place(|| counters.read()) {
                    Ok(connections) => body.push_str(&connections_text(&connections)),
                    Err(error) => warn!(%error, "cannot read the connection counters"),
                }
            }
            Answer {
                status: StatusCode::OK,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body,
                headers: Vec::new(),
            }
        }
        "/healthz" => Answer::text(StatusCode::OK, "ok"),
        "/proxyMode" => Answer::text(StatusCode::OK, "nftables"),
        other => not_found(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nftproxy_proxier::metrics::Metrics;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server answering "ok" on loopback within `caps`; its address and metrics.
    async fn server(caps: Caps) -> (SocketAddr, Metrics) {
        let metrics = Metrics::new();
        let connections = Connections::new(caps, metrics.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let server = connections.server("test");
        serve_on(listener, server, connections, |_| {
            Answer::text(StatusCode::OK, "ok")
        });
        (address, metrics)
    }

    /// Everything the server sends until it closes the connection.
    async fn until_closed(stream: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    fn sample(metrics: &Metrics, series: &str) -> u64 {
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_answered_431() {
        let (address, _) = server(Caps::for_open_files(1024)).await;
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let big = "x".repeat(MAX_HEAD_BYTES);
        let request = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n");
        // The server may close before it read everything: a failed write is fine.
        let _ = stream.write_all(request.as_bytes()).await;
        let answer = until_closed(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_head_not_sent_in_time_closes_the_connection() {
        let (address, metrics) = server(Caps::for_open_files(1024)).await;
        let mut idle = TcpStream::connect(address).await.expect("connect");
        let mut slow = TcpStream::connect(address).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        // Kept alive after its answer, then idle: the next head is late too.
        let mut kept = TcpStream::connect(address).await.expect("connect");
        kept.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        // Time only moves while every task waits: the server's timer fires, not ours.
        assert_eq!(until_closed(&mut idle).await, "");
        assert_eq!(until_closed(&mut slow).await, "");
        let answered = until_closed(&mut kept).await;
        assert!(answered.starts_with("HTTP/1.1 200 OK"), "{answered}");
        let series =
            r#"nftproxy_http_connections_closed_total{reason="header_timeout",server="test"}"#;
        assert_eq!(sample(&metrics, series), 3);
    }

    #[tokio::test]
    async fn over_the_cap_the_idle_connection_gives_way_to_a_request() {
        let caps = Caps {
            total: 2,
            per_server: 2,
        };
        let (address, metrics) = server(caps).await;
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(TcpStream::connect(address).await.expect("connect"));
        }
        let mut request = TcpStream::connect(address).await.expect("connect");
        request
            .write_all(b"GET / HTTP/1.0\r\n\r\n")
            .await
            .expect("write");
        let answer = until_closed(&mut request).await;
        assert!(answer.starts_with("HTTP/1.0 200 OK"), "{answer}");
        // The first idle connection was closed to make room; the second was not.
        assert_eq!(until_closed(&mut idle[0]).await, "");
        let series = r#"nftproxy_http_connections_closed_total{reason="over_cap",server="test"}"#;
        assert_eq!(sample(&metrics, series), 1);
        let mut byte = [0u8; 1];
        let still_open = tokio::time::timeout(Duration::from_millis(200), idle[1].read(&mut byte));
        assert!(
            still_open.await.is_err(),
            "the second idle connection stays"
        );
    }

    /// Requests as clients write them, mutated (bytes flipped and inserted, lines cut,
    /// lengths rewritten) or arbitrary, sent to `/healthz`'s server: each is answered or
    /// the connection closed, promptly, and the server goes on answering.
    #[test]
    fn mutated_requests_are_answered_or_closed_and_the_server_goes_on() {
        use proptest::prelude::*;
        use std::io::{Read, Write};

        const SEEDS: &[&[u8]] = &[
            b"GET /healthz HTTP/1.1\r\nHost: node\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\n\r\n",
            b"GET /livez HTTP/1.0\r\n\r\n",
            b"GET http://node:10256/healthz?x=%ff HTTP/1.1\r\nHost: node\r\nConnection: keep-alive\r\n\r\nGET /livez HTTP/1.1\r\nHost: node\r\n\r\n",
            b"POST /healthz HTTP/1.1\r\nHost: node\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
        ];
        const TOKENS: &[&[u8]] = &[
            b"\r\n",
            b"\n",
            b": ",
            b" ",
            b"\0",
            b"%",
            b"\xff",
            b"Content-Length: 18446744073709551616\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"ffffffffffffffff\r\n",
            b"HTTP/2.0",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ];
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let monitor = Arc::new(Monitor::new(Duration::from_secs(30)));
        let address = runtime.block_on(async {
            let connections = Connections::new(Caps::for_open_files(1024), monitor.metrics.clone());
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let address = listener.local_addr().expect("address");
            serve_on(
                listener,
                connections.server("healthz"),
                connections,
                health_handler(monitor.clone()),
            );
            address
        });
        let edit = (
            any::<usize>(),
            prop_oneof![
                proptest::sample::select(TOKENS).prop_map(<[u8]>::to_vec),
                proptest::collection::vec(any::<u8>(), 1..6),
            ],
            any::<bool>(),
        );
        let requests = prop_oneof![
            9 => (0..SEEDS.len(), proptest::collection::vec(edit, 0..6)).prop_map(|(seed, edits)| {
                let mut bytes = SEEDS[seed].to_vec();
                for (at, inserted, replace) in edits {
                    let at = at % bytes.len().max(1);
                    let end = if replace { (at + inserted.len()).min(bytes.len()) } else { at };
                    bytes.splice(at..end, inserted);
                }
                bytes
            }),
            1 => proptest::collection::vec(any::<u8>(), 0..300),
        ];
        // Sends `request`, then (when `end`) closes the sending side: the server answers
        // what it read whole, and closes.
        let exchange = |request: &[u8], end: bool| -> std::io::Result<Vec<u8>> {
            let mut stream = std::net::TcpStream::connect(address)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            // The server may close before it read everything.
            let _ = stream.write_all(request);
            if end {
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
            let mut answer = Vec::new();
            match stream.read_to_end(&mut answer) {
                Err(e) if e.kind() != std::io::ErrorKind::ConnectionReset => Err(e),
                _ => Ok(answer),
            }
        };
        let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
            cases: 400,
            failure_persistence: None,
            ..Default::default()
        });
        let result = runner.run(&requests, |request| {
            let answer = exchange(&request, true);
            prop_assert!(answer.is_ok(), "no answer and not closed: {:?}", answer);
            let answer = answer.unwrap_or_default();
            prop_assert!(
                answer.is_empty() || answer.starts_with(b"HTTP/1."),
                "{:?}",
                String::from_utf8_lossy(&answer)
            );
            Ok(())
        });
        if let Err(failure) = result {
            panic!("{failure}");
        }
        let answer = exchange(SEEDS[1], false).expect("answered");
        assert!(
            answer.starts_with(b"HTTP/1.0 200 OK"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
}
