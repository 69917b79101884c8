//! Writing a line's fields as JSON straight into the batch buffer, without
//! an intermediate value: the event log's hot path (B4). Strings the daemon
//! makes itself (names of kinds and decisions, times, addresses) are known
//! to need no escaping; anything else goes through serde_json's escaper.
use std::net::IpAddr;

/// Appends `,"key":` (every field of a line after the chain fields) for a
/// literal key, as one copy.
#[macro_export]
macro_rules! json_key {
    ($out:expr, $k:literal) => {
        $out.extend_from_slice(concat!(",\"", $k, "\":").as_bytes())
    };
}

/// A string the daemon made from a fixed alphabet (no quote, backslash or
/// control character): written as is.
pub fn raw_str(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'), "{s:?} needs escaping");
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// Any string, escaped as JSON requires.
pub fn str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b != 0x7f) {
        raw_str(out, s);
    } else if serde_json::to_writer(&mut *out, s).is_err() {
        // Writing to a Vec cannot fail; keep the line valid regardless.
        out.extend_from_slice(b"\"\"");
    }
}

pub fn opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => str(out, s),
        None => null(out),
    }
}

pub fn opt_raw_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => raw_str(out, s),
        None => null(out),
    }
}

pub fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"null");
}

pub fn bool(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

/// Two decimal digits per lookup.
const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

pub fn uint(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        i -= 1;
        digits[i] = b'0' + n as u8;
    }
    out.extend_from_slice(&digits[i..]);
}

pub fn opt_uint(out: &mut Vec<u8>, n: Option<u64>) {
    match n {
        Some(n) => uint(out, n),
        None => null(out),
    }
}

pub fn uint_array(out: &mut Vec<u8>, ns: &[u32]) {
    out.push(b'[');
    for (i, n) in ns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        uint(out, u64::from(*n));
    }
    out.push(b']');
}

fn two(out: &mut Vec<u8>, n: u64) {
    out.push(b'0' + (n / 10 % 10) as u8);
    out.push(b'0' + (n % 10) as u8);
}

/// `"YYYY-MM-DDTHH:MM:SS.ffffffZ"` (RFC 3339, UTC, microseconds) from
/// nanoseconds since the epoch; the same text as [`super::rfc3339`].
pub fn time(out: &mut Vec<u8>, ns: i128) {
    let us_total = i64::try_from(ns.div_euclid(1_000)).unwrap_or(0);
    let secs = us_total.div_euclid(1_000_000);
    let us = us_total.rem_euclid(1_000_000) as u64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u64;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = (yoe + era * 400 + i64::from(m <= 2)).clamp(0, 9999) as u64;
    out.push(b'"');
    two(out, y / 100);
    two(out, y % 100);
    out.push(b'-');
    two(out, m);
    out.push(b'-');
    two(out, d);
    out.push(b'T');
    two(out, sod / 3600);
    out.push(b':');
    two(out, sod % 3600 / 60);
    out.push(b':');
    two(out, sod % 60);
    out.push(b'.');
    let mut frac = [b'0'; 6];
    let mut f = us;
    for slot in frac.iter_mut().rev() {
        *slot = b'0' + (f % 10) as u8;
        f /= 10;
    }
    out.extend_from_slice(&frac);
    out.extend_from_slice(b"Z\"");
}

/// An address as text, unquoted (`1.2.3.4`, or IPv6 in its usual form).
pub fn ip_text(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                uint(out, u64::from(*o));
            }
        }
        IpAddr::V6(v6) => out.extend_from_slice(v6.to_string().as_bytes()),
    }
}

/// `"ADDR:PORT"` (`"[ADDR]:PORT"` for IPv6), as `SocketAddr` prints it.
pub fn sockaddr(out: &mut Vec<u8>, ip: IpAddr, port: u16) {
    out.push(b'"');
    if ip.is_ipv6() {
        out.push(b'[');
        ip_text(out, ip);
        out.push(b']');
    } else {
        ip_text(out, ip);
    }
    out.push(b':');
    uint(out, u64::from(port));
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    use super::*;

    fn text(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut v = Vec::new();
        f(&mut v);
        String::from_utf8(v).expect("utf-8")
    }

    #[test]
    fn matches_the_slow_forms() {
        for ns in [0_i128, 951_782_400_000_000_000, 1_795_534_927_123_456_789, 4_102_444_799_999_999_000] {
            assert_eq!(text(|o| time(o, ns)), format!("\"{}\"", super::super::rfc3339(ns)));
        }
        for n in [0_u64, 7, 10, 12_345, u64::MAX] {
            assert_eq!(text(|o| uint(o, n)), n.to_string());
        }
        for (ip, port) in [(IpAddr::from(Ipv4Addr::new(127, 0, 0, 1)), 9), (Ipv6Addr::LOCALHOST.into(), 443), (Ipv4Addr::new(255, 10, 0, 200).into(), 65_535)] {
            assert_eq!(text(|o| sockaddr(o, ip, port)), format!("\"{}\"", SocketAddr::new(ip, port)));
        }
        for s in ["plain", "quo\"te", "back\\slash", "tab\there", "ünïcödé", "\u{7f}"] {
            let got = text(|o| str(o, s));
            assert_eq!(serde_json::from_str::<String>(&got).expect("valid JSON string"), s, "{got}");
        }
        assert_eq!(text(|o| uint_array(o, &[3, 2, 1])), "[3,2,1]");
        assert_eq!(text(|o| uint_array(o, &[])), "[]");
    }
}
