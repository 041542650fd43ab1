//! An in-process Kubernetes API server for tests: the list and watch HTTP protocol for
//! Services, EndpointSlices and Nodes, as a real client (kube-rs) sees it.
//!
//! Invariant: every object change gets the next resourceVersion and is kept in a history,
//! so a watch resumed from any version after the last [`FakeApi::compact`] sees exactly
//! the changes it missed, and one from before gets `410 Gone`, as from a real API server.
//!
//! What it speaks, over HTTP or (started with [`FakeApi::start_tls`]) HTTPS with a CA of
//! its own: paginated lists (`limit`, `continue`, served from a snapshot taken at
//! the first page), label selectors (`k`, `!k`, `k=v`, `k==v`, `k!=v`), field selectors
//! on `metadata.name` and `metadata.namespace`, chunked watch streams of JSON lines
//! (`ADDED`, `MODIFIED`, `DELETED` — also when an object stops matching the selector —,
//! `BOOKMARK` when asked for, `ERROR` 410), `timeoutSeconds`. What tests can do to it:
//! change objects, drop every open connection, compact the history, refuse requests.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// A resource the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// `v1` Services.
    Services,
    /// `discovery.k8s.io/v1` EndpointSlices.
    EndpointSlices,
    /// `v1` Nodes.
    Nodes,
    /// `networking.k8s.io/v1` ServiceCIDRs.
    ServiceCidrs,
}

impl Resource {
    const ALL: [Resource; 4] = [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Nodes,
        Resource::ServiceCidrs,
    ];

    fn path(self) -> &'static str {
        match self {
            Resource::Services => "/api/v1/services",
            Resource::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Resource::Nodes => "/api/v1/nodes",
            Resource::ServiceCidrs => "/apis/networking.k8s.io/v1/servicecidrs",
        }
    }

    fn from_path(path: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.path() == path)
    }

    fn from_kind(kind: &str) -> Option<Resource> {
        match kind {
            "Service" => Some(Resource::Services),
            "EndpointSlice" => Some(Resource::EndpointSlices),
            "Node" => Some(Resource::Nodes),
            "ServiceCIDR" => Some(Resource::ServiceCidrs),
            _ => None,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Nodes => "Node",
            Resource::ServiceCidrs => "ServiceCIDR",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::Services | Resource::Nodes => "v1",
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            Resource::ServiceCidrs => "networking.k8s.io/v1",
        }
    }

    /// Whether its objects live in a namespace.
    fn namespaced(self) -> bool {
        matches!(self, Resource::Services | Resource::EndpointSlices)
    }
}

/// (resource, namespace, name)
type Key = (Resource, String, String);

/// One change, as watchers are told about it.
struct Change {
    resource_version: u64,
    resource: Resource,
    old: Option<Value>,
    new: Option<Value>,
}

/// An open watch stream.
struct Watch {
    resource: Resource,
    filter: Filter,
    bookmarks: bool,
    events: mpsc::UnboundedSender<Bytes>,
}

/// An object and its JSON text.
struct Stored {
    value: Value,
    json: String,
}

impl Stored {
    fn new(value: Value) -> Arc<Stored> {
        let json = value.to_string();
        Arc::new(Stored { value, json })
    }

    fn into_value(stored: Arc<Stored>) -> Value {
        Arc::try_unwrap(stored).map_or_else(|shared| shared.value.clone(), |s| s.value)
    }
}

#[derive(Default)]
struct State {
    resource_version: u64,
    /// Shared, so that listing a large cluster copies no object, and serialized once,
    /// as the API server's watch cache keeps them.
    objects: BTreeMap<Key, Arc<Stored>>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get `410 Gone`.
    compacted: u64,
    watches: Vec<Watch>,
    /// Unread pages of paginated lists, by continue token.
    pages: HashMap<String, (u64, Vec<Arc<Stored>>)>,
    next_token: u64,
    connections: Vec<AbortHandle>,
    available: bool,
    /// The `Authorization` header of every request (`None` when absent).
    authorizations: Vec<Option<String>>,
    /// Resources whose requests are answered `503` even while available.
    refused: Vec<Resource>,
    /// Resources answered `404`, as by an API server that does not have them.
    unserved: Vec<Resource>,
    /// Resources whose list requests are answered only after this long.
    delays: HashMap<Resource, Duration>,
    requests: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The running fake; dropping it stops the server.
pub struct FakeApi {
    address: SocketAddr,
    /// The CA that signed the serving certificate, when the server speaks HTTPS.
    ca_pem: Option<String>,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApi {
    /// Starts the server on a free loopback port, on its own thread and runtime, speaking
    /// plain HTTP.
    pub fn start() -> FakeApi {
        FakeApi::serve(None)
    }

    /// Starts the server speaking HTTPS, as a real API server does: its certificate, for
    /// `127.0.0.1` and `localhost`, is signed by a CA of its own ([`FakeApi::ca_pem`], what
    /// a cluster hands a pod as the ServiceAccount's `ca.crt`).
    pub fn start_tls() -> FakeApi {
        FakeApi::serve(Some(Tls::new()))
    }

    #[allow(
        clippy::unwrap_used,
        reason = "test support: a failure to start is fatal"
    )]
    fn serve(tls: Option<Tls>) -> FakeApi {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                available: true,
                ..State::default()
            }),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let server = shared.clone();
        let ca_pem = tls.as_ref().map(|tls| tls.ca_pem.clone());
        let acceptor = tls.map(|tls| tls.acceptor);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    () = accept(listener, acceptor, server) => {}
                    _ = stopped => {}
                }
            });
        });
        FakeApi {
            address,
            ca_pem,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The server's URL, for `--master` or a kube-rs `Config`.
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.address)
    }

    /// The port it listens on (what a pod finds in `KUBERNETES_SERVICE_PORT`).
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// The CA certificate (PEM) a client must trust, for a server started with
    /// [`FakeApi::start_tls`].
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Creates or replaces every Service, EndpointSlice and Node in a multi-document YAML
    /// text (`List`s are unpacked; other kinds are ignored).
    #[allow(clippy::unwrap_used, reason = "test support: bad test input is fatal")]
    pub fn apply_yaml(&self, yaml: &str) {
        let documents: Vec<Value> = serde_saphyr::from_multiple(yaml).unwrap();
        for document in documents {
            match document.get("items").and_then(Value::as_array) {
                Some(items) => items.iter().cloned().for_each(|item| self.apply(item)),
                None => self.apply(document),
            }
        }
    }

    /// Creates or replaces one object (its `kind` says which resource).
    pub fn apply(&self, mut object: Value) {
        let Some(resource) = object["kind"].as_str().and_then(Resource::from_kind) else {
            return;
        };
        let mut state = self.shared.state();
        state.resource_version += 1;
        let version = state.resource_version;
        let metadata = &mut object["metadata"];
        if resource.namespaced() && metadata.get("namespace").is_none() {
            metadata["namespace"] = json!("default");
        }
        metadata["resourceVersion"] = json!(version.to_string());
        if metadata.get("uid").is_none() {
            metadata["uid"] = json!(format!("uid-{version}"));
        }
        let key = key_of(resource, &object);
        let old = state.objects.insert(key, Stored::new(object.clone()));
        state.record(resource, old.map(Stored::into_value), Some(object));
    }

    /// Deletes an object; `namespace` is empty for Nodes and ServiceCIDRs.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let Some(resource) = Resource::from_kind(kind) else {
            return;
        };
        let mut state = self.shared.state();
        let key = (resource, namespace.to_owned(), name.to_owned());
        if let Some(old) = state.objects.remove(&key) {
            let mut old = Stored::into_value(old);
            state.resource_version += 1;
            // A DELETED event carries the object's last state at the deletion's version.
            old["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            state.record(resource, Some(old), None);
        }
    }

    /// Closes every open connection mid-stream, without the chunked terminator, as a
    /// crashed server or a broken network does.
    pub fn drop_connections(&self) {
        let mut state = self.shared.state();
        for connection in state.connections.drain(..) {
            connection.abort();
        }
        state.watches.clear();
    }

    /// Forgets the change history: a watch resumed from any earlier resourceVersion gets
    /// `410 Gone` and must list again.
    pub fn compact(&self) {
        let mut state = self.shared.state();
        state.compacted = state.resource_version;
        state.history.clear();
    }

    /// While unavailable, every request is answered `503` and open connections are
    /// dropped.
    pub fn set_available(&self, available: bool) {
        self.shared.state().available = available;
        if !available {
            self.drop_connections();
        }
    }

    /// While refused, requests for `resource` alone are answered `503`.
    pub fn refuse(&self, resource: Resource, refused: bool) {
        let mut state = self.shared.state();
        state.refused.retain(|r| *r != resource);
        if refused {
            state.refused.push(resource);
        }
    }

    /// While unserved, requests for `resource` are answered `404`, as an API server
    /// older than the resource answers them.
    pub fn unserve(&self, resource: Resource, unserved: bool) {
        let mut state = self.shared.state();
        state.unserved.retain(|r| *r != resource);
        if unserved {
            state.unserved.push(resource);
        }
    }

    /// Answers every later list request for `resource` only after `delay` (a slow API
    /// server, or one that answers one resource late); zero answers at once again.
    pub fn delay_lists(&self, resource: Resource, delay: Duration) {
        self.shared.state().delays.insert(resource, delay);
    }

    /// How many list requests (pages included) were made for `resource`.
    pub fn lists(&self, resource: Resource) -> usize {
        let path = resource.path();
        self.shared
            .state()
            .requests
            .iter()
            .filter(|r| {
                r.strip_prefix("GET ")
                    .is_some_and(|r| r.split('?').next() == Some(path) && !r.contains("watch=true"))
            })
            .count()
    }

    /// Sends a BOOKMARK with the current resourceVersion on every watch that asked for them.
    pub fn bookmark(&self) {
        let mut state = self.shared.state();
        let version = state.resource_version.to_string();
        state.watches.retain(|watch| {
            !watch.bookmarks
                || watch
                    .events
                    .send(event_line(
                        "BOOKMARK",
                        &json!({
                            "kind": watch.resource.kind(),
                            "apiVersion": watch.resource.api_version(),
                            "metadata": {"resourceVersion": version},
                        }),
                    ))
                    .is_ok()
        });
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.state().requests.clone()
    }

    /// The `Authorization` header of every request so far, in order.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.shared.state().authorizations.clone()
    }

    /// How many open watch streams there are for `resource`.
    pub fn watches(&self, resource: Resource) -> usize {
        let mut state = self.shared.state();
        state.watches.retain(|w| !w.events.is_closed());
        state
            .watches
            .iter()
            .filter(|w| w.resource == resource)
            .count()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.drop_connections();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl State {
    /// Stores a change in the history and tells the open watches about it.
    fn record(&mut self, resource: Resource, old: Option<Value>, new: Option<Value>) {
        let change = Change {
            resource_version: self.resource_version,
            resource,
            old,
            new,
        };
        self.watches
            .retain(|watch| match watch_event(watch, &change) {
                Some(line) => watch.events.send(line).is_ok(),
                None => !watch.events.is_closed(),
            });
        self.history.push(change);
    }
}

/// The event line a watch gets for a change, if the change concerns it: an object that
/// starts matching is ADDED, one that stops matching is DELETED (with its new state; a
/// deleted object's last state already carries the deletion's resourceVersion).
fn watch_event(watch: &Watch, change: &Change) -> Option<Bytes> {
    if watch.resource != change.resource {
        return None;
    }
    let old = change.old.as_ref().filter(|o| watch.filter.matches(o));
    let new = change.new.as_ref().filter(|o| watch.filter.matches(o));
    match (old, new) {
        (None, Some(new)) => Some(event_line("ADDED", new)),
        (Some(_), Some(new)) => Some(event_line("MODIFIED", new)),
        (Some(old), None) => Some(event_line("DELETED", change.new.as_ref().unwrap_or(old))),
        (None, None) => None,
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn key_of(resource: Resource, object: &Value) -> Key {
    let text = |field: &str| {
        object["metadata"][field]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    (resource, text("namespace"), text("name"))
}

/// A parsed label and field selector.
#[derive(Debug, Default, Clone)]
struct Filter {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

#[derive(Debug, Clone)]
enum Requirement {
    Exists(String),
    Absent(String),
    Equals(String, String),
    Differs(String, String),
}

impl Requirement {
    fn parse(text: &str) -> Option<Requirement> {
        let text = text.trim();
        if let Some(key) = text.strip_prefix('!') {
            return Some(Requirement::Absent(key.to_owned()));
        }
        if let Some((key, value)) = text.split_once("!=") {
            return Some(Requirement::Differs(key.to_owned(), value.to_owned()));
        }
        if let Some((key, value)) = text.split_once("==").or_else(|| text.split_once('=')) {
            return Some(Requirement::Equals(key.to_owned(), value.to_owned()));
        }
        (!text.is_empty()).then(|| Requirement::Exists(text.to_owned()))
    }

    fn matches(&self, lookup: impl Fn(&str) -> Option<String>) -> bool {
        match self {
            Requirement::Exists(key) => lookup(key).is_some(),
            Requirement::Absent(key) => lookup(key).is_none(),
            Requirement::Equals(key, value) => lookup(key).as_deref() == Some(value),
            Requirement::Differs(key, value) => lookup(key).as_deref() != Some(value),
        }
    }
}

impl Filter {
    fn parse(query: &HashMap<String, String>) -> Result<Filter, String> {
        let parse = |name: &str| -> Result<Vec<Requirement>, String> {
            query
                .get(name)
                .map(|text| {
                    text.split(',')
                        .filter(|part| !part.is_empty())
                        .map(|part| {
                            Requirement::parse(part)
                                .ok_or_else(|| format!("{name}: cannot parse {part:?}"))
                        })
                        .collect()
                })
                .unwrap_or(Ok(Vec::new()))
        };
        let filter = Filter {
            labels: parse("labelSelector")?,
            fields: parse("fieldSelector")?,
        };
        for field in &filter.fields {
            let (Requirement::Equals(key, _) | Requirement::Differs(key, _)) = field else {
                return Err("fieldSelector: only = and != are supported".to_owned());
            };
            if key != "metadata.name" && key != "metadata.namespace" {
                return Err(format!("fieldSelector: {key:?} is not a supported field"));
            }
        }
        Ok(filter)
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels[key].as_str().map(str::to_owned);
        let field = |key: &str| {
            let name = key.strip_prefix("metadata.")?;
            Some(
                object["metadata"][name]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        };
        self.labels.iter().all(|r| r.matches(label)) && self.fields.iter().all(|r| r.matches(field))
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// A watch stream's body: whatever the watch's channel delivers, until it closes.
struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// A CA of the test's own and the serving certificate it signed.
struct Tls {
    ca_pem: String,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl Tls {
    #[allow(
        clippy::unwrap_used,
        reason = "test support: a failure to make certificates is fatal"
    )]
    fn new() -> Tls {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "nftproxy fake API CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_certificate = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![server.der().clone()],
                tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(
                    server_key.serialize_der().into(),
                ),
            )
            .unwrap();
        Tls {
            ca_pem: ca_certificate.pem(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        }
    }
}

async fn accept(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let server = shared.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let shared = server.clone();
            async move {
                let is_list = !request
                    .uri()
                    .query()
                    .unwrap_or_default()
                    .contains("watch=true");
                let delay = Resource::from_path(request.uri().path())
                    .filter(|_| is_list)
                    .and_then(|resource| shared.state().delays.get(&resource).copied());
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                Ok::<_, Infallible>(handle(&shared, &request))
            }
        });
        let tls = tls.clone();
        let connection = tokio::spawn(async move {
            let http = hyper::server::conn::http1::Builder::new();
            match tls {
                None => {
                    let _ = http
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                }
                Some(tls) => {
                    if let Ok(stream) = tls.accept(stream).await {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    }
                }
            }
        });
        let mut state = shared.state();
        state.connections.retain(|c| !c.is_finished());
        state.connections.push(connection.abort_handle());
    }
}

fn handle(shared: &Shared, request: &Request<Incoming>) -> Response<Body> {
    let path = request.uri().path();
    let query = parse_query(request.uri().query().unwrap_or_default());
    let mut state = shared.state();
    let authorization = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    state.authorizations.push(authorization);
    state.requests.push(format!(
        "{} {}",
        request.method(),
        request
            .uri()
            .path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default()
    ));
    if !state.available {
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the fake API server is down",
        );
    }
    if request.method() != hyper::Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "only GET is served",
        );
    }
    let Some(resource) = Resource::from_path(path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no resource at {path}"),
        );
    };
    if state.unserved.contains(&resource) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    if state.refused.contains(&resource) {
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "refused by the test",
        );
    }
    let filter = match Filter::parse(&query) {
        Ok(filter) => filter,
        Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if watching {
        watch(&mut state, resource, filter, &query)
    } else {
        list(&mut state, resource, &filter, &query)
    }
}

fn list(
    state: &mut State,
    resource: Resource,
    filter: &Filter,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let (version, mut items) = match query.get("continue").filter(|t| !t.is_empty()) {
        Some(token) => match state.pages.remove(token) {
            Some(page) => page,
            None => {
                return status(
                    StatusCode::GONE,
                    "Expired",
                    "the continue token has expired",
                );
            }
        },
        None => (
            state.resource_version,
            state
                .objects
                .iter()
                .filter(|((r, _, _), object)| *r == resource && filter.matches(&object.value))
                .map(|(_, object)| Arc::clone(object))
                .collect(),
        ),
    };
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let mut metadata = json!({"resourceVersion": version.to_string()});
    if let Some(limit) = limit
        && items.len() > limit
    {
        let rest = items.split_off(limit);
        state.next_token += 1;
        let token = format!("page-{}", state.next_token);
        state.pages.insert(token.clone(), (version, rest));
        metadata["continue"] = json!(token);
    }
    // Written from the objects' stored text, as the API server writes a list.
    let mut body = json!({
        "apiVersion": resource.api_version(),
        "kind": format!("{}List", resource.kind()),
        "metadata": metadata,
    })
    .to_string();
    body.pop();
    body.push_str(",\"items\":[");
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            body.push(',');
        }
        body.push_str(&item.json);
    }
    body.push_str("]}");
    json_text(StatusCode::OK, body)
}

fn watch(
    state: &mut State,
    resource: Resource,
    filter: Filter,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let (events, receiver) = mpsc::unbounded_channel();
    let watch = Watch {
        resource,
        filter,
        bookmarks: query
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true"),
        events,
    };
    let from = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or_default();
    match from.parse::<u64>() {
        // "" and "0": start with the current objects, as synthetic ADDED events.
        _ if from.is_empty() || from == "0" => {
            for ((r, _, _), object) in &state.objects {
                if *r == resource && watch.filter.matches(&object.value) {
                    let _ = watch.events.send(event_line("ADDED", &object.value));
                }
            }
        }
        Ok(version) if version < state.compacted => {
            let gone = json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {version} ({})", state.compacted),
                "reason": "Expired", "code": 410,
            });
            let _ = watch.events.send(event_line("ERROR", &gone));
            return streaming(receiver);
        }
        Ok(version) => {
            for change in state
                .history
                .iter()
                .filter(|c| c.resource_version > version)
            {
                if let Some(line) = watch_event(&watch, change) {
                    let _ = watch.events.send(line);
                }
            }
        }
        Err(_) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("resourceVersion {from:?} is not a number"),
            );
        }
    }
    if let Some(seconds) = query.get("timeoutSeconds").and_then(|s| s.parse().ok()) {
        // The server ends the stream cleanly after the timeout; the client watches again.
        let closed = watch.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            drop(closed);
        });
    }
    state.watches.push(watch);
    streaming(receiver)
}

fn streaming(receiver: mpsc::UnboundedReceiver<Bytes>) -> Response<Body> {
    let mut response = Response::new(ChannelBody(receiver).boxed());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    json_text(code, body.to_string())
}

fn json_text(code: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
