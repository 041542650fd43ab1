//! Health-check node ports: for each LoadBalancer Service with
//! `externalTrafficPolicy: Local`, an HTTP server on its `healthCheckNodePort` that tells
//! load balancers whether this node has ready endpoints of it (200) or not (503), with
//! kube-proxy's body and headers.
//!
//! Invariant: after [`HealthCheckServers::sync`] exactly the wanted ports are served,
//! except those that could not be bound, which every later call (every sync, periodic
//! ones included) tries again; a server that goes is closed, its port free, before any
//! new one binds; each answers with the count of the last sync.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use hyper::StatusCode;
use nftproxy_model::HealthCheck;
use nftproxy_proxier::Monitor;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::http::{self, Answer, Connections};

/// One served health check.
struct Served {
    port: u16,
    addresses: Vec<IpAddr>,
    local_endpoints: Arc<AtomicUsize>,
    servers: Vec<JoinHandle<()>>,
}

impl Served {
    /// Stops every server and waits until their listeners are closed: aborting a task
    /// only asks for it to be dropped, and its port stays taken until it is.
    async fn close(mut self) {
        let servers = std::mem::take(&mut self.servers);
        for server in &servers {
            server.abort();
        }
        for server in servers {
            let _ = server.await;
        }
    }
}

impl Drop for Served {
    /// A server dropped without [`Served::close`] (the daemon ending) still stops.
    fn drop(&mut self) {
        for server in &self.servers {
            server.abort();
        }
    }
}

/// (namespace, name) of a Service.
type ServiceKey = (String, String);

/// The health-check servers, keyed by Service.
pub struct HealthCheckServers {
    monitor: Arc<Monitor>,
    connections: Arc<Connections>,
    served: BTreeMap<ServiceKey, Served>,
    /// Where and what the last build wants served.
    addresses: Vec<IpAddr>,
    checks: Vec<HealthCheck>,
    /// Why each wanted check is not served, as last logged (each cause is logged once).
    failed: BTreeMap<ServiceKey, String>,
}

impl HealthCheckServers {
    /// No servers yet; their connections admitted by `connections`.
    pub fn new(monitor: Arc<Monitor>, connections: Arc<Connections>) -> HealthCheckServers {
        HealthCheckServers {
            monitor,
            connections,
            served: BTreeMap::new(),
            addresses: Vec::new(),
            checks: Vec::new(),
            failed: BTreeMap::new(),
        }
    }

    /// From now on, serves `checks` on `addresses` (the node addresses that accept
    /// NodePorts; empty means every IPv4 address).
    pub fn want(&mut self, addresses: Vec<IpAddr>, checks: Vec<HealthCheck>) {
        self.addresses = addresses;
        self.checks = checks;
    }

    /// Serves exactly what is wanted: closes the servers of Services that are gone or
    /// moved, opens the missing ones (also those that failed before), and updates every
    /// count. Must run inside the tokio runtime.
    pub async fn sync(&mut self) {
        let mut closing = Vec::new();
        let served = std::mem::take(&mut self.served);
        for ((namespace, name), s) in served {
            let keep = s.addresses == self.addresses
                && self
                    .checks
                    .iter()
                    .any(|c| c.namespace == namespace && c.name == name && c.port == s.port);
            if keep {
                self.served.insert((namespace, name), s);
            } else {
                info!(service = %format!("{namespace}/{name}"), port = s.port, "closing health check");
                closing.push(s);
            }
        }
        for s in closing {
            s.close().await;
        }
        let wanted: Vec<ServiceKey> = self
            .checks
            .iter()
            .map(|c| (c.namespace.clone(), c.name.clone()))
            .collect();
        self.failed.retain(|key, _| wanted.contains(key));
        for check in &self.checks {
            let key = (check.namespace.clone(), check.name.clone());
            let service = format!("{}/{}", check.namespace, check.name);
            if let Some(existing) = self.served.get(&key) {
                existing
                    .local_endpoints
                    .store(check.local_endpoints, Ordering::Relaxed);
                continue;
            }
            match open(&self.monitor, &self.connections, &self.addresses, check).await {
                Ok(opened) => {
                    info!(%service, port = check.port, "serving health check");
                    self.failed.remove(&key);
                    self.served.insert(key, opened);
                }
                Err(e) => {
                    let error = e.to_string();
                    if self.failed.get(&key) != Some(&error) {
                        warn!(%service, port = check.port, %error, "cannot serve health check; retrying on every sync");
                        self.failed.insert(key, error);
                    }
                }
            }
        }
        self.monitor
            .metrics
            .health_check_ports(self.served.len(), self.failed.len());
    }

    /// The ports served now, by Service.
    #[cfg(test)]
    fn ports(&self) -> Vec<u16> {
        self.served.values().map(|s| s.port).collect()
    }
}

/// Binds `check`'s port on every address (or on every IPv4 address when none are given)
/// and serves it; binds nothing when one address cannot be bound.
async fn open(
    monitor: &Arc<Monitor>,
    connections: &Arc<Connections>,
    addresses: &[IpAddr],
    check: &HealthCheck,
) -> std::io::Result<Served> {
    let mut served = Served {
        port: check.port,
        addresses: addresses.to_vec(),
        local_endpoints: Arc::new(AtomicUsize::new(check.local_endpoints)),
        servers: Vec::new(),
    };
    let every = [IpAddr::V4(Ipv4Addr::UNSPECIFIED)];
    let bind_to = if addresses.is_empty() {
        &every[..]
    } else {
        addresses
    };
    for &address in bind_to {
        let listener = match bind(SocketAddr::new(address, check.port)) {
            Ok(listener) => listener,
            Err(e) => {
                // The servers started on the earlier addresses go, so that the next try
                // finds their ports free.
                served.close().await;
                return Err(e);
            }
        };
        let handler = handler(
            check.namespace.clone(),
            check.name.clone(),
            served.local_endpoints.clone(),
            monitor.clone(),
        );
        let server = connections.server("health-check");
        served.servers.push(http::serve_on(
            listener,
            server,
            connections.clone(),
            handler,
        ));
    }
    Ok(served)
}

/// Binds now, synchronously, so that a taken port is an error here.
fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
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
        monitor.health.updated(SystemTime::now());
        monitor.health.queued(SystemTime::UNIX_EPOCH);
        let stalled = answer("/");
        assert_eq!(stalled.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(stalled.body.contains("\"serviceProxyHealthy\": false"));
    }

    /// Wants `checks` on `addresses`, then serves them.
    async fn serve(servers: &mut HealthCheckServers, addresses: &[IpAddr], checks: &[HealthCheck]) {
        servers.want(addresses.to_vec(), checks.to_vec());
        servers.sync().await;
    }

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    fn servers() -> HealthCheckServers {
        let monitor = Arc::new(Monitor::new(std::time::Duration::from_secs(30)));
        let connections =
            Connections::new(http::Caps::for_open_files(1024), monitor.metrics.clone());
        HealthCheckServers::new(monitor, connections)
    }

    #[tokio::test]
    async fn sync_opens_moves_and_closes_servers() {
        let mut servers = servers();
        let loopback = [IpAddr::from([127, 0, 0, 1])];
        let (a, b) = (free_port(), free_port());
        serve(
            &mut servers,
            &loopback,
            &[check("a", a, 1), check("b", b, 0)],
        )
        .await;
        assert_eq!(servers.ports(), [a, b]);
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", a)).is_err(),
            "a is served"
        );
        // b moves to a new port; a goes away, and its port is free when sync returns.
        let c = free_port();
        serve(&mut servers, &loopback, &[check("b", c, 3)]).await;
        assert_eq!(servers.ports(), [c]);
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", a)).is_ok(),
            "a is closed"
        );
    }

    #[tokio::test]
    async fn a_server_moving_from_every_address_to_the_node_address_keeps_its_port() {
        // Before the Node is known the port is served on every address; once it is, on
        // the node's: the old listener must be closed before the new one binds.
        let mut servers = servers();
        let port = free_port();
        for _ in 0..20 {
            serve(&mut servers, &[], &[check("a", port, 1)]).await;
            assert_eq!(servers.ports(), [port]);
            serve(
                &mut servers,
                &[IpAddr::from([127, 0, 0, 1])],
                &[check("a", port, 1)],
            )
            .await;
            assert_eq!(servers.ports(), [port], "moved to 127.0.0.1");
        }
    }

    #[tokio::test]
    async fn a_port_taken_on_one_address_leaves_none_open_and_is_retried_by_the_next_sync() {
        let mut servers = servers();
        let taken = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let addresses = [IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2])];
        serve(&mut servers, &addresses, &[check("a", port, 1)]).await;
        assert!(servers.ports().is_empty());
        let ports = |servers: &HealthCheckServers| {
            let text = servers.monitor.metrics.render();
            ["served", "unbound"].map(|state| {
                let series = format!("nftproxy_health_check_node_ports{{state=\"{state}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(&series))
                    .map(str::to_owned)
            })
        };
        assert_eq!(ports(&servers), [Some("0".into()), Some("1".into())]);
        // The server started on the first address before the second failed is gone.
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
        // Still taken: the retry fails again (and logs nothing new).
        servers.sync().await;
        assert!(servers.ports().is_empty());
        // Once the port is free, the next sync serves it on both, with nothing changed.
        drop(taken);
        servers.sync().await;
        assert_eq!(servers.ports(), [port]);
        assert_eq!(ports(&servers), [Some("1".into()), Some("0".into())]);
    }
}
