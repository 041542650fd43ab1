//! Set keys: nft's type ids and key lengths, and key values as the bytes the kernel
//! stores.
//!
//! Invariant: `key_values(types, key_bytes(values)) == values` for keys of those types.

use super::*;

/// nft's type id for a data type (`ipv4_addr` = 7, …; `verdict` = 1).
fn type_id(data_type: DataType) -> u32 {
    match data_type {
        DataType::Verdict => 1,
        DataType::Ipv4Addr => 7,
        DataType::Ipv6Addr => 8,
        DataType::InetProto => 12,
        DataType::InetService => 13,
        DataType::Integer => 4,
    }
}

fn type_of_id(id: u32) -> Result<DataType, LowerError> {
    Ok(match id {
        1 => DataType::Verdict,
        7 => DataType::Ipv4Addr,
        8 => DataType::Ipv6Addr,
        12 => DataType::InetProto,
        13 => DataType::InetService,
        4 => DataType::Integer,
        other => return err(format!("data type {other}")),
    })
}

/// The key type of a set: type ids, 6 bits each, first field highest.
pub fn key_type(types: &[DataType]) -> u32 {
    types.iter().fold(0, |acc, t| (acc << 6) | type_id(*t))
}

/// The data types of a set key type.
pub fn key_types(mut id: u32) -> Result<Vec<DataType>, LowerError> {
    let mut types = Vec::new();
    while id != 0 {
        types.push(type_of_id(id & 0x3f)?);
        id >>= 6;
    }
    types.reverse();
    Ok(types)
}

fn type_len(data_type: DataType) -> usize {
    match data_type {
        DataType::Ipv4Addr => 4,
        DataType::Ipv6Addr => 16,
        DataType::InetProto => 1,
        DataType::InetService => 2,
        DataType::Integer => 4,
        DataType::Verdict => 0,
    }
}

/// The key length of a set: each field padded to 4 bytes when there are several.
pub fn key_len(types: &[DataType]) -> u32 {
    let len: usize = match types {
        [single] => type_len(*single),
        many => many.iter().map(|t| type_len(*t).div_ceil(4) * 4).sum(),
    };
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// A key as bytes: each field in network order, padded to 4 bytes in concatenations.
pub fn key_bytes(values: &[Value]) -> Vec<u8> {
    // Written in place: a cold load lowers a few hundred thousand keys.
    let mut out = Vec::with_capacity(values.len() * 16);
    for value in values {
        match value {
            Value::Addr(IpAddr::V4(v4)) => out.extend_from_slice(&v4.octets()),
            Value::Addr(IpAddr::V6(v6)) => out.extend_from_slice(&v6.octets()),
            Value::Proto(proto) => out.push(proto.number()),
            Value::Port(port) => out.extend_from_slice(&port.to_be_bytes()),
            // numgen writes its result in host order.
            Value::Number(n) => out.extend_from_slice(&n.to_ne_bytes()),
        }
        if values.len() > 1 {
            out.resize(out.len().div_ceil(4) * 4, 0);
        }
    }
    out
}

/// A key read back from bytes, given the set's key types.
pub fn key_values(types: &[DataType], bytes: &[u8]) -> Result<Vec<Value>, LowerError> {
    let mut values = Vec::with_capacity(types.len());
    let mut offset = 0;
    for data_type in types {
        let len = type_len(*data_type);
        let field = bytes
            .get(offset..offset + len)
            .ok_or_else(|| LowerError(format!("key of {} bytes is too short", bytes.len())))?;
        values.push(match data_type {
            DataType::Ipv4Addr | DataType::Ipv6Addr => Value::Addr(addr_of(field)?),
            DataType::InetProto => Value::Proto(proto_of(field[0])?),
            DataType::InetService => Value::Port(u16::from_be_bytes([field[0], field[1]])),
            DataType::Integer => Value::Number(u32_of(field)?),
            DataType::Verdict => return err("verdict in a key"),
        });
        offset += if types.len() > 1 {
            len.div_ceil(4) * 4
        } else {
            len
        };
    }
    Ok(values)
}

// === `typeof` declarations, in nft's set userdata ===
//
// A `typeof` key or value is kept as nested userdata TLVs (type, length, value; numbers
// in host order): the expression's kind (`NFTNL_UDATA_SET_TYPEOF_EXPR`) and its own
// fields (`NFTNL_UDATA_SET_TYPEOF_DATA`); a concatenation lists its parts under indexes
// 0, 1, … with the same two entries each. nft lists a set from these, so they must be
// the ones nft writes.
