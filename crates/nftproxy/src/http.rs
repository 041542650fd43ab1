//! nftproxy's HTTP servers: `/healthz` and `/livez` (kube-proxy's health port), `/metrics`
//! (and the metrics port's `/healthz` and `/proxyMode`), each a small hyper server.
//!
//! Invariant: handlers only read the [`Monitor`] (and count their answers); nothing served
//! here can change what the sync loop does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use nftproxy_proxier::Monitor;
use nftproxy_proxier::health::Report;
use nftproxy_proxier::metrics::connections_text;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

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

/// Serves `handler` (given the request path) on `address` until the runtime ends. As in
/// kube-proxy, a server that cannot bind (the port is taken, the address is not up yet)
/// does not stop the proxy: the failure is logged and binding is retried every 5 s.
pub fn serve(
    name: &'static str,
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
                        warn!(%address, %error, "cannot serve {name}; retrying every 5 s");
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                }
            }
        };
        info!(%address, "serving {name}");
        let _ = serve_on(listener, handler).await;
    });
}

/// Serves `handler` on a bound listener, one task per connection, until the returned
/// task is aborted (which closes the listener).
pub fn serve_on(
    listener: TcpListener,
    handler: impl Fn(&str) -> Answer + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    debug!(%error, "accept failed");
                    continue;
                }
            };
            let handler = handler.clone();
            let service = hyper::service::service_fn(move |request: Request<_>| {
                let answer = handler(request.uri().path());
                async move { Ok::<_, Infallible>(answer.into_response()) }
            });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    })
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
