//! The image as the DaemonSet runs it. `hack/image.sh` builds it; podman (runc,
//! cgroupfs) runs the container the rendered `replace-kube-proxy` overlay describes, as
//! the kubelet would: its command with `$(VAR)` expanded, its environment (the downward
//! API's node name, the `nftproxy-cluster` ConfigMap), its ConfigMap mounted at its
//! mount path, the ServiceAccount's token, CA and namespace where the kubelet puts them,
//! `runAsUser`, the capabilities (`NET_ADMIN` only), a read-only root, no privilege
//! escalation, and `hostNetwork` as a scratch network namespace standing for the node;
//! the privileged init container first. Against a fake API server speaking TLS with a CA
//! of its own, inside that namespace.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use common::kustomize::{object, render_readme_kustomization};
use common::{Namespace, http_get, within};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use nftproxy_netlink::netns;
use nftproxy_testkit::fake_api::FakeApi;
use nftproxy_testkit::{kernel_available, repo_root, seed_manifests, tool_available};

/// podman as these machines run it (crun does not work here; the defaults' rlimits are
/// above what the runtime may set).
fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    command
}

const LIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:20000",
    "--ulimit",
    "nproc=4096:4096",
];

fn output(command: &mut Command) -> Output {
    let output = command.output().expect("runs");
    assert!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The image `hack/image.sh` built (once per run of this binary), or `None` when this
/// machine cannot build or run it (a named skip; a failure under CI).
fn image(test: &str) -> Option<&'static str> {
    if !kernel_available(test) || !tool_available(test, Path::new("podman"), &["--version"]) {
        return None;
    }
    static IMAGE: OnceLock<String> = OnceLock::new();
    Some(IMAGE.get_or_init(|| {
        // As an admin runs it: without what cargo sets for a test (which would make
        // the release build start over for a changed environment).
        let mut script = Command::new(repo_root().join("hack/image.sh"));
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if (name.starts_with("CARGO_") && name != "CARGO_HOME") || name == "LD_LIBRARY_PATH" {
                script.env_remove(name.as_ref());
            }
        }
        let built = output(&mut script);
        let said = String::from_utf8_lossy(&built.stdout);
        let line = said
            .lines()
            .find_map(|l| l.strip_prefix("image: "))
            .unwrap_or_else(|| panic!("hack/image.sh names its image: {said}"));
        let (name, size) = line.split_once(", ").expect("image: NAME, N MB");
        eprintln!("hack/image.sh built {name}, {size}");
        let megabytes: u64 = size.trim_end_matches(" MB").parse().expect("a size");
        assert!(megabytes < 60, "the image is {megabytes} MB");
        name.to_owned()
    }))
}

/// The status of `GET path` on port 10256 of the node's namespace (None: no answer).
fn healthz(node: &Namespace, path: &str) -> Option<u16> {
    http_get(&node.0, "127.0.0.1:10256", path).map(|(status, _)| status)
}

/// A container started detached; removed on drop.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(logs) = podman().args(["logs", &self.0]).output()
        {
            eprintln!(
                "--- {} ---\n{}",
                self.0,
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        let _ = podman().args(["rm", "--force", &self.0]).output();
    }
}

/// What the kubelet would do for the DaemonSet's container `name` (an init container or
/// the daemon), as `podman run` arguments (image and command last): everything but the
/// image's name and `extra` comes from the rendered objects. `files` is where the
/// mounted volumes' contents are written.
fn pod_run(
    rendered: &[serde_json::Value],
    name: &str,
    node: &Namespace,
    files: &Path,
    ca_pem: &str,
    extra: &[&str],
) -> Vec<String> {
    let daemon_set: DaemonSet = object(rendered, "DaemonSet", "nftproxy");
    let pod = daemon_set.spec.template.spec.expect("pod spec");
    let container = pod
        .init_containers
        .iter()
        .flatten()
        .chain(&pod.containers)
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("a container {name}"));
    let mut args: Vec<String> = LIMITS.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(pod.host_network, Some(true));
    args.push(format!("--network=ns:/run/netns/{}", node.0));

    // Environment: envFrom first, then env, which wins.
    let mut env = BTreeMap::new();
    for source in container.env_from.iter().flatten() {
        let name = &source.config_map_ref.as_ref().expect("a ConfigMap").name;
        let config_map: ConfigMap = object(rendered, "ConfigMap", name);
        env.extend(config_map.data.expect("data"));
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) => {
                let field = from
                    .field_ref
                    .as_ref()
                    .expect("a fieldRef")
                    .field_path
                    .as_str();
                assert_eq!(field, "spec.nodeName");
                "node-a".to_owned()
            }
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    for (name, value) in &env {
        args.push(format!("--env={name}={value}"));
    }

    // Volumes: each ConfigMap's keys as files; the ServiceAccount's, where the kubelet
    // mounts them.
    for mount in container.volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .expect("the mount's volume");
        let name = &volume.config_map.as_ref().expect("a ConfigMap volume").name;
        let config_map: ConfigMap = object(rendered, "ConfigMap", name);
        let dir = files.join(&mount.name);
        std::fs::create_dir_all(&dir).expect("volume dir");
        for (key, value) in config_map.data.expect("data") {
            std::fs::write(dir.join(key), value).expect("volume file");
        }
        let mode = if mount.read_only == Some(true) {
            "ro"
        } else {
            "rw"
        };
        args.push(format!(
            "--volume={}:{}:{mode}",
            dir.display(),
            mount.mount_path
        ));
    }
    let account = files.join("serviceaccount");
    std::fs::create_dir_all(&account).expect("account dir");
    std::fs::write(account.join("token"), "test-token").expect("token");
    std::fs::write(account.join("ca.crt"), ca_pem).expect("CA");
    std::fs::write(account.join("namespace"), "kube-system").expect("namespace");
    args.push(format!(
        "--volume={}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
        account.display()
    ));

    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    if let Some(user) = security.run_as_user {
        args.push(format!("--user={user}"));
    }
    if security.privileged == Some(true) {
        args.push("--privileged".to_owned());
    }
    let capabilities = security.capabilities.iter();
    for dropped in capabilities.clone().flat_map(|c| c.drop.iter().flatten()) {
        args.push(format!("--cap-drop={dropped}"));
    }
    for added in capabilities.flat_map(|c| c.add.iter().flatten()) {
        args.push(format!("--cap-add={added}"));
    }
    if security.read_only_root_filesystem == Some(true) {
        args.push("--read-only".to_owned());
    }
    if security.allow_privilege_escalation == Some(false) {
        args.push("--security-opt=no-new-privileges".to_owned());
    }

    // The command replaces the image's entry point; `$(VAR)` expands from the env.
    let expand = |arg: &String| {
        env.iter().fold(arg.clone(), |arg, (name, value)| {
            arg.replace(&format!("$({name})"), value)
        })
    };
    let command: Vec<String> = container.command.iter().flatten().map(expand).collect();
    assert!(command.iter().all(|a| !a.contains("$(")), "{command:?}");
    args.push(format!("--entrypoint={}", command[0]));
    args.push(container.image.clone().expect("image"));
    args.extend(command[1..].iter().cloned());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// The overlay rendered for a cluster whose API server is `api` (inside the node).
fn rendered_for(test: &str, api: Option<&FakeApi>) -> Option<Vec<serde_json::Value>> {
    let port = api.map_or(6443, FakeApi::port).to_string();
    render_readme_kustomization(
        test,
        &[
            ("newName: registry.example/nftproxy", "newName: nftproxy"),
            (
                "KUBERNETES_SERVICE_HOST=10.0.0.10",
                "KUBERNETES_SERVICE_HOST=127.0.0.1",
            ),
            (
                "KUBERNETES_SERVICE_PORT=6443",
                &format!("KUBERNETES_SERVICE_PORT={port}"),
            ),
        ],
    )
}

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nftproxy-image-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn the_image_says_its_version() {
    let Some(image) = image("the_image_says_its_version") else {
        return;
    };
    let ran = output(
        podman()
            .args(["run", "--rm", "--network=none"])
            .args(LIMITS)
            .args([image, "--version"]),
    );
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout).trim(),
        format!("nftproxy {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_daemon_sets_container_programs_the_seed_manifests_once() {
    let test = "the_daemon_sets_container_programs_the_seed_manifests_once";
    let Some(_) = image(test) else {
        return;
    };
    let Some(rendered) = rendered_for(test, None) else {
        return;
    };
    let node = Namespace::new("once");
    let files = scratch_dir(test);
    let mut args = vec!["run".to_owned(), "--rm".to_owned()];
    args.push(format!(
        "--volume={}:/manifests:ro",
        repo_root().join("hack/examples/seed").display()
    ));
    args.extend(pod_run(
        &rendered,
        "nftproxy",
        &node,
        &files,
        "",
        &[
            "--once",
            "--manifests",
            "/manifests",
            "--node-ip",
            "192.168.50.10",
        ],
    ));
    let ran = podman().args(&args).output().expect("podman runs");
    let _ = std::fs::remove_dir_all(&files);
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    let table = node.table();
    for address in ["10.103.50.102", "10.101.168.165", "192.168.50.200"] {
        assert!(table.contains(address), "{address} in\n{table}");
    }
}

#[test]
fn the_daemon_sets_container_follows_the_api_server_and_leaves_its_rules_on_sigterm() {
    let test = "the_daemon_sets_container_follows_the_api_server_and_leaves_its_rules_on_sigterm";
    let Some(_) = image(test) else {
        return;
    };
    let node = Namespace::new("daemon");
    // The API server inside the node's namespace, where the container reaches it.
    let api = netns::in_named_netns(&node.0, FakeApi::start_tls).expect("node namespace");
    api.apply_yaml(&seed_manifests());
    api.apply_yaml(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n\
         status: {addresses: [{type: InternalIP, address: 192.168.50.10}]}\n",
    );
    let Some(rendered) = rendered_for(test, Some(&api)) else {
        return;
    };
    let files = scratch_dir(test);
    let ca_pem = api.ca_pem().expect("TLS");

    // The conntrack settings need what the daemon's container lacks: a writable
    // /proc/sys. Its command with `--init-only` says so and fails.
    let unprivileged = podman()
        .args(["run", "--rm"])
        .args(pod_run(
            &rendered,
            "nftproxy",
            &node,
            &files,
            ca_pem,
            &["--init-only"],
        ))
        .output()
        .expect("podman runs");
    assert!(!unprivileged.status.success());
    let said = String::from_utf8_lossy(&unprivileged.stderr);
    assert!(said.contains("could not be set"), "{said}");
    // The privileged init container sets them, in the node's network namespace.
    let sysctl = |name: &str| node.netfilter_sysctl(name);
    assert_eq!(
        sysctl("nf_conntrack_tcp_timeout_established"),
        "432000",
        "the kernel's"
    );
    output(podman().args(["run", "--rm"]).args(pod_run(
        &rendered,
        "conntrack",
        &node,
        &files,
        ca_pem,
        &[],
    )));
    assert_eq!(sysctl("nf_conntrack_tcp_timeout_established"), "86400");
    assert_eq!(sysctl("nf_conntrack_tcp_timeout_close_wait"), "3600");

    let container = Container(format!("nftproxy-test-{}", std::process::id()));
    let mut args = vec![
        "run".to_owned(),
        "--detach".to_owned(),
        format!("--name={}", container.0),
    ];
    args.extend(pod_run(&rendered, "nftproxy", &node, &files, ca_pem, &[]));
    output(podman().args(&args));

    // /healthz answers 200 before the first sync too (until 2 × syncPeriod have passed
    // without one): the table tells that the first sync happened.
    within(Duration::from_secs(60), "the first sync", || {
        node.table().contains("10.103.50.102")
    });
    assert_eq!(healthz(&node, "/healthz"), Some(200));
    // It authenticated with the ServiceAccount's token, over TLS to the CA it was given.
    let authorizations = api.authorizations();
    assert!(!authorizations.is_empty());
    assert!(
        authorizations
            .iter()
            .all(|a| a.as_deref() == Some("Bearer test-token")),
        "{authorizations:?}"
    );

    // A Service change reaches the kernel.
    api.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec: {type: ClusterIP, clusterIP: 10.96.77.77, clusterIPs: [10.96.77.77],\n\
         ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\n\
         endpoints: [{addresses: [10.244.1.30], conditions: {ready: true}, nodeName: node-a}]\n",
    );
    within(
        Duration::from_secs(60),
        "the new Service in the kernel",
        || node.table().contains("10.96.77.77"),
    );

    // SIGTERM (podman stop): a clean exit, and every rule stays.
    output(podman().args(["stop", "--time=30", &container.0]));
    let state = output(podman().args(["inspect", "--format={{.State.ExitCode}}", &container.0]));
    assert_eq!(String::from_utf8_lossy(&state.stdout).trim(), "0");
    let table = node.table();
    for address in ["10.103.50.102", "10.96.77.77"] {
        assert!(table.contains(address), "{address} after SIGTERM:\n{table}");
    }
    let logs = output(podman().args(["logs", &container.0]));
    let logs = String::from_utf8_lossy(&logs.stderr);
    assert!(logs.contains("synced"));
    // The daemon found the init container's settings in place.
    assert!(!logs.contains("of this network namespace"), "{logs}");
    let _ = std::fs::remove_dir_all(&files);
}
