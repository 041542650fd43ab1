//! Dump replies parsed back into nftproxy's objects: the generation, tables, chains,
//! rules (through [`super::expr`]), sets and elements.
//!
//! Invariant: a parser reads only the [`Message`] it is given, one whole message
//! borrowed from the receive buffer, and copies out everything it keeps.

use super::expr::{jump_target, raw_expr};
use super::*;

/// The generation id of a NEWGEN reply.
pub(crate) fn parse_generation(message: Message<'_>) -> Result<u32, Error> {
    let generation = GenObj::new();
    // SAFETY: a `Message` is a whole message of `nlmsg_len` readable bytes, borrowed for the call; `generation` is live.
    if unsafe { sys::nftnl_gen_nlmsg_parse(message.as_ptr(), generation.ptr()) } < 0 {
        return Err(Error::Decode("generation message".into()));
    }
    // SAFETY: `generation` is live; an unset attribute reads as 0.
    Ok(unsafe { sys::nftnl_gen_get_u32(generation.ptr(), sys::NFTNL_GEN_ID as u16) })
}

/// A table header parsed from a GETTABLE reply: its comment.
pub(crate) fn parse_table(message: Message<'_>) -> Result<(String, Option<String>), Error> {
    let table = TableObj::new();
    // SAFETY: a `Message` is a whole message of `nlmsg_len` readable bytes, borrowed for the call; `table` is live.
    if unsafe { sys::nftnl_table_nlmsg_parse(message.as_ptr(), table.ptr()) } < 0 {
        return Err(Error::Decode("table message".into()));
    }
    // SAFETY: `table` is live.
    let name =
        owned_str(unsafe { sys::nftnl_table_get_str(table.ptr(), sys::NFTNL_TABLE_NAME as u16) })
            .unwrap_or_default();
    let mut len = 0u32;
    // SAFETY: `table` is live; the buffer holds `len` bytes while it lives.
    let ptr = unsafe {
        sys::nftnl_table_get_data(table.ptr(), sys::NFTNL_TABLE_USERDATA as u16, &mut len)
    };
    let comment = if ptr.is_null() {
        None
    } else {
        // SAFETY: valid for `len` bytes; copied before `table` is dropped.
        let data = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize) };
        comment_of(data, sys::NFTNL_UDATA_TABLE_COMMENT as u8)
    };
    Ok((name, comment))
}

/// A chain parsed from a GETCHAIN reply, with the table it belongs to.
pub(crate) fn parse_chain(message: Message<'_>) -> Result<(String, Chain), Error> {
    let chain = ChainObj::new();
    // SAFETY: a `Message` is a whole message of `nlmsg_len` readable bytes, borrowed for the call; `chain` is live.
    if unsafe { sys::nftnl_chain_nlmsg_parse(message.as_ptr(), chain.ptr()) } < 0 {
        return Err(Error::Decode("chain message".into()));
    }
    let p = chain.ptr();
    // SAFETY: `chain` is live for all these reads.
    let (table, name, base) = unsafe {
        let table = owned_str(sys::nftnl_chain_get_str(p, sys::NFTNL_CHAIN_TABLE as u16))
            .unwrap_or_default();
        let name = owned_str(sys::nftnl_chain_get_str(p, sys::NFTNL_CHAIN_NAME as u16))
            .unwrap_or_default();
        let base = if sys::nftnl_chain_is_set(p, sys::NFTNL_CHAIN_HOOKNUM as u16) {
            let hook = hook_of(sys::nftnl_chain_get_u32(p, sys::NFTNL_CHAIN_HOOKNUM as u16));
            let chain_type =
                match owned_str(sys::nftnl_chain_get_str(p, sys::NFTNL_CHAIN_TYPE as u16))
                    .as_deref()
                {
                    Some("filter") => Some(ChainType::Filter),
                    Some("nat") => Some(ChainType::Nat),
                    _ => None,
                };
            let policy = sys::nftnl_chain_get_u32(p, sys::NFTNL_CHAIN_POLICY as u16);
            match (hook, chain_type) {
                (Some(hook), Some(chain_type)) if policy == libc::NF_ACCEPT as u32 => {
                    Some(BaseChain {
                        chain_type,
                        hook,
                        priority: Priority(sys::nftnl_chain_get_s32(
                            p,
                            sys::NFTNL_CHAIN_PRIO as u16,
                        )),
                    })
                }
                _ => {
                    return Err(Error::Decode(format!(
                        "base chain {name} is not one nftproxy writes"
                    )));
                }
            }
        } else {
            None
        };
        (table, name, base)
    };
    Ok((
        table,
        Chain {
            name,
            base,
            rules: Vec::new(),
        },
    ))
}

/// A GETRULE reply parsed, with the rule's table and chain.
fn rule_message(message: Message<'_>) -> Result<(RuleObj, String, String), Error> {
    let rule = RuleObj::new();
    // SAFETY: a `Message` is a whole message of `nlmsg_len` readable bytes, borrowed for the call; `rule` is live.
    if unsafe { sys::nftnl_rule_nlmsg_parse(message.as_ptr(), rule.ptr()) } < 0 {
        return Err(Error::Decode("rule message".into()));
    }
    let p = rule.ptr();
    // SAFETY: `rule` is live for these reads.
    let (table, chain) = unsafe {
        (
            owned_str(sys::nftnl_rule_get_str(p, sys::NFTNL_RULE_TABLE as u16)).unwrap_or_default(),
            owned_str(sys::nftnl_rule_get_str(p, sys::NFTNL_RULE_CHAIN as u16)).unwrap_or_default(),
        )
    };
    Ok((rule, table, chain))
}

/// Calls `each` on every expression of `rule`, in order, until one fails.
fn each_expr(
    rule: &RuleObj,
    mut each: impl FnMut(*const sys::nftnl_expr) -> Result<(), Error>,
) -> Result<(), Error> {
    // SAFETY: the iterator borrows the live rule and is destroyed below.
    let iter = unsafe { sys::nftnl_expr_iter_create(rule.ptr()) };
    if iter.is_null() {
        return Err(Error::Decode("rule expression iterator".into()));
    }
    let mut result = Ok(());
    loop {
        // SAFETY: `iter` is live; it returns null at the end.
        let expr = unsafe { sys::nftnl_expr_iter_next(iter) };
        if expr.is_null() {
            break;
        }
        result = each(expr);
        if result.is_err() {
            break;
        }
    }
    // SAFETY: `iter` is live and destroyed once.
    unsafe { sys::nftnl_expr_iter_destroy(iter) };
    result
}

/// Table, chain and handle of a rule in a GETRULE reply (its expressions unread).
pub(crate) fn parse_rule_handle(message: Message<'_>) -> Result<(String, String, u64), Error> {
    let (rule, table, chain) = rule_message(message)?;
    // SAFETY: `rule` is live.
    let handle = unsafe { sys::nftnl_rule_get_u64(rule.ptr(), sys::NFTNL_RULE_HANDLE as u16) };
    Ok((table, chain, handle))
}

/// A rule parsed from a GETRULE reply: table, chain and the rule.
pub(crate) fn parse_rule(
    message: Message<'_>,
    family: Family,
) -> Result<(String, String, Rule), Error> {
    let (rule, table, chain) = rule_message(message)?;
    let (raw, _) = raw_of(&rule)?;
    let rule = rule_of(&rule, &chain, family, &raw)?;
    Ok((table, chain, rule))
}

/// A rule with a `counter` statement, from a GETRULE reply: its table, chain, handle,
/// the rule and its counter; `None` for a rule without one.
pub(crate) fn parse_counted_rule(
    message: Message<'_>,
    family: Family,
) -> Result<Option<(String, CountedRule)>, Error> {
    let (rule, table, chain) = rule_message(message)?;
    let (raw, count) = raw_of(&rule)?;
    let Some(count) = count else {
        return Ok(None);
    };
    let parsed = rule_of(&rule, &chain, family, &raw)?;
    // SAFETY: `rule` is live.
    let handle = unsafe { sys::nftnl_rule_get_u64(rule.ptr(), sys::NFTNL_RULE_HANDLE as u16) };
    Ok(Some((
        table,
        CountedRule {
            chain,
            handle,
            rule: parsed,
            count,
        },
    )))
}

/// A parsed rule object's expressions, with the numbers of its first counter.
fn raw_of(rule: &RuleObj) -> Result<(Vec<RawExpr>, Option<Count>), Error> {
    let mut raw = Vec::new();
    let mut count = None;
    each_expr(rule, |expr| {
        let expr = raw_expr(expr)?;
        if let RawExpr::Counter { packets, bytes } = expr {
            count.get_or_insert(Count { packets, bytes });
        }
        raw.push(expr);
        Ok(())
    })?;
    Ok((raw, count))
}

/// A parsed rule object, whose expressions are `raw`, raised to a rule.
fn rule_of(rule: &RuleObj, chain: &str, family: Family, raw: &[RawExpr]) -> Result<Rule, Error> {
    let stmts = lower::raise(family, raw)
        .map_err(|e| Error::Decode(format!("a rule in chain {chain}: {e}")))?;
    let mut len = 0u32;
    // SAFETY: `rule` is live; the buffer holds `len` bytes while it lives.
    let ptr =
        unsafe { sys::nftnl_rule_get_data(rule.ptr(), sys::NFTNL_RULE_USERDATA as u16, &mut len) };
    let comment = if ptr.is_null() {
        None
    } else {
        // SAFETY: valid for `len` bytes; copied before `rule` is dropped.
        comment_of(
            unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize) },
            sys::NFTNL_UDATA_RULE_COMMENT as u8,
        )
    };
    Ok(Rule {
        stmts: stmts.into(),
        comment,
    })
}

/// Keeps the numbers of the first `counter` among the expressions of a set or an
/// element (`nftnl_*_expr_foreach` calls it once per expression).
unsafe extern "C" fn first_counter(
    expr: *mut sys::nftnl_expr,
    found: *mut std::ffi::c_void,
) -> std::ffi::c_int {
    // SAFETY: `found` is the `Option<Count>` the caller lent for this walk, which nothing
    // else touches while it runs.
    let found = unsafe { &mut *found.cast::<Option<Count>>() };
    if found.is_none()
        && let Ok(RawExpr::Counter { packets, bytes }) = raw_expr(expr)
    {
        *found = Some(Count { packets, bytes });
    }
    0
}

/// A set declaration parsed from a GETSET reply, with its table.
pub(crate) fn parse_set(message: Message<'_>) -> Result<(String, Set), Error> {
    let set = SetObj::new();
    // SAFETY: a `Message` is a whole message of `nlmsg_len` readable bytes, borrowed for the call; `set` is live.
    if unsafe { sys::nftnl_set_nlmsg_parse(message.as_ptr(), set.ptr()) } < 0 {
        return Err(Error::Decode("set message".into()));
    }
    let p = set.ptr();
    // SAFETY: `set` is live for these reads; buffers are copied before it is dropped.
    unsafe {
        let table =
            owned_str(sys::nftnl_set_get_str(p, sys::NFTNL_SET_TABLE as u16)).unwrap_or_default();
        let name =
            owned_str(sys::nftnl_set_get_str(p, sys::NFTNL_SET_NAME as u16)).unwrap_or_default();
        let flags = sys::nftnl_set_get_u32(p, sys::NFTNL_SET_FLAGS as u16);
        let key = lower::key_types(sys::nftnl_set_get_u32(p, sys::NFTNL_SET_KEY_TYPE as u16))
            .map_err(|e| Error::Decode(format!("set {name}: {e}")))?;
        let is_map = flags & libc::NFT_SET_MAP as u32 != 0;
        let data = match sys::nftnl_set_get_u32(p, sys::NFTNL_SET_DATA_TYPE as u16) {
            _ if !is_map => Vec::new(),
            libc::NFT_DATA_VERDICT => vec![DataType::Verdict],
            id => lower::key_types(id).map_err(|e| Error::Decode(format!("map {name}: {e}")))?,
        };
        let timeout = (flags & libc::NFT_SET_TIMEOUT as u32 != 0)
            .then(|| (sys::nftnl_set_get_u64(p, sys::NFTNL_SET_TIMEOUT as u16) / 1000) as u32);
        let size = sys::nftnl_set_is_set(p, sys::NFTNL_SET_DESC_SIZE as u16)
            .then(|| sys::nftnl_set_get_u32(p, sys::NFTNL_SET_DESC_SIZE as u16));
        let mut len = 0u32;
        let ptr = sys::nftnl_set_get_data(p, sys::NFTNL_SET_USERDATA as u16, &mut len);
        let udata: &[u8] = if ptr.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize)
        };
        let comment = comment_of(udata, sys::NFTNL_UDATA_SET_COMMENT as u8);
        let typeof_entry = |kind: u32| {
            userdata_entry(udata, kind as u8)
                .map(lower::typeof_exprs)
                .transpose()
                .map_err(|e| Error::Decode(format!("set {name}: {e}")))
        };
        let type_of = match typeof_entry(sys::NFTNL_UDATA_SET_KEY_TYPEOF)? {
            Some(key) => Some(TypeOf {
                key,
                data: typeof_entry(sys::NFTNL_UDATA_SET_DATA_TYPEOF)?.unwrap_or_default(),
            }),
            None => None,
        };
        let mut decoded = Set::new(name, key);
        decoded.data = data;
        decoded.type_of = type_of;
        decoded.dynamic = flags & libc::NFT_SET_EVAL as u32 != 0;
        decoded.timeout = timeout;
        // A set without a size gets 65,535 from the kernel when an `update` binds it
        // (nft_dynset_init), without its hash table being sized for that: it is the
        // kernel's default, not something the set was created with.
        decoded.size = size.filter(|s| *s != 0 && !(decoded.dynamic && *s == DYNSET_DEFAULT_SIZE));
        decoded.comment = comment;
        let mut counter: Option<Count> = None;
        let found = (&raw mut counter).cast();
        // SAFETY: `set` is live; `found` points at `counter`, alive for the walk.
        sys::nftnl_set_expr_foreach(p, Some(first_counter), found);
        decoded.counter = counter.is_some();
        Ok((table, decoded))
    }
}

/// The elements of a GETSETELEM reply, decoded with the set's key types, each with its
/// counter's numbers when the set counts.
pub(crate) fn parse_elements(
    message: Message<'_>,
    set: &Set,
) -> Result<Vec<(Element, Option<Count>)>, Error> {
    let obj = SetObj::new();
    // SAFETY: a `Message` is a whole message of `nlmsg_len` readable bytes, borrowed for the call; `obj` is live.
    if unsafe { sys::nftnl_set_elems_nlmsg_parse(message.as_ptr(), obj.ptr()) } < 0 {
        return Err(Error::Decode(format!("elements of {}", set.name)));
    }
    let mut elements = Vec::new();
    // SAFETY: the iterator borrows the live set and is destroyed below.
    let iter = unsafe { sys::nftnl_set_elems_iter_create(obj.ptr()) };
    if iter.is_null() {
        return Ok(elements);
    }
    let mut result = Ok(());
    loop {
        // SAFETY: `iter` is live; it returns null at the end.
        let elem = unsafe { sys::nftnl_set_elems_iter_next(iter) };
        if elem.is_null() {
            break;
        }
        match parse_element(elem, set) {
            Ok(element) => elements.push(element),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // SAFETY: `iter` is live and destroyed once.
    unsafe { sys::nftnl_set_elems_iter_destroy(iter) };
    result.map(|()| elements)
}

fn parse_element(
    elem: *mut sys::nftnl_set_elem,
    set: &Set,
) -> Result<(Element, Option<Count>), Error> {
    let data = |attr: u32| {
        let mut len = 0u32;
        // SAFETY: `elem` is live (owned by the set being iterated); copied out.
        let ptr = unsafe { sys::nftnl_set_elem_get(elem, attr as u16, &mut len) };
        if ptr.is_null() {
            None
        } else {
            // SAFETY: valid for `len` bytes while the set lives.
            Some(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize) }.to_vec())
        }
    };
    let key_bytes = data(sys::NFTNL_SET_ELEM_KEY)
        .ok_or_else(|| Error::Decode(format!("element of {} without a key", set.name)))?;
    let key = lower::key_values(&set.key, &key_bytes)
        .map_err(|e| Error::Decode(format!("element of {}: {e}", set.name)))?;
    let value = if set.is_map() && set.data != [DataType::Verdict] {
        let bytes = data(sys::NFTNL_SET_ELEM_DATA)
            .ok_or_else(|| Error::Decode(format!("element of {} without a value", set.name)))?;
        lower::key_values(&set.data, &bytes)
            .map_err(|e| Error::Decode(format!("element of {}: {e}", set.name)))?
    } else {
        Vec::new()
    };
    let verdict = if set.data == [DataType::Verdict] {
        // SAFETY: `elem` is live (owned by the set being iterated).
        let code =
            unsafe { sys::nftnl_set_elem_get_u32(elem, sys::NFTNL_SET_ELEM_VERDICT as u16) } as i32;
        // SAFETY: `elem` is live.
        let chain = owned_str(unsafe {
            sys::nftnl_set_elem_get_str(elem, sys::NFTNL_SET_ELEM_CHAIN as u16)
        });
        Some(verdict_of(code, chain)?)
    } else {
        None
    };
    let comment = data(sys::NFTNL_SET_ELEM_USERDATA)
        .and_then(|d| comment_of(&d, sys::NFTNL_UDATA_SET_ELEM_COMMENT as u8));
    let mut element = match verdict {
        Some(verdict) => Element::with_verdict(key, verdict),
        None => Element::mapped(key, value),
    };
    element.set_comment(comment);
    let mut count: Option<Count> = None;
    if set.counter {
        let found = (&raw mut count).cast();
        // SAFETY: `elem` is live (owned by the set being iterated); `found` points at
        // `count`, alive for the walk.
        unsafe { sys::nftnl_set_elem_expr_foreach(elem, Some(first_counter), found) };
    }
    Ok((element, count))
}

/// A rule of any program's table, read only as far as cleaning up needs: its table,
/// chain and handle, and the chains it jumps or goes to.
pub(crate) fn parse_rule_jumps(
    message: Message<'_>,
) -> Result<(String, String, u64, Vec<String>), Error> {
    let (rule, table, chain) = rule_message(message)?;
    let p = rule.ptr();
    // SAFETY: `rule` is live.
    let handle = unsafe { sys::nftnl_rule_get_u64(p, sys::NFTNL_RULE_HANDLE as u16) };
    let mut jumps = Vec::new();
    each_expr(&rule, |expr| {
        jumps.extend(jump_target(expr));
        Ok(())
    })?;
    Ok((table, chain, handle, jumps))
}
