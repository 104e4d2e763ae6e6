//! The gRPC deadline: the `grpc-timeout` request header.
//!
//! Format (gRPC over HTTP/2): 1 to 8 ASCII digits and a unit, `H` `M` `S` `m` `u` `n`.
//! A malformed header is ignored (as tonic and grpc-go do): the call then has no deadline.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// The header's name.
pub(crate) const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The timeout the client asked for, if any.
pub(crate) fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get(GRPC_TIMEOUT)?.to_str().ok()?;
    let parsed = parse(value);
    if parsed.is_none() {
        tracing::debug!(value, "ignoring a malformed grpc-timeout header");
    }
    parsed
}

/// The instant a call received `now` must end, if it has a deadline (an unrepresentable one
/// is none).
pub(crate) fn deadline(metadata: &MetadataMap, now: Instant) -> Option<Instant> {
    grpc_timeout(metadata).and_then(|timeout| now.checked_add(timeout))
}

fn parse(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_junk() {
        assert_eq!(parse("3H"), Some(Duration::from_secs(3 * 3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(
            parse("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for junk in [
            "",
            "m",
            "1",
            "123456789S",
            "1x",
            "-1S",
            "1.5S",
            "+1S",
            " 1S",
            "1 S",
            "1é",
            "é",
        ] {
            assert_eq!(parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn huge_timeouts_do_not_overflow() {
        let mut md = MetadataMap::new();
        md.insert(GRPC_TIMEOUT, "99999999H".parse().unwrap());
        let now = Instant::now();
        // Whether representable or not, no panic; if representable, it is in the future.
        if let Some(d) = deadline(&md, now) {
            assert!(d > now);
        }
        md.insert(GRPC_TIMEOUT, "100m".parse().unwrap());
        assert_eq!(deadline(&md, now), Some(now + Duration::from_millis(100)));
        assert_eq!(deadline(&MetadataMap::new(), now), None);
    }
}
