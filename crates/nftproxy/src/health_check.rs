//! Health-check node ports: for each LoadBalancer Service with
//! `externalTrafficPolicy: Local`, an HTTP server on its `healthCheckNodePort` that tells
//! load balancers whether this node has ready endpoints of it (200) or not (503), with
//! kube-proxy's body and headers.
//!
//! Invariant: after [`HealthCheckServers::sync`] exactly the given ports are served (except
//! those that could not be bound, which are retried on the next sync), and each answers
//! with the count of the last sync.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use hyper::StatusCode;
use nftproxy_model::HealthCheck;
use nftproxy_proxier::Monitor;
use tracing::{error, info};

use crate::http::{self, Answer};

/// One served health check.
struct Served {
    port: u16,
    addresses: Vec<IpAddr>,
    local_endpoints: Arc<AtomicUsize>,
    servers: Vec<tokio::task::AbortHandle>,
}

impl Drop for Served {
    fn drop(&mut self) {
        for server in &self.servers {
            server.abort();
        }
    }
}

/// The health-check servers, keyed by Service (namespace, name).
pub struct HealthCheckServers {
    monitor: Arc<Monitor>,
    served: BTreeMap<(String, String), Served>,
}

impl HealthCheckServers {
    /// No servers yet.
    pub fn new(monitor: Arc<Monitor>) -> HealthCheckServers {
        HealthCheckServers {
            monitor,
            served: BTreeMap::new(),
        }
    }

    /// Serves exactly `checks` on `addresses` (the node addresses that accept NodePorts;
    /// empty means every IPv4 address): closes the servers of Services that are gone or
    /// moved, opens new ones, and updates every count. Must run inside the tokio runtime.
    pub fn sync(&mut self, addresses: &[IpAddr], checks: &[HealthCheck]) {
        self.served.retain(|(namespace, name), s| {
            let keep = s.addresses == addresses
                && checks
                    .iter()
                    .any(|c| &c.namespace == namespace && &c.name == name && c.port == s.port);
            if !keep {
                info!(service = %format!("{namespace}/{name}"), port = s.port, "closing health check");
            }
            keep
        });
        for check in checks {
            let key = (check.namespace.clone(), check.name.clone());
            if let Some(existing) = self.served.get(&key) {
                existing
                    .local_endpoints
                    .store(check.local_endpoints, Ordering::Relaxed);
                continue;
            }
            match self.open(addresses, check) {
                Ok(opened) => {
                    info!(service = %format!("{}/{}", check.namespace, check.name), port = check.port, "serving health check");
                    self.served.insert(key, opened);
                }
                Err(e) => error!(
                    service = %format!("{}/{}", check.namespace, check.name),
                    port = check.port,
                    error = %e,
                    "cannot serve health check; retrying on the next sync"
                ),
            }
        }
    }

    fn open(&self, addresses: &[IpAddr], check: &HealthCheck) -> std::io::Result<Served> {
        // Built first, so that when a later address cannot be bound, dropping it stops
        // the servers already started on the earlier ones.
        let mut served = Served {
            port: check.port,
            addresses: addresses.to_vec(),
            local_endpoints: Arc::new(AtomicUsize::new(check.local_endpoints)),
            servers: Vec::new(),
        };
        let every = [IpAddr::V4(Ipv4Addr::UNSPECIFIED)];
        for &address in if addresses.is_empty() {
            &every[..]
        } else {
            addresses
        } {
            // Bound here, synchronously, so that a taken port is an error now.
            let listener = std::net::TcpListener::bind(SocketAddr::new(address, check.port))?;
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let handler = handler(
                check.namespace.clone(),
                check.name.clone(),
                served.local_endpoints.clone(),
                self.monitor.clone(),
            );
            served
                .servers
                .push(http::serve_on(listener, handler).abort_handle());
        }
        Ok(served)
    }

    /// The ports served now, by Service.
    #[cfg(test)]
    fn ports(&self) -> Vec<u16> {
        self.served.values().map(|s| s.port).collect()
    }
}

/// kube-proxy's answer: 200 when the Service has a ready endpoint here and the proxy is
/// healthy, else 503; the body names the Service and the count; the count also goes in
/// `X-Load-Balancing-Endpoint-Weight` for load balancers that weigh nodes by it.
fn handler(
    namespace: String,
    name: String,
    local_endpoints: Arc<AtomicUsize>,
    monitor: Arc<Monitor>,
) -> impl Fn(&str) -> Answer + Send + Sync {
    move |_path| {
        let count = local_endpoints.load(Ordering::Relaxed);
        let healthy = monitor.health.livez(SystemTime::now()).healthy;
        let status = if count > 0 && healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = format!(
            "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
            quoted(&namespace),
            quoted(&name),
        );
        let mut answer = Answer::json(status, body);
        answer
            .headers
            .push(("x-load-balancing-endpoint-weight", count.to_string()));
        answer
    }
}

/// A JSON string (namespace and name are DNS labels, but nothing here relies on that).
fn quoted(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, port: u16, local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            namespace: "ns".into(),
            name: name.into(),
            port,
            local_endpoints,
        }
    }

    #[test]
    fn the_answer_follows_the_count_and_the_proxys_health() {
        let monitor = Arc::new(Monitor::new(std::time::Duration::from_secs(30)));
        let count = Arc::new(AtomicUsize::new(2));
        let answer = handler("ns".into(), "web".into(), count.clone(), monitor.clone());
        let ok = answer("/");
        assert_eq!(ok.status, StatusCode::OK);
        assert_eq!(
            ok.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        assert!(
            ok.headers
                .contains(&("x-load-balancing-endpoint-weight", "2".into()))
        );
        assert!(
            ok.headers
                .contains(&("x-content-type-options", "nosniff".into()))
        );
        count.store(0, Ordering::Relaxed);
        assert_eq!(answer("/").status, StatusCode::SERVICE_UNAVAILABLE);
        // Endpoints, but a stalled proxy: 503 too.
        count.store(1, Ordering::Relaxed);
        monitor.health.queued(SystemTime::UNIX_EPOCH);
        let stalled = answer("/");
        assert_eq!(stalled.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(stalled.body.contains("\"serviceProxyHealthy\": false"));
    }

    #[tokio::test]
    async fn sync_opens_moves_and_closes_servers() {
        let monitor = Arc::new(Monitor::new(std::time::Duration::from_secs(30)));
        let mut servers = HealthCheckServers::new(monitor);
        let loopback = [IpAddr::from([127, 0, 0, 1])];
        let free = || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let (a, b) = (free(), free());
        servers.sync(&loopback, &[check("a", a, 1), check("b", b, 0)]);
        assert_eq!(servers.ports(), [a, b]);
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", a)).is_err(),
            "a is served"
        );
        // b moves to a new port; a goes away.
        let c = free();
        servers.sync(&loopback, &[check("b", c, 3)]);
        assert_eq!(servers.ports(), [c]);
        tokio::task::yield_now().await;
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", a)).is_ok(),
            "a is closed"
        );
    }

    #[tokio::test]
    async fn a_port_taken_on_one_address_leaves_none_open() {
        let monitor = Arc::new(Monitor::new(std::time::Duration::from_secs(30)));
        let mut servers = HealthCheckServers::new(monitor);
        let taken = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let addresses = [IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2])];
        servers.sync(&addresses, &[check("a", port, 1)]);
        assert!(servers.ports().is_empty());
        tokio::task::yield_now().await;
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The server started on the first address before the second failed is gone.
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
        // Once the port is free, the next sync serves it on both.
        drop(taken);
        servers.sync(&addresses, &[check("a", port, 1)]);
        assert_eq!(servers.ports(), [port]);
    }
}
