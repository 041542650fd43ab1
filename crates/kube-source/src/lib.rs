//! The Kubernetes API side: kube-rs watchers feeding caches of Services, EndpointSlices
//! (both decoded as they arrive, so the API objects are not kept), ServiceCIDRs and this
//! node's Node, plus the signals the sync loop needs (initial lists complete, something
//! changed, when endpoint changes were triggered).
//!
//! Invariant: a [`Snapshot`] is only handed out once the initial lists of Services,
//! EndpointSlices and ServiceCIDRs are complete (ServiceCIDRs: or the API server answered
//! that it does not serve them, or not to us) and this node's Node is known (or a bounded
//! wait for it has passed), so a half-listed cluster is never programmed; after that the
//! caches keep their last contents while the API server is unreachable, and a relist
//! replaces a cache only once it is complete.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Config, ResourceExt};
use nftproxy_model::{CompactString, DecodedEndpointSlice, DecodedService, IpFamily, Snapshot};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use kube::Client;

/// Services and EndpointSlices carrying either label are not ours: the first names another
/// proxy that handles the Service, the second marks the slices of headless Services.
/// kube-proxy filters both lists with this selector.
pub const LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// EndpointSlice annotation: when the change that produced this version of the slice
/// happened (the start of network programming latency).
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// How long the first snapshot waits for this node's Node after the Services and
/// EndpointSlices are listed. The Node carries the node's addresses, zone and pod CIDRs: a
/// sync without it would program NodePorts on the wrong addresses and take them back a
/// moment later. A node whose Node does not exist (yet) is still served after this wait.
pub const NODE_WAIT: Duration = Duration::from_secs(30);

/// An error and every error that caused it, `outer: inner: …`, so that a log line says
/// why (an untrusted certificate, a refused connection), not only that a request failed.
pub fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their cause in their own message.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The taint the cluster autoscaler puts on a node it is about to remove.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Why the API client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// No kubeconfig was given and this is not a pod.
    #[error(
        "not running in a cluster ({0}); pass --kubeconfig FILE or --master URL, or --manifests PATH..."
    )]
    InCluster(String),
    /// `--master` is not a URL.
    #[error("--master {url:?} is not a URL: {message}")]
    Master {
        /// What was given.
        url: String,
        /// Why it is not a URL.
        message: String,
    },
    /// The client could not be built from the configuration.
    #[error("API client: {0}")]
    Client(#[from] kube::Error),
}

/// Builds the API client as kube-proxy does: `--kubeconfig` when given, otherwise the
/// in-cluster service account; `--master` overrides the server address of either (and
/// alone means an unauthenticated connection to that address).
pub async fn client(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
) -> Result<Client, SourceError> {
    let master = master
        .map(|url| {
            url.parse::<http::Uri>().map_err(|e| SourceError::Master {
                url: url.to_owned(),
                message: e.to_string(),
            })
        })
        .transpose()?;
    let mut config = match (kubeconfig, &master) {
        (Some(path), _) => {
            let failed = |message: String| SourceError::Kubeconfig {
                path: path.display().to_string(),
                message,
            };
            let file = Kubeconfig::read_from(path).map_err(|e| failed(e.to_string()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| failed(e.to_string()))?
        }
        (None, Some(url)) => Config::new(url.clone()),
        (None, None) => Config::incluster().map_err(|e| SourceError::InCluster(e.to_string()))?,
    };
    if let Some(url) = master {
        config.cluster_url = url;
    }
    Ok(Client::try_from(config)?)
}

/// Which list a watcher keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Service,
    EndpointSlice,
    ServiceCIDR,
    Node,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Services",
            Kind::EndpointSlice => "EndpointSlices",
            Kind::ServiceCIDR => "ServiceCIDRs",
            Kind::Node => "this Node",
        })
    }
}

/// Namespace and name of an object (inline, as the decoded objects keep them).
type ObjectKey = (CompactString, CompactString);

/// The objects of one watch, in the form they are kept.
struct Cache<T> {
    objects: HashMap<ObjectKey, T>,
    /// What the list in progress returned so far; it replaces `objects` when complete.
    listing: Option<HashMap<ObjectKey, T>>,
}

impl<T> Default for Cache<T> {
    fn default() -> Cache<T> {
        Cache {
            objects: HashMap::new(),
            listing: None,
        }
    }
}

impl<T> Cache<T> {
    fn update<K: kube::Resource>(&mut self, event: &watcher::Event<K>, keep: impl Fn(&K) -> T) {
        let key = |object: &K| {
            let namespace = object.namespace().unwrap_or_default();
            (
                CompactString::from(namespace),
                CompactString::from(object.name_any()),
            )
        };
        match event {
            watcher::Event::Init => self.listing = Some(HashMap::new()),
            watcher::Event::InitApply(object) => {
                let listing = self.listing.get_or_insert_default();
                listing.insert(key(object), keep(object));
            }
            watcher::Event::InitDone => {
                if let Some(listing) = self.listing.take() {
                    self.objects = listing;
                }
            }
            watcher::Event::Apply(object) => {
                self.objects.insert(key(object), keep(object));
            }
            watcher::Event::Delete(object) => {
                self.objects.remove(&key(object));
            }
        }
    }

    fn values(&self) -> impl Iterator<Item = &T> {
        self.objects.values()
    }
}

/// What the watchers have seen, shared with their tasks.
#[derive(Default)]
struct State {
    services: Cache<DecodedService>,
    endpoint_slices: Cache<DecodedEndpointSlice>,
    service_cidrs: Cache<ServiceCIDR>,
    nodes: Cache<Node>,
    services_listed: bool,
    endpoint_slices_listed: bool,
    service_cidrs_listed: bool,
    /// The API server answered the ServiceCIDR list with 404 (it predates them) or 403
    /// (the ClusterRole does not grant them): the snapshot does not wait for them, and
    /// the watcher keeps trying.
    service_cidrs_unavailable: bool,
    node_listed: bool,
    /// Bumped on every change of any cache.
    generation: u64,
    /// Service and EndpointSlice events (added, modified, deleted) since the last read.
    changes: Changes,
    /// Trigger times of EndpointSlice changes not yet programmed, with the slice's family.
    trigger_times: Vec<(IpFamily, jiff::Timestamp)>,
    /// The last trigger-time annotation seen per slice, so that a re-list does not count
    /// an old change twice.
    seen_triggers: HashMap<(String, String), String>,
}

/// How many Service and EndpointSlice events arrived.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services added, modified or deleted.
    pub services: u64,
    /// EndpointSlices added, modified or deleted.
    pub endpoint_slices: u64,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Notify,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking watcher task cannot leave `State` half-updated in a way that
        // matters (every field is valid on its own), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running set of watchers; dropping it stops them.
pub struct KubeSource {
    node_name: String,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    /// Until then the first snapshot waits for this node's Node.
    node_deadline: Instant,
    /// Whether a snapshot was handed out: after that, every later state is complete
    /// (a Node deleted meanwhile does not stop the updates).
    handed_out: AtomicBool,
}

impl KubeSource {
    /// Starts watching (must be called inside a tokio runtime). `node_name` selects the one
    /// Node object that is watched; the first snapshot waits up to `node_wait` from now
    /// for it (see [`NODE_WAIT`]).
    pub fn start(client: Client, node_name: &str, node_wait: Duration) -> KubeSource {
        let shared = Arc::new(Shared::default());
        let started = jiff::Timestamp::now();
        let selected = watcher::Config::default().labels(LABEL_SELECTOR);
        let tasks = vec![
            tokio::spawn(watch(
                Api::<Service>::all(client.clone()),
                selected.clone(),
                Kind::Service,
                shared.clone(),
                |state, event| state.services.update(event, |s| DecodedService::from(s)),
            )),
            tokio::spawn(watch(
                Api::<EndpointSlice>::all(client.clone()),
                selected,
                Kind::EndpointSlice,
                shared.clone(),
                move |state, event| {
                    note_trigger_time(state, event, started);
                    state
                        .endpoint_slices
                        .update(event, |s| DecodedEndpointSlice::from(s));
                },
            )),
            tokio::spawn(watch(
                Api::<ServiceCIDR>::all(client.clone()),
                watcher::Config::default(),
                Kind::ServiceCIDR,
                shared.clone(),
                |state, event| state.service_cidrs.update(event, ServiceCIDR::clone),
            )),
            tokio::spawn(watch(
                Api::<Node>::all(client),
                watcher::Config::default().fields(&format!("metadata.name={node_name}")),
                Kind::Node,
                shared.clone(),
                |state, event| state.nodes.update(event, Node::clone),
            )),
        ];
        KubeSource {
            node_name: node_name.to_owned(),
            shared,
            tasks,
            node_deadline: Instant::now() + node_wait,
            handed_out: AtomicBool::new(false),
        }
    }

    /// Resolves after the next change of any watched object (or completed list), or when
    /// the wait for the Node ends.
    pub async fn changed(&self) {
        let notified = self.shared.changed.notified();
        let waiting = !self.handed_out.load(Ordering::Relaxed)
            && !self.node_present(&self.shared.state())
            && Instant::now() < self.node_deadline;
        if waiting {
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(self.node_deadline) => {}
            }
        } else {
            notified.await;
        }
    }

    fn node_present(&self, state: &State) -> bool {
        state.node_listed && state.nodes.values().any(|n| n.name_any() == self.node_name)
    }

    /// A number that changes whenever any cache changes.
    pub fn generation(&self) -> u64 {
        self.shared.state().generation
    }

    /// Whether the initial lists of Services and EndpointSlices are both complete.
    pub fn is_synced(&self) -> bool {
        let state = self.shared.state();
        state.services_listed && state.endpoint_slices_listed
    }

    /// Whether the first snapshot may be taken: the lists are complete, and this node's
    /// Node is known or the wait for it is over (said once, with the reason).
    fn ready(&self, state: &State) -> bool {
        if self.handed_out.load(Ordering::Relaxed) {
            return true;
        }
        let service_cidrs = state.service_cidrs_listed || state.service_cidrs_unavailable;
        if !(state.services_listed && state.endpoint_slices_listed && service_cidrs) {
            return false;
        }
        if self.node_present(state) {
            self.handed_out.store(true, Ordering::Relaxed);
            return true;
        }
        if Instant::now() < self.node_deadline {
            return false;
        }
        // Said once: from now on `handed_out` answers first.
        let why = if state.node_listed {
            "does not exist"
        } else {
            "could not be listed"
        };
        warn!(
            node = %self.node_name,
            "Node {} {why}; going on without it: node addresses come from --node-ip (or \
             none), and zone and pod CIDRs are unknown until it appears",
            self.node_name
        );
        self.handed_out.store(true, Ordering::Relaxed);
        true
    }

    /// Whether the Node list (this node, or nothing when it does not exist) is complete.
    pub fn node_listed(&self) -> bool {
        self.shared.state().node_listed
    }

    /// The objects as they are now, or `None` before the initial lists are complete and
    /// the Node is known (or waited for long enough).
    pub fn snapshot(&self) -> Option<Snapshot> {
        let state = self.shared.state();
        if !self.ready(&state) {
            return None;
        }
        Some(Snapshot {
            services: state.services.values().cloned().collect(),
            endpoint_slices: state.endpoint_slices.values().cloned().collect(),
            nodes: state
                .nodes
                .values()
                .filter(|node| node.name_any() == self.node_name)
                .cloned()
                .collect(),
            service_cidrs: {
                // In name order, so that the same cluster gives the same diagnostics.
                let mut cidrs: Vec<ServiceCIDR> = state.service_cidrs.values().cloned().collect();
                cidrs.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
                cidrs
            },
            local_addresses: None,
        })
    }

    /// Whether this node may receive load-balanced traffic: false once its Node is being
    /// deleted or the cluster autoscaler marked it for removal (kube-proxy's `/healthz`
    /// then fails, so that load balancers drain it). True while the Node is unknown.
    pub fn node_eligible(&self) -> bool {
        self.shared.state().nodes.values().all(node_eligible)
    }

    /// The trigger times of EndpointSlice changes seen since the last call, with the
    /// slice's address family (only changes made after this source started count, as in
    /// kube-proxy).
    pub fn take_trigger_times(&self) -> Vec<(IpFamily, jiff::Timestamp)> {
        std::mem::take(&mut self.shared.state().trigger_times)
    }

    /// The Service and EndpointSlice events since the last call.
    pub fn take_changes(&self) -> Changes {
        std::mem::take(&mut self.shared.state().changes)
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// See [`KubeSource::node_eligible`].
fn node_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let drained = node
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !(deleting || drained)
}

/// One watcher: list, then watch, relisting after `410 Gone` and backing off after
/// errors (kube-rs's default: exponential from 800 ms up to 30 s, with jitter), forever.
async fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    shared: Arc<Shared>,
    record: impl Fn(&mut State, &watcher::Event<K>),
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let stream = watcher(api, config).default_backoff();
    futures_util::pin_mut!(stream);
    // The cause of the current outage, logged once (and again when it changes).
    let mut failing: Option<String> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                let unavailable = kind == Kind::ServiceCIDR && not_served(&error);
                let error = cause_chain(&error);
                if unavailable {
                    let mut state = shared.state();
                    if !state.service_cidrs_unavailable {
                        warn!(
                            %error,
                            "ServiceCIDRs cannot be listed (404: the API server is older than \
                             1.33; 403: the ClusterRole does not grant them); going on without \
                             them, retrying: unallocated ClusterIPs are dropped within \
                             --service-cidr only"
                        );
                        state.service_cidrs_unavailable = true;
                        state.generation += 1;
                        drop(state);
                        shared.changed.notify_one();
                        failing = Some(error);
                        continue;
                    }
                }
                if failing.as_ref() != Some(&error) {
                    warn!(%error, "watching {kind} failed; keeping the last known state and retrying");
                    failing = Some(error);
                }
                continue;
            }
        };
        // `Init` comes before the list request, so only what follows it proves the API
        // server answers again.
        if failing.is_some() && !matches!(event, watcher::Event::Init) {
            failing = None;
            info!("watching {kind} again");
        }
        let mut state = shared.state();
        record(&mut state, &event);
        match &event {
            // The cache swaps in the whole list at `InitDone`; until then nothing changed.
            watcher::Event::Init | watcher::Event::InitApply(_) => continue,
            watcher::Event::InitDone => {
                debug!("list of {kind} complete");
                match kind {
                    Kind::Service => state.services_listed = true,
                    Kind::EndpointSlice => state.endpoint_slices_listed = true,
                    Kind::ServiceCIDR => state.service_cidrs_listed = true,
                    Kind::Node => state.node_listed = true,
                }
            }
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => match kind {
                Kind::Service => state.changes.services += 1,
                Kind::EndpointSlice => state.changes.endpoint_slices += 1,
                Kind::ServiceCIDR | Kind::Node => {}
            },
        }
        state.generation += 1;
        drop(state);
        shared.changed.notify_one();
    }
}

/// Whether a list failed because the API server does not serve the resource (404) or
/// not to us (403): answers that retrying soon will not change.
fn not_served(error: &watcher::Error) -> bool {
    matches!(
        error,
        watcher::Error::InitialListFailed(kube::Error::Api(status))
            if status.is_not_found() || status.is_forbidden()
    )
}

/// Records an EndpointSlice change's trigger time for the network programming latency
/// metric, once per distinct annotation value.
fn note_trigger_time(
    state: &mut State,
    event: &watcher::Event<EndpointSlice>,
    started: jiff::Timestamp,
) {
    let (watcher::Event::Apply(object) | watcher::Event::InitApply(object)) = event else {
        if let watcher::Event::Delete(object) = event {
            let key = (object.namespace().unwrap_or_default(), object.name_any());
            state.seen_triggers.remove(&key);
        }
        return;
    };
    let Some(value) = object.annotations().get(LAST_CHANGE_TRIGGER_TIME) else {
        return;
    };
    let key = (object.namespace().unwrap_or_default(), object.name_any());
    if state.seen_triggers.get(&key) == Some(value) {
        return;
    }
    state.seen_triggers.insert(key, value.clone());
    if let Ok(time) = value.parse::<jiff::Timestamp>()
        && time > started
    {
        let family = match object.address_type.as_str() {
            "IPv6" => IpFamily::V6,
            _ => IpFamily::V4,
        };
        state.trigger_times.push((family, time));
    }
}
