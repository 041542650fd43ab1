//! Fuzz-style test of the kubeconfig file, which an admin (or a careless script) wrote:
//! kubeconfigs as clusters hand them out (a token, client certificate data, a CA, several
//! contexts), mutated at random and now and then replaced by arbitrary bytes, then read
//! as the binary reads `--kubeconfig`. None may panic or hang; what cannot be used is an
//! error naming the file.

use std::time::Duration;

use nftproxy_kube_source::{SourceError, client};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const SEEDS: &[&str] = &[
    "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://10.0.0.1:6443\n    \
     insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: abc.def\ncontexts:\n- name: x\n  \
     context: {cluster: c, user: u, namespace: kube-system}\ncurrent-context: x\n",
    "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://[fd00::1]:6443\n    \
     certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJJakFOQmdrcWhraUc5dzBCQVFFRkFBT0NBUThBTUlJQkNnS0NBUUVBCi0tLS0tRU5EIENFUlRJRklDQVRFLS0tLS0K\n\
     users:\n- name: u\n  user:\n    client-certificate-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCi0tLS0tRU5EIENFUlRJRklDQVRFLS0tLS0K\n    \
     client-key-data: LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCi0tLS0tRU5EIFBSSVZBVEUgS0VZLS0tLS0K\n\
     contexts:\n- name: x\n  context: {cluster: c, user: u}\n- name: y\n  context: {cluster: c, user: missing}\n\
     current-context: y\n",
    "apiVersion: v1\nkind: Config\nclusters: []\nusers: []\ncontexts: []\ncurrent-context: nowhere\n",
    "{\"apiVersion\": \"v1\", \"kind\": \"Config\", \"clusters\": [{\"name\": \"c\", \"cluster\": {\"server\": \"http://127.0.0.1:1\"}}], \
     \"users\": [{\"name\": \"u\", \"user\": {\"username\": \"a\", \"password\": \"b\"}}], \
     \"contexts\": [{\"name\": \"x\", \"context\": {\"cluster\": \"c\", \"user\": \"u\"}}], \"current-context\": \"x\"}\n",
];

fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let edit = (
        any::<usize>(),
        prop_oneof![
            Just(b"\n".to_vec()),
            Just(b": ".to_vec()),
            Just(b"- ".to_vec()),
            Just(b"&a ".to_vec()),
            Just(b"*a".to_vec()),
            Just(b"{[".to_vec()),
            Just(b"\xff".to_vec()),
            Just(b"    ".to_vec()),
            proptest::collection::vec(any::<u8>(), 1..6),
        ],
        any::<bool>(),
    );
    prop_oneof![
        9 => (0..SEEDS.len(), proptest::collection::vec(edit, 1..6)).prop_map(|(seed, edits)| {
            let mut bytes = SEEDS[seed].as_bytes().to_vec();
            for (at, inserted, replace) in edits {
                let at = at % bytes.len().max(1);
                let end = if replace { (at + inserted.len()).min(bytes.len()) } else { at };
                bytes.splice(at..end, inserted);
            }
            bytes
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..256),
    ]
}

#[test]
fn mutated_kubeconfigs_are_used_or_named_never_a_panic() {
    let dir = std::env::temp_dir().join(format!("nftproxy-kubeconfig-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("kubeconfig");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut runner = TestRunner::new(Config {
        cases: 500,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&mutated(), |bytes| {
        // A kubeconfig can name a program to run for credentials: never one of these.
        let text = String::from_utf8_lossy(&bytes);
        if text.contains("exec") || text.contains("auth-provider") {
            return Ok(());
        }
        std::fs::write(&path, &bytes).expect("temp file");
        let built = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), client(Some(&path), None)).await
        });
        match built {
            Err(_) => prop_assert!(false, "reading the kubeconfig took over 10 s"),
            Ok(Ok(_)) => {}
            Ok(Err(SourceError::Kubeconfig {
                path: named,
                message,
            })) => {
                prop_assert_eq!(named, path.display().to_string());
                prop_assert!(!message.is_empty());
            }
            Ok(Err(other)) => prop_assert!(!other.to_string().is_empty()),
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
