//! The netlink backend against the real kernel, each test in fresh network namespaces:
//! every golden table programmed, read back and listed by `nft`; diffs between golden
//! tables applied; failures rolled back and attributed to their operation.

use std::net::IpAddr;
use std::process::Command;

use nftproxy_netlink::netns::in_new_netns;
use nftproxy_netlink::{Error, NetlinkBackend};
use nftproxy_nft::{
    Backend, Chain, DataType, Element, Expr, Family, L4Proto, Op, PayloadField, Rhs, Rule, Set,
    Stmt, Table, Transaction, Value, diff,
};
use nftproxy_testkit::{golden_tables, kernel_available, normalise_listing, run_ok};

/// `nft list ruleset` in the calling thread's namespace.
fn nft_list() -> String {
    run_ok(Command::new("nft").args(["list", "ruleset"]), "")
}

/// `nft -f -` of `text`, then `nft list ruleset`, in the calling thread's namespace.
fn nft_load_and_list(text: &str) -> String {
    run_ok(Command::new("nft").args(["-f", "-"]), text);
    nft_list()
}

/// Programs `table` over netlink into a fresh namespace: what reads back, and `nft list`.
fn program_and_list(table: Table) -> (Option<Table>, String) {
    in_new_netns(move || {
        let mut backend = NetlinkBackend::open().expect("netlink socket");
        backend
            .apply(&Transaction::create(&table))
            .unwrap_or_else(|e| panic!("program: {e}"));
        let read_back = backend.list(table.family, &table.name).expect("read back");
        (read_back, nft_list())
    })
    .expect("new network namespace")
}

#[test]
fn every_golden_table_round_trips_through_the_kernel() {
    if !kernel_available("every_golden_table_round_trips_through_the_kernel") {
        return;
    }
    let mut checked = 0;
    for (name, table) in golden_tables() {
        let (read_back, listing) = program_and_list(table.clone());
        assert_eq!(
            read_back.as_ref(),
            Some(&table),
            "{name}: read back differs"
        );
        let header = format!("table {} {} {{", table.family, table.name);
        assert!(
            listing.contains(&header),
            "{name}: nft lists no table:\n{listing}"
        );
        let text = table.to_string();
        let reference =
            in_new_netns(move || nft_load_and_list(&text)).expect("new network namespace");
        assert_eq!(
            normalise_listing(&listing),
            normalise_listing(&reference),
            "{name}: `nft list` of the netlink-programmed table differs from `nft -f` of its text"
        );
        checked += 1;
    }
    assert!(checked >= 45, "only {checked} tables checked");
}

#[test]
fn a_staged_creation_programs_the_same_table() {
    if !kernel_available("a_staged_creation_programs_the_same_table") {
        return;
    }
    for (name, table) in golden_tables() {
        let programmed = table.clone();
        let (stages, read_back) = in_new_netns(move || {
            let mut backend = NetlinkBackend::open().expect("netlink socket");
            let stages: Vec<Transaction> = Transaction::create_staged(&programmed, 10).collect();
            for stage in &stages {
                backend
                    .apply(stage)
                    .unwrap_or_else(|e| panic!("program: {e}\n{stage}"));
            }
            let read_back = backend
                .list(programmed.family, &programmed.name)
                .expect("read back");
            (stages.len(), read_back)
        })
        .expect("new network namespace");
        assert_eq!(
            read_back.as_ref(),
            Some(&table),
            "{name} in {stages} stages"
        );
    }
}

#[test]
fn diffs_between_golden_tables_apply_in_the_kernel() {
    if !kernel_available("diffs_between_golden_tables_apply_in_the_kernel") {
        return;
    }
    let tables: Vec<Table> = golden_tables()
        .into_iter()
        .filter(|(_, t)| t.family == Family::Ip)
        .map(|(_, t)| t)
        .collect();
    let steps = tables.len();
    let final_state = in_new_netns(move || {
        let mut backend = NetlinkBackend::open().expect("netlink socket");
        let mut current: Option<Table> = None;
        for table in &tables {
            let tx = diff(current.as_ref(), table);
            backend.apply(&tx).unwrap_or_else(|e| panic!("{e}\n{tx}"));
            let read_back = backend.list(Family::Ip, &table.name).expect("read back");
            assert_eq!(read_back.as_ref(), Some(table), "after\n{tx}");
            assert!(diff(read_back.as_ref(), table).is_empty());
            current = read_back;
        }
        current
    })
    .expect("new network namespace");
    assert!(final_state.is_some() && steps >= 40);
}

#[test]
fn rules_are_deleted_and_inserted_by_handle_and_kept_ones_stay() {
    if !kernel_available("rules_are_deleted_and_inserted_by_handle_and_kept_ones_stay") {
        return;
    }
    let rules = |last_octets: &[u8]| -> Vec<Rule> {
        last_octets
            .iter()
            .map(|p| {
                Rule::new(vec![
                    Stmt::eq(Expr::daddr(Family::Ip), Rhs::addr([10, 0, 0, *p].into())),
                    Stmt::Verdict(nftproxy_nft::Verdict::Accept),
                ])
            })
            .collect()
    };
    let table = |last_octets: &[u8]| {
        let mut t = Table::new(Family::Ip, "nftproxy");
        // Another chain's rules come first, so handles and positions differ.
        t.add_chain(Chain::regular("other", rules(&[9, 9])));
        t.add_chain(Chain::regular("c", rules(last_octets)));
        t
    };
    // Rules go at the head, two before one kept rule, and at the end.
    let (from, to) = (table(&[1, 2, 3, 4, 5]), table(&[0, 1, 3, 7, 8, 5, 6]));
    let tx = diff(Some(&from), &to);
    assert!(
        matches!(&tx.ops[0], Op::EditRules { deleted, added, .. }
            if deleted == &[1, 3] && added == &[0, 3, 4, 6]),
        "{tx}"
    );
    let (read_back, refused, untouched) = in_new_netns(move || {
        let mut backend = NetlinkBackend::open().expect("netlink socket");
        backend.apply(&Transaction::create(&from)).expect("program");
        backend.apply(&tx).unwrap_or_else(|e| panic!("{e}\n{tx}"));
        let read_back = backend.list(Family::Ip, "nftproxy").expect("read back");
        // Someone else's rule in the chain: positions no longer name the right rules,
        // so the same kind of transaction is refused before anything is sent.
        run_ok(
            Command::new("nft").args(["add rule ip nftproxy c ip daddr 10.0.0.99 accept"]),
            "",
        );
        let before = backend.list(Family::Ip, "nftproxy").expect("read back");
        let again = diff(read_back.as_ref(), &from);
        let refused = backend.apply(&again).is_err();
        let after = backend.list(Family::Ip, "nftproxy").expect("read back");
        (read_back, refused, before == after)
    })
    .expect("new network namespace");
    assert_eq!(read_back, Some(to));
    assert!(
        refused && untouched,
        "a chain changed behind our back was not noticed"
    );
}

#[test]
fn what_the_data_path_put_in_a_dynamic_set_is_left_alone() {
    if !kernel_available("what_the_data_path_put_in_a_dynamic_set_is_left_alone") {
        return;
    }
    let mut table = Table::new(Family::Ip, "nftproxy");
    let key = vec![Expr::saddr(Family::Ip), Expr::NumgenRandom(1)];
    let set = Set::typeof_set("affinity", key).expect("typeof");
    table.add_set(Set {
        dynamic: true,
        timeout: Some(10_800),
        ..set
    });
    let (read_back, listing) = in_new_netns(move || {
        let mut backend = NetlinkBackend::open().expect("netlink socket");
        backend
            .apply(&Transaction::create(&table))
            .expect("program");
        // A client the data path recorded.
        run_ok(
            Command::new("nft").args(["add element ip nftproxy affinity { 10.1.2.3 . 7 }"]),
            "",
        );
        let read_back = backend.list(Family::Ip, "nftproxy").expect("read back");
        let tx = diff(read_back.as_ref(), &table);
        assert!(tx.is_empty(), "{tx}");
        (read_back == Some(table), nft_list())
    })
    .expect("new network namespace");
    assert!(read_back, "the client came back as configuration");
    assert!(listing.contains("10.1.2.3 . 7"), "{listing}");
}

#[test]
fn a_refused_batch_changes_nothing_and_names_the_operation() {
    if !kernel_available("a_refused_batch_changes_nothing_and_names_the_operation") {
        return;
    }
    let (table, error, after) = in_new_netns(|| {
        let mut backend = NetlinkBackend::open().expect("netlink socket");
        let mut table = Table::new(Family::Ip, "nftproxy");
        table.add_chain(Chain::regular(
            "a",
            vec![Rule::new(vec![Stmt::Verdict(
                nftproxy_nft::Verdict::Accept,
            )])],
        ));
        backend
            .apply(&Transaction::create(&table))
            .expect("initial table");
        // A good operation followed by a rule that jumps to a chain that does not exist.
        let mut tx = Transaction::new(Family::Ip, "nftproxy");
        tx.ops.push(Op::AddChain {
            name: "b".into(),
            base: None,
        });
        tx.ops.push(Op::AddRule {
            chain: "a".into(),
            rule: Rule::new(vec![Stmt::jump("missing")]),
        });
        let error = backend
            .apply(&tx)
            .expect_err("the kernel refuses a jump to nowhere");
        let after = backend.list(Family::Ip, "nftproxy").expect("read back");
        (table, error, after)
    })
    .expect("new network namespace");
    assert_eq!(
        after.as_ref(),
        Some(&table),
        "nothing of the refused batch was applied"
    );
    assert!(matches!(error, Error::Kernel { errno: 2, .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.starts_with("add rule in chain a `jump missing`: ENOENT"),
        "{message}"
    );
}

#[test]
fn deleting_the_table_removes_everything() {
    if !kernel_available("deleting_the_table_removes_everything") {
        return;
    }
    let (_, table) = golden_tables().remove(0);
    let listing = in_new_netns(move || {
        let mut backend = NetlinkBackend::open().expect("netlink socket");
        backend
            .apply(&Transaction::create(&table))
            .expect("program");
        let mut tx = Transaction::new(table.family, table.name.clone());
        tx.ops.push(Op::DeleteTable);
        backend.apply(&tx).expect("delete");
        assert_eq!(backend.list(table.family, &table.name).expect("list"), None);
        nft_list()
    })
    .expect("new network namespace");
    assert_eq!(listing.trim(), "");
}

/// Rules' bytecode as `nft --debug=netlink` prints it for a ruleset text, in order.
fn nft_bytecode(text: &str) -> Vec<Vec<String>> {
    let stdout = run_ok(
        Command::new("unshare").args(["--net", "nft", "--debug=netlink", "-c", "-f", "-"]),
        text,
    );
    let mut rules: Vec<Vec<String>> = Vec::new();
    let mut in_rule = false;
    for line in stdout.lines() {
        if line.starts_with("ip nftproxy ") || line.starts_with("ip6 nftproxy ") {
            rules.push(Vec::new());
            in_rule = true;
        } else if in_rule && line.trim_start().starts_with('[') {
            rules
                .last_mut()
                .expect("a rule header came first")
                .push(line.trim().to_owned());
        } else if !line.starts_with(' ') {
            in_rule = false;
        }
    }
    rules
}

#[test]
fn every_rule_is_encoded_exactly_as_nft_encodes_it() {
    if !kernel_available("every_rule_is_encoded_exactly_as_nft_encodes_it") {
        return;
    }
    let mut compared = 0;
    for (name, table) in golden_tables() {
        let ours: Vec<Vec<String>> = table
            .chains_in_order()
            .flat_map(|chain| chain.rules.iter())
            .map(|rule| nftproxy_netlink::rule_bytecode(table.family, rule).expect("encodes"))
            .collect();
        let theirs = nft_bytecode(&table.to_string());
        assert_eq!(ours.len(), theirs.len(), "{name}: rule count");
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(a, b, "{name}: rule {i} encodes differently from nft");
        }
        compared += ours.len();
    }
    assert!(compared > 1000, "only {compared} rules compared");
    eprintln!("{compared} rules encoded exactly as nft encodes them");
}

/// A `typeof` map of `address . port` values, a set gating it, and the rule that picks
/// an element at random and DNATs to it: what load balancing by map elements needs.
fn load_balancing_table(family: Family) -> Table {
    let (service, endpoint) = match family {
        Family::Ip => ("172.30.0.1", "10.1.0.1"),
        Family::Ip6 => ("fd00:30::1", "fd00:1::1"),
    };
    let service: IpAddr = service.parse().expect("address");
    let endpoint: IpAddr = endpoint.parse().expect("address");
    let udp_port = || Expr::Payload(PayloadField::Dport(L4Proto::Udp));
    let mut table = Table::new(family, "nftproxy");
    table.add_set(
        Set::typeof_map(
            "endpoints",
            vec![Expr::daddr(family), udp_port(), Expr::NumgenRandom(1)],
            vec![Expr::daddr(family), udp_port()],
        )
        .expect("typed expressions")
        .with_comment("endpoints by service address and index"),
    );
    table.add_set(Set::new(
        "endpoints-2",
        vec![family.addr_type(), DataType::InetService],
    ));
    let service_key = vec![Value::Addr(service), Value::Port(53)];
    table.add_element("endpoints-2", Element::new(service_key.clone()));
    for (index, port) in [(0, 5353), (1, 5354)] {
        let mut key = service_key.clone();
        key.push(Value::Number(index));
        table.add_element(
            "endpoints",
            Element::mapped(key, vec![Value::Addr(endpoint), Value::Port(port)]),
        );
    }
    let destination = || vec![Expr::daddr(family), Expr::th_dport()];
    let mut drawn = destination();
    drawn.push(Expr::NumgenRandom(2));
    table.add_chain(Chain::regular(
        "load-balance",
        vec![Rule::new(vec![
            Stmt::eq(Expr::MetaL4proto, Rhs::Proto(L4Proto::Udp)),
            Stmt::lookup(Expr::Concat(destination()), "endpoints-2"),
            Stmt::DnatMap {
                family,
                key: Expr::Concat(drawn),
                map: "endpoints".to_owned(),
            },
        ])],
    ));
    table
}

#[test]
fn maps_of_endpoints_round_trip_and_list_like_their_text() {
    if !kernel_available("maps_of_endpoints_round_trip_and_list_like_their_text") {
        return;
    }
    for family in [Family::Ip, Family::Ip6] {
        let table = load_balancing_table(family);
        let (read_back, listing) = program_and_list(table.clone());
        assert_eq!(read_back.as_ref(), Some(&table), "{family}: read back");
        let text = table.to_string();
        assert_eq!(
            normalise_listing(&listing),
            normalise_listing(&text),
            "{family}: `nft list` differs from the text"
        );
        let reference =
            in_new_netns(move || nft_load_and_list(&text)).expect("new network namespace");
        assert_eq!(normalise_listing(&reference), normalise_listing(&listing));
    }
}

#[test]
fn the_generation_moves_by_one_per_commit_and_with_other_programs_commits() {
    if !kernel_available("the_generation_moves_by_one_per_commit_and_with_other_programs_commits") {
        return;
    }
    in_new_netns(|| {
        let mut backend = NetlinkBackend::open().expect("netlink socket");
        let start = backend.generation().expect("generation").expect("a number");
        let table = golden_tables()
            .into_iter()
            .next()
            .expect("a golden table")
            .1;
        backend
            .apply(&Transaction::create(&table))
            .expect("program");
        assert_eq!(backend.generation().unwrap(), Some(start.wrapping_add(1)));
        // Reading changes nothing.
        backend.list(table.family, &table.name).expect("read back");
        assert_eq!(backend.generation().unwrap(), Some(start.wrapping_add(1)));
        // Another program's commit, even to another table, moves it.
        run_ok(
            Command::new("nft").args(["add", "table", "inet", "other"]),
            "",
        );
        assert_eq!(backend.generation().unwrap(), Some(start.wrapping_add(2)));
        // A refused batch commits nothing.
        let mut broken = Transaction::new(table.family, table.name.clone());
        broken.ops.push(Op::DeleteChain("no-such-chain".into()));
        assert!(backend.apply(&broken).is_err());
        assert_eq!(backend.generation().unwrap(), Some(start.wrapping_add(2)));
        // The notifications say whose commits touched which table: ours only by us,
        // until another program flushes one of our chains.
        assert_eq!(backend.changed_by_others(&table.name).unwrap(), Some(false));
        assert_eq!(backend.changed_by_others("other").unwrap(), Some(true));
        let family = table.family.to_string();
        let chain = table.chains.keys().next().expect("a chain").clone();
        run_ok(
            Command::new("nft").args(["flush", "chain", &family, &table.name, &chain]),
            "",
        );
        assert_eq!(backend.changed_by_others(&table.name).unwrap(), Some(true));
        assert_eq!(backend.changed_by_others(&table.name).unwrap(), Some(false));
    })
    .expect("new network namespace");
}

/// The interface addresses of a namespace, as NodePorts with CIDR `nodePortAddresses`
/// need them, and the listener told when one comes or goes.
#[test]
fn interface_addresses_are_read_and_their_changes_announced() {
    if !kernel_available("interface_addresses_are_read_and_their_changes_announced") {
        return;
    }
    in_new_netns(|| {
        let ip = |args: &[&str]| run_ok(Command::new("ip").args(args), "");
        ip(&["link", "set", "lo", "up"]);
        ip(&[
            "link", "add", "eth1", "type", "veth", "peer", "name", "peer1",
        ]);
        ip(&["link", "set", "eth1", "up"]);
        ip(&["addr", "add", "10.20.1.5/24", "dev", "eth1"]);
        ip(&["addr", "add", "fd00:20::5/64", "dev", "eth1", "nodad"]);
        let mut watch = nftproxy_netlink::AddressWatch::open().expect("listener");
        assert!(!watch.changed().expect("nothing queued"));
        let found = nftproxy_netlink::interface_addresses().expect("addresses");
        let on = |text: &str| {
            let address: IpAddr = text.parse().expect("literal");
            found
                .iter()
                .find(|a| a.address == address)
                .map(|a| a.interface.clone())
        };
        assert_eq!(on("10.20.1.5").as_deref(), Some("eth1"), "{found:?}");
        assert_eq!(on("fd00:20::5").as_deref(), Some("eth1"), "{found:?}");
        assert_eq!(on("127.0.0.1").as_deref(), Some("lo"), "{found:?}");
        // An address added, then removed: each announced.
        ip(&["addr", "add", "10.20.7.7/32", "dev", "eth1"]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(watch.changed().expect("read"));
        assert!(
            nftproxy_netlink::interface_addresses()
                .expect("addresses")
                .iter()
                .any(|a| a.address == IpAddr::from([10, 20, 7, 7]))
        );
        ip(&["addr", "del", "10.20.7.7/32", "dev", "eth1"]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(watch.changed().expect("read"));
        assert!(!watch.changed().expect("read"));
    })
    .expect("new network namespace");
}

/// A verdict map at the limits: 50,000 elements, each with a 128-byte comment and a goto
/// to the longest chain name, in as many messages as their bounds need, and the set's
/// name as long as nf_tables takes. All of it reaches the kernel and reads back, also
/// while the kernel resizes the set's hash table (its dump then walks the table anew
/// from the next message, and some elements come twice and others not at all: it was
/// read wrong in three runs of four before such a dump was detected and read again).
#[test]
fn elements_at_their_limits_reach_the_kernel_in_split_messages() {
    if !kernel_available("elements_at_their_limits_reach_the_kernel_in_split_messages") {
        return;
    }
    let chain = "c".repeat(255);
    let mut map = Set::verdict_map(
        "m".repeat(255),
        vec![
            DataType::Ipv6Addr,
            DataType::InetProto,
            DataType::InetService,
        ],
    );
    for i in 0..50_000u32 {
        let key = vec![
            Value::Addr(IpAddr::from((u128::from(i) << 32).to_be_bytes())),
            Value::Proto(L4Proto::Tcp),
            Value::Port(80),
        ];
        let element = Element::with_verdict(key, nftproxy_nft::Verdict::Goto(chain.clone()))
            .with_comment(format!("{i:0>128}"));
        map.elements.insert(element);
    }
    let mut table = Table::new(Family::Ip6, "nftproxy");
    table.chains.insert(
        chain.clone(),
        Chain {
            name: chain,
            base: None,
            rules: Vec::new(),
        },
    );
    table.sets.insert(map.name.clone(), map);
    // Read right after the commit, while the kernel may still be resizing the set's
    // hash table.
    let (read_back, listing) = program_and_list(table.clone());
    assert_eq!(listing.matches("comment \"").count(), 50_000);
    assert_eq!(read_back.as_ref(), Some(&table));
}
