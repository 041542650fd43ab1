//! Address and CIDR parsing with Kubernetes' tolerance: IPv4 octets with leading zeros
//! (`172.30.0.041`) are read as decimal, as the API server's legacy parser did, and every
//! value comes out canonical.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

use crate::ValueError;

/// Parses an IP address; IPv4-mapped IPv6 addresses become IPv4.
pub fn parse_ip(text: &str) -> Result<IpAddr, ValueError> {
    let text = text.trim();
    if let Some(v4) = parse_ipv4_sloppy(text) {
        return Ok(IpAddr::V4(v4));
    }
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => Ok(v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6))),
        Ok(v4) => Ok(v4),
        Err(_) => Err(ValueError::Ip(cut(text))),
    }
}

fn parse_ipv4_sloppy(text: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// Parses a CIDR, tolerating surrounding whitespace and leading zeros, and returns it
/// with host bits cleared (`203.0.113.000/025` → `203.0.113.0/25`).
pub fn parse_cidr(text: &str) -> Result<IpNet, ValueError> {
    let trimmed = text.trim();
    let invalid = || ValueError::Cidr(cut(trimmed));
    let (addr, len) = trimmed.split_once('/').ok_or_else(invalid)?;
    let addr = parse_ip(addr).map_err(|_| invalid())?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let len: u8 = len.parse().map_err(|_| invalid())?;
    IpNet::new(addr, len)
        .map(|net| net.trunc())
        .map_err(|_| invalid())
}

/// At most 80 characters of a bad value, for a message that stays readable whatever
/// the input.
pub(crate) fn cut(text: &str) -> String {
    match text.char_indices().nth(80) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_value_is_named_in_at_most_80_characters_whatever_it_holds() {
        let huge = "ü".repeat(10_000);
        let message = parse_ip(&huge).unwrap_err().to_string();
        assert!(message.chars().count() < 120, "{message}");
        assert!(message.contains("ü...") && message.starts_with("invalid IP address"));
        let message = parse_cidr(&format!("{huge}/8")).unwrap_err().to_string();
        assert!(message.chars().count() < 120, "{message}");
    }

    #[test]
    fn leading_zeros_are_decimal_and_canonicalised() {
        assert_eq!(parse_ip("172.30.0.041").unwrap().to_string(), "172.30.0.41");
        assert_eq!(
            parse_cidr(" 203.0.113.000/025 ").unwrap().to_string(),
            "203.0.113.0/25"
        );
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_ip("::ffff:10.0.0.1").unwrap().to_string(), "10.0.0.1");
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(parse_ip("10.0.0.256").is_err());
        assert!(parse_ip("10.0.0").is_err());
        assert!(parse_ip("hello").is_err());
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("10.0.0.0").is_err());
        assert!(parse_cidr("fd00::/129").is_err());
    }
}
