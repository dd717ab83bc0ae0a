//! Compact peer addresses (BEP 23, BEP 7, BEP 11): 4 address bytes and a big-endian port for
//! IPv4 (6 bytes), 16 and a port for IPv6 (18 bytes), concatenated.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const V4_LEN: usize = 6;
pub const V6_LEN: usize = 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("compact peer list of {len} bytes is not a multiple of {entry}")]
pub struct CompactError {
    pub len: usize,
    pub entry: usize,
}

/// Decodes a list of IPv4 (`ipv6 == false`) or IPv6 addresses, at most `max` of them (the rest
/// are ignored, so a long list costs no memory). Port 0 cannot be connected to and is skipped.
pub fn decode_peers(bytes: &[u8], ipv6: bool, max: usize) -> Result<Vec<SocketAddr>, CompactError> {
    let entry = if ipv6 { V6_LEN } else { V4_LEN };
    if !bytes.len().is_multiple_of(entry) {
        return Err(CompactError {
            len: bytes.len(),
            entry,
        });
    }
    Ok(bytes
        .chunks_exact(entry)
        .filter(|c| c[entry - 2..] != [0, 0])
        .take(max)
        .map(|c| {
            let port = u16::from_be_bytes([c[entry - 2], c[entry - 1]]);
            let ip = if ipv6 {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&c[..16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            } else {
                IpAddr::V4(Ipv4Addr::new(c[0], c[1], c[2], c[3]))
            };
            SocketAddr::new(ip, port)
        })
        .collect())
}

/// Appends one address in compact form.
pub fn encode_peer(addr: &SocketAddr, out: &mut Vec<u8>) {
    match addr.ip() {
        IpAddr::V4(ip) => out.extend_from_slice(&ip.octets()),
        IpAddr::V6(ip) => out.extend_from_slice(&ip.octets()),
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families_and_checks_lengths() {
        let v4: SocketAddr = "127.0.0.1:6881".parse().unwrap();
        let v6: SocketAddr = "[::1]:51413".parse().unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode_peer(&v4, &mut a);
        encode_peer(&v4, &mut a);
        encode_peer(&v6, &mut b);
        assert_eq!(a, [127, 0, 0, 1, 0x1a, 0xe1, 127, 0, 0, 1, 0x1a, 0xe1]);
        assert_eq!(decode_peers(&a, false, 10), Ok(vec![v4, v4]));
        assert_eq!(decode_peers(&a, false, 1), Ok(vec![v4]));
        assert_eq!(decode_peers(&b, true, 10), Ok(vec![v6]));
        assert!(decode_peers(&a[..5], false, 10).is_err());
        assert!(decode_peers(&b[..17], true, 10).is_err());
        assert_eq!(decode_peers(&[], true, 10), Ok(vec![]));
    }
}
