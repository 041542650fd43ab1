//! A packet tracer over a [`Table`]: which base chains the first packet of a connection
//! passes, which rules match, and every possible outcome with its probability.
//!
//! Invariant: evaluation follows the kernel's semantics for the statements nftproxy
//! writes — hooks in priority order, `jump` returns, `goto` does not, a NAT statement ends
//! its chain, `numgen random mod N` takes every value with probability 1/N — and the
//! probabilities of all outcomes sum to 1. Dynamic sets (ClientIP affinity) are treated as
//! empty: a first packet has no affinity yet.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::expr::{
    CmpOp, CtState, CtStatus, Expr, FibInput, MarkOp, PayloadField, Rhs, Rule, Stmt,
};
use crate::table::Table;
use crate::types::{Hook, L4Proto, Value, Verdict};

/// The first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub saddr: IpAddr,
    /// Destination address.
    pub daddr: IpAddr,
    /// Protocol.
    pub proto: L4Proto,
    /// Destination port.
    pub dport: u16,
    /// Input interface (empty for locally generated packets).
    pub iifname: String,
}

/// Where the packet comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// It arrives on an interface (another host, or a pod): prerouting, then input or
    /// forward, then postrouting when forwarded.
    Arriving,
    /// The node itself sends it: output, then postrouting.
    Local,
}

/// How the packet's journey through the node's nftproxy rules ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fate {
    /// It goes on: delivered to the node or forwarded.
    Accepted,
    /// Silently dropped.
    Dropped,
    /// Rejected with ICMP port unreachable.
    Rejected,
}

/// One rule that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The base chain (hook) being evaluated.
    pub hook: String,
    /// The chain holding the rule.
    pub chain: String,
    /// The rule's index in its chain.
    pub index: usize,
    /// The rule's text.
    pub rule: String,
}

/// One possible outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Its probability (all outcomes sum to 1).
    pub probability: f64,
    /// How it ends.
    pub fate: Fate,
    /// The destination after DNAT, when DNAT happened.
    pub dnat: Option<(IpAddr, u16)>,
    /// Whether the source is masqueraded on the way out.
    pub masquerade: bool,
    /// The rules that matched, in order.
    pub steps: Vec<Step>,
}

/// Traces `packet` through `table` on a node whose own addresses are `local_addrs`.
pub fn trace(
    table: &Table,
    packet: &Packet,
    origin: Origin,
    local_addrs: &[IpAddr],
) -> Vec<Outcome> {
    let start = State {
        packet: packet.clone(),
        mark: 0,
        dnat: None,
        masquerade: false,
        steps: Vec::new(),
        probability: 1.0,
    };
    let tracer = Tracer { table, local_addrs };
    let mut finished = Vec::new();
    // Runs `hooks` on every live branch; ended branches are finished, survivors returned.
    let stage = |states: Vec<State>, hooks: &[Hook], finished: &mut Vec<Outcome>| -> Vec<State> {
        let mut survivors = Vec::new();
        for state in states {
            for (state, fate) in tracer.hooks(hooks, state) {
                match fate {
                    Fate::Accepted => survivors.push(state),
                    other => finished.push(state.finish(other)),
                }
            }
        }
        survivors
    };
    let states = match origin {
        Origin::Local => stage(vec![start], &[Hook::Output], &mut finished),
        Origin::Arriving => {
            let routed = stage(vec![start], &[Hook::Prerouting], &mut finished);
            // The routing decision after DNAT: to the node itself (input, and no
            // postrouting), or onwards (forward, then postrouting).
            let (to_node, onwards): (Vec<State>, Vec<State>) = routed
                .into_iter()
                .partition(|s| local_addrs.contains(&s.packet.daddr));
            let delivered = stage(to_node, &[Hook::Input], &mut finished);
            finished.extend(delivered.into_iter().map(|s| s.finish(Fate::Accepted)));
            stage(onwards, &[Hook::Forward], &mut finished)
        }
    };
    let sent = stage(states, &[Hook::Postrouting], &mut finished);
    finished.extend(sent.into_iter().map(|s| s.finish(Fate::Accepted)));
    finished
}

#[derive(Debug, Clone)]
struct State {
    packet: Packet,
    mark: u32,
    dnat: Option<(IpAddr, u16)>,
    masquerade: bool,
    steps: Vec<Step>,
    probability: f64,
}

impl State {
    fn finish(self, fate: Fate) -> Outcome {
        Outcome {
            probability: self.probability,
            fate,
            dnat: self.dnat,
            masquerade: self.masquerade,
            steps: self.steps,
        }
    }
}

/// How evaluating a chain ended for one branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Fell off the end or `return`ed: the caller continues.
    Continue,
    /// A terminal verdict for this hook.
    Fate(Fate),
}

struct Tracer<'t> {
    table: &'t Table,
    local_addrs: &'t [IpAddr],
}

impl Tracer<'_> {
    /// Runs the base chains of `hooks` in priority order; returns the surviving branches
    /// with `Accepted`, and the ended ones with their fate.
    fn hooks(&self, hooks: &[Hook], state: State) -> Vec<(State, Fate)> {
        let mut bases: Vec<_> = self
            .table
            .chains
            .values()
            .filter_map(|c| c.base.map(|b| (b, c)))
            .filter(|(b, _)| hooks.contains(&b.hook))
            .collect();
        bases.sort_by_key(|(b, c)| (b.priority, c.name.clone()));
        let mut live = vec![state];
        let mut ended = Vec::new();
        for (_, chain) in bases {
            let mut next = Vec::new();
            for state in live {
                for (state, end) in self.chain(&chain.name, &chain.name, state, 0) {
                    match end {
                        End::Continue | End::Fate(Fate::Accepted) => next.push(state),
                        End::Fate(fate) => ended.push((state, fate)),
                    }
                }
            }
            live = next;
        }
        live.into_iter()
            .map(|s| (s, Fate::Accepted))
            .chain(ended)
            .collect()
    }

    fn chain(&self, hook: &str, name: &str, state: State, depth: usize) -> Vec<(State, End)> {
        let Some(chain) = self.table.chains.get(name) else {
            return vec![(state, End::Continue)];
        };
        // Only a loop in the ruleset could get this deep; the kernel refuses those.
        if depth > 16 {
            return vec![(state, End::Fate(Fate::Dropped))];
        }
        self.rules(hook, name, &chain.rules, 0, state, depth)
    }

    /// Evaluates `rules[from..]` of chain `name` for one branch.
    fn rules(
        &self,
        hook: &str,
        name: &str,
        rules: &[Rule],
        from: usize,
        state: State,
        depth: usize,
    ) -> Vec<(State, End)> {
        let Some(rule) = rules.get(from) else {
            return vec![(state, End::Continue)];
        };
        let mut results = Vec::new();
        for (state, flow) in self.rule(hook, name, from, rule, state, depth) {
            match flow {
                Flow::NoMatch | Flow::Continue => {
                    results.extend(self.rules(hook, name, rules, from + 1, state, depth));
                }
                Flow::End(end) => results.push((state, end)),
            }
        }
        results
    }

    fn rule(
        &self,
        hook: &str,
        chain: &str,
        index: usize,
        rule: &Rule,
        state: State,
        depth: usize,
    ) -> Vec<(State, Flow)> {
        let mut branches = vec![(state, 0usize)];
        let mut done = Vec::new();
        while let Some((mut state, at)) = branches.pop() {
            let Some(stmt) = rule.stmts.get(at) else {
                // Every statement passed without ending the chain: the rule matched.
                record(&mut state, hook, chain, index, rule);
                done.push((state, Flow::Continue));
                continue;
            };
            match self.stmt(stmt, &mut state) {
                Step_::Next => branches.push((state, at + 1)),
                Step_::NoMatch => done.push((state, Flow::NoMatch)),
                Step_::Random(modulus) => {
                    let hit = 1.0 / f64::from(modulus);
                    let mut miss = state.clone();
                    miss.probability *= 1.0 - hit;
                    state.probability *= hit;
                    if miss.probability > 0.0 {
                        done.push((miss, Flow::NoMatch));
                    }
                    branches.push((state, at + 1));
                }
                Step_::DnatChoices(choices) => {
                    let share = 1.0 / choices.len() as f64;
                    for choice in choices {
                        let mut state = state.clone();
                        state.probability *= share;
                        match choice {
                            Some((addr, port)) => {
                                dnat(&mut state, addr, port);
                                record(&mut state, hook, chain, index, rule);
                                done.push((state, Flow::End(End::Fate(Fate::Accepted))));
                            }
                            None => done.push((state, Flow::NoMatch)),
                        }
                    }
                }
                Step_::Verdict(verdict) => {
                    record(&mut state, hook, chain, index, rule);
                    done.extend(self.verdict(hook, verdict, state, depth));
                }
                Step_::End(end) => {
                    record(&mut state, hook, chain, index, rule);
                    done.push((state, Flow::End(end)));
                }
            }
        }
        done
    }

    fn verdict(
        &self,
        hook: &str,
        verdict: Verdict,
        state: State,
        depth: usize,
    ) -> Vec<(State, Flow)> {
        match verdict {
            Verdict::Accept => vec![(state, Flow::End(End::Fate(Fate::Accepted)))],
            Verdict::Drop => vec![(state, Flow::End(End::Fate(Fate::Dropped)))],
            Verdict::Return => vec![(state, Flow::End(End::Continue))],
            Verdict::Jump(target) => self
                .chain(hook, &target, state, depth + 1)
                .into_iter()
                .map(|(s, end)| match end {
                    // Back from a jump: the calling rule is done, the chain goes on.
                    End::Continue => (s, Flow::Continue),
                    end => (s, Flow::End(end)),
                })
                .collect(),
            Verdict::Goto(target) => self
                .chain(hook, &target, state, depth + 1)
                .into_iter()
                .map(|(s, end)| (s, Flow::End(end)))
                .collect(),
        }
    }

    fn stmt(&self, stmt: &Stmt, state: &mut State) -> Step_ {
        match stmt {
            Stmt::Match {
                left: Expr::NumgenRandom(modulus),
                op: CmpOp::Eq,
                right: Rhs::Number(0),
            } => Step_::Random(*modulus),
            Stmt::Match { left, op, right } => {
                let holds = self.matches(left, right, state);
                if holds == (*op == CmpOp::Eq) {
                    Step_::Next
                } else {
                    Step_::NoMatch
                }
            }
            Stmt::Lookup { left, set } => {
                if self.element(set, left, state).is_some() {
                    Step_::Next
                } else {
                    Step_::NoMatch
                }
            }
            Stmt::Vmap { key, map } => match self
                .element(map, key, state)
                .and_then(|e| e.verdict().cloned())
            {
                Some(verdict) => Step_::Verdict(verdict),
                None => Step_::NoMatch,
            },
            Stmt::SetMark(MarkOp::Or(bits)) => {
                state.mark |= bits;
                Step_::Next
            }
            Stmt::SetMark(MarkOp::Xor(bits)) => {
                state.mark ^= bits;
                Step_::Next
            }
            Stmt::Update { .. } | Stmt::Counter => Step_::Next,
            Stmt::Dnat { addr, port } => {
                dnat(state, *addr, *port);
                Step_::End(End::Fate(Fate::Accepted))
            }
            Stmt::DnatMap { key, map, .. } => {
                // One equally likely choice per value of the key's `numgen` (one choice
                // without it); a value whose key finds no element does not match.
                let modulus = numgen_modulus(key).unwrap_or(1);
                Step_::DnatChoices(
                    (0..modulus)
                        .map(|n| {
                            let key = values(key, state, n)?;
                            let element = self.table.sets.get(map)?.elements.get(&key)?;
                            match element.data().as_slice() {
                                [Value::Addr(addr), Value::Port(port)] => Some((*addr, *port)),
                                _ => None,
                            }
                        })
                        .collect(),
                )
            }
            Stmt::MasqueradeFullyRandom => {
                state.masquerade = true;
                Step_::End(End::Fate(Fate::Accepted))
            }
            Stmt::Reject => Step_::End(End::Fate(Fate::Rejected)),
            Stmt::Verdict(verdict) => Step_::Verdict(verdict.clone()),
        }
    }

    fn element<'s>(
        &'s self,
        set: &str,
        key: &Expr,
        state: &State,
    ) -> Option<&'s crate::elements::Element> {
        let set = self.table.sets.get(set)?;
        // Dynamic sets fill at run time; a first packet finds them empty.
        if set.dynamic {
            return None;
        }
        let key = values(key, state, 0)?;
        set.elements.get(&key)
    }

    fn matches(&self, left: &Expr, right: &Rhs, state: &State) -> bool {
        let p = &state.packet;
        match (left, right) {
            (Expr::Payload(PayloadField::Saddr(_)), Rhs::Prefix(net)) => net.contains(&p.saddr),
            (Expr::Payload(PayloadField::Daddr(_)), Rhs::Prefix(net)) => net.contains(&p.daddr),
            (Expr::MetaL4proto, Rhs::Proto(proto)) => p.proto == *proto,
            (Expr::MetaMarkAnd(mask), Rhs::Mark(value)) => state.mark & mask == *value,
            (Expr::Iifname, Rhs::Ifname(name)) => match name.strip_suffix('*') {
                Some(prefix) => p.iifname.starts_with(prefix),
                None => p.iifname == *name,
            },
            (Expr::CtState, Rhs::CtState(CtState::New)) => true,
            (Expr::CtStatus, Rhs::CtStatus(CtStatus::Dnat)) => state.dnat.is_some(),
            (Expr::FibType(FibInput::Saddr), Rhs::FibLocal) => self.local_addrs.contains(&p.saddr),
            (Expr::FibType(FibInput::Daddr), Rhs::FibLocal) => self.local_addrs.contains(&p.daddr),
            _ => false,
        }
    }
}

/// What one statement does to a branch.
enum Step_ {
    Next,
    NoMatch,
    Random(u32),
    /// DNAT to one of these, each as likely; `None`: no match.
    DnatChoices(Vec<Option<(IpAddr, u16)>>),
    Verdict(Verdict),
    End(End),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    NoMatch,
    Continue,
    End(End),
}

fn record(state: &mut State, hook: &str, chain: &str, index: usize, rule: &Rule) {
    state.steps.push(Step {
        hook: hook.to_owned(),
        chain: chain.to_owned(),
        index,
        rule: rule.to_string(),
    });
}

fn dnat(state: &mut State, addr: IpAddr, port: u16) {
    state.packet.daddr = addr;
    state.packet.dport = port;
    state.dnat = Some((addr, port));
}

/// The modulus of the `numgen` inside a key, if it has one.
fn numgen_modulus(key: &Expr) -> Option<u32> {
    match key {
        Expr::NumgenRandom(modulus) => Some(*modulus),
        Expr::Concat(parts) => parts.iter().find_map(numgen_modulus),
        _ => None,
    }
}

/// The values a (possibly concatenated) key expression has for this packet, with
/// `numgen` drawing `drawn`.
fn values(key: &Expr, state: &State, drawn: u32) -> Option<Vec<Value>> {
    let p = &state.packet;
    let one = |e: &Expr| -> Option<Value> {
        Some(match e {
            Expr::Payload(PayloadField::Saddr(_)) => Value::Addr(p.saddr),
            Expr::Payload(PayloadField::Daddr(_)) => Value::Addr(p.daddr),
            Expr::Payload(PayloadField::ThDport) => Value::Port(p.dport),
            Expr::Payload(PayloadField::Dport(proto)) if p.proto == *proto => Value::Port(p.dport),
            Expr::PayloadAnd(field, mask) => {
                let [loaded] = values(&Expr::Payload(*field), state, drawn)?[..] else {
                    return None;
                };
                loaded.last_byte_and(*mask)?
            }
            Expr::MetaL4proto => Value::Proto(p.proto),
            Expr::NumgenRandom(_) => Value::Number(drawn),
            Expr::Tag(tag) => Value::Number(*tag),
            _ => return None,
        })
    };
    match key {
        Expr::Concat(parts) => parts.iter().map(one).collect(),
        single => one(single).map(|v| vec![v]),
    }
}

/// What happens to a packet, whatever rules led there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Effect {
    /// How it ends.
    pub fate: Fate,
    /// The destination after DNAT, when DNAT happened.
    pub dnat: Option<(IpAddr, u16)>,
    /// Whether the source is masqueraded.
    pub masquerade: bool,
}

/// Outcomes grouped by effect, with their probabilities added up, in a stable order.
pub fn summarise(outcomes: &[Outcome]) -> BTreeMap<Effect, f64> {
    let mut summary = BTreeMap::new();
    for outcome in outcomes {
        let effect = Effect {
            fate: outcome.fate,
            dnat: outcome.dnat,
            masquerade: outcome.masquerade,
        };
        *summary.entry(effect).or_insert(0.0) += outcome.probability;
    }
    summary
}

/// One line for a set of outcomes: `dnat 10.180.0.1:80 (50%), dnat 10.180.0.2:80 (50%)`,
/// with ` masquerade` where the source is rewritten; `accept` means the rules leave the
/// packet alone, `drop` and `reject` are the filter verdicts.
pub fn describe(outcomes: &[Outcome]) -> String {
    let summary = summarise(outcomes);
    let whole = summary.len() == 1;
    summary
        .iter()
        .map(|(effect, probability)| {
            let mut text = match (effect.fate, effect.dnat) {
                (Fate::Accepted, Some((IpAddr::V4(ip), port))) => format!("dnat {ip}:{port}"),
                (Fate::Accepted, Some((IpAddr::V6(ip), port))) => format!("dnat [{ip}]:{port}"),
                (Fate::Accepted, None) => "accept".to_owned(),
                (Fate::Dropped, _) => "drop".to_owned(),
                (Fate::Rejected, _) => "reject".to_owned(),
            };
            if effect.masquerade {
                text.push_str(" masquerade");
            }
            if !whole {
                text.push_str(&format!(" ({:.1}%)", probability * 100.0));
            }
            text
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elements::Element;
    use crate::table::{Chain, Set};
    use crate::types::{BaseChain, ChainType, DataType, Priority};

    /// A nat prerouting chain sending 10.96.0.1:80 to a three-endpoint cascade.
    fn table() -> Table {
        let mut t = Table::new(crate::Family::Ip, "t");
        let key = Expr::Concat(vec![
            Expr::daddr(crate::Family::Ip),
            Expr::MetaL4proto,
            Expr::th_dport(),
        ]);
        t.add_set(Set::verdict_map(
            "svc",
            vec![
                DataType::Ipv4Addr,
                DataType::InetProto,
                DataType::InetService,
            ],
        ));
        t.add_element(
            "svc",
            Element::with_verdict(
                vec![
                    Value::Addr([10, 96, 0, 1].into()),
                    Value::Proto(L4Proto::Tcp),
                    Value::Port(80),
                ],
                Verdict::Goto("s".into()),
            ),
        );
        let base = BaseChain {
            chain_type: ChainType::Nat,
            hook: Hook::Prerouting,
            priority: Priority::DSTNAT,
        };
        t.add_chain(Chain::base(
            "pre",
            base,
            vec![Rule::new(vec![Stmt::jump("services")])],
        ));
        t.add_chain(Chain::regular(
            "services",
            vec![Rule::new(vec![Stmt::Vmap {
                key,
                map: "svc".into(),
            }])],
        ));
        let ep = |last: u8, modulus: Option<u32>| {
            let mut stmts = Vec::new();
            if let Some(m) = modulus {
                stmts.push(Stmt::eq(Expr::NumgenRandom(m), Rhs::Number(0)));
            }
            stmts.push(Stmt::Dnat {
                addr: [10, 0, 0, last].into(),
                port: 8080,
            });
            Rule::new(stmts)
        };
        t.add_chain(Chain::regular(
            "s",
            vec![ep(1, Some(3)), ep(2, Some(2)), ep(3, None)],
        ));
        t
    }

    fn packet(daddr: [u8; 4], dport: u16) -> Packet {
        Packet {
            saddr: [10, 1, 2, 3].into(),
            daddr: daddr.into(),
            proto: L4Proto::Tcp,
            dport,
            iifname: "eth0".into(),
        }
    }

    #[test]
    fn a_map_of_endpoints_gives_every_element_an_equal_share_and_misses_fall_through() {
        let mut t = table();
        let family = crate::Family::Ip;
        t.add_set(
            Set::typeof_map(
                "endpoints",
                vec![Expr::daddr(family), Expr::th_dport(), Expr::NumgenRandom(1)],
                vec![Expr::daddr(family), Expr::th_dport()],
            )
            .unwrap(),
        );
        // Two of the three values numgen draws have an element: the third falls through
        // to the cascade of chain `s`.
        for (index, last) in [(0, 7), (2, 8)] {
            t.add_element(
                "endpoints",
                Element::mapped(
                    vec![
                        Value::Addr([10, 96, 0, 1].into()),
                        Value::Port(80),
                        Value::Number(index),
                    ],
                    vec![Value::Addr([10, 0, 1, last].into()), Value::Port(9090)],
                ),
            );
        }
        let rules = &mut t.chains.get_mut("s").unwrap().rules;
        rules.insert(
            0,
            Rule::new(vec![Stmt::DnatMap {
                family,
                key: Expr::Concat(vec![
                    Expr::daddr(family),
                    Expr::th_dport(),
                    Expr::NumgenRandom(3),
                ]),
                map: "endpoints".into(),
            }]),
        );
        let outcomes = trace(&t, &packet([10, 96, 0, 1], 80), Origin::Arriving, &[]);
        assert_eq!(
            describe(&outcomes),
            "dnat 10.0.0.1:8080 (11.1%), dnat 10.0.0.2:8080 (11.1%), \
             dnat 10.0.0.3:8080 (11.1%), dnat 10.0.1.7:9090 (33.3%), dnat 10.0.1.8:9090 (33.3%)"
        );
        let total: f64 = outcomes.iter().map(|o| o.probability).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }

    #[test]
    fn the_cascade_gives_every_endpoint_an_equal_share() {
        let outcomes = trace(&table(), &packet([10, 96, 0, 1], 80), Origin::Arriving, &[]);
        assert_eq!(
            describe(&outcomes),
            "dnat 10.0.0.1:8080 (33.3%), dnat 10.0.0.2:8080 (33.3%), dnat 10.0.0.3:8080 (33.3%)"
        );
        let total: f64 = outcomes.iter().map(|o| o.probability).sum();
        assert!((total - 1.0).abs() < 1e-9);
        let first = outcomes
            .iter()
            .find(|o| {
                o.dnat
                    .is_some_and(|(ip, _)| ip == IpAddr::from([10, 0, 0, 1]))
            })
            .unwrap();
        let chains: Vec<&str> = first.steps.iter().map(|s| s.chain.as_str()).collect();
        assert_eq!(chains, ["pre", "services", "s"]);
    }

    #[test]
    fn unmatched_packets_are_left_alone() {
        let outcomes = trace(&table(), &packet([10, 96, 0, 1], 81), Origin::Arriving, &[]);
        assert_eq!(describe(&outcomes), "accept");
        assert!(outcomes[0].steps.iter().all(|s| s.chain == "pre"));
    }
}
