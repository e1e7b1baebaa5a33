//! The configuration's own access lists into an [`AccessList`].

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::error::Errors;
use super::schema::AccessConfig;
use crate::access::{AccessList, Cidr};

/// The most networks on each of `access.allow` and `access.deny`: every
/// request is checked against every entry.
pub const MAX_ACCESS_ENTRIES: usize = 10_000;

/// The lists of `access` (empty when absent), recording every network
/// that does not parse and every list over [`MAX_ACCESS_ENTRIES`].
pub(super) fn validate_access(access: Option<&AccessConfig>, errors: &mut Errors) -> AccessList {
    let Some(access) = access else {
        return AccessList::default();
    };
    let mut networks = |name: &str, written: &[String]| -> Vec<Cidr> {
        let at = format!("access.{name}");
        if written.len() > MAX_ACCESS_ENTRIES {
            errors.add(
                &at,
                "",
                format!(
                    "{} networks; at most {MAX_ACCESS_ENTRIES}: merge them into wider prefixes",
                    written.len()
                ),
            );
            return Vec::new();
        }
        written
            .iter()
            .enumerate()
            .filter_map(|(i, text)| {
                Cidr::parse(text)
                    .map_err(|e| errors.add(&at, &format!("[{i}]"), format!("{e}")))
                    .ok()
            })
            .collect()
    };
    let allow = networks("allow", &access.allow);
    let deny = networks("deny", &access.deny);
    AccessList::fixed(allow, deny)
}

#[cfg(test)]
mod tests {
    use alloc::string::ToString;

    use crate::access::Access;
    use crate::config::errors_of;
    use crate::policy::Policy;
    use crate::time::Nanos;

    #[test]
    fn networks_are_read_and_judged() {
        let policy = Policy::from_json(
            r#"{"access":{"allow":["10.0.0.0/8","2001:db8::/32"],"deny":["10.6.6.6","203.0.113.0/24"]}}"#,
        )
        .unwrap();
        let judge = |ip: &str| policy.access.check(Some(ip.parse().unwrap()), [], Nanos(0));
        assert_eq!(judge("10.1.2.3"), Access::Allowed);
        assert_eq!(judge("2001:db8::1"), Access::Allowed);
        assert_eq!(judge("10.6.6.6"), Access::Denied);
        assert_eq!(judge("203.0.113.9"), Access::Denied);
        assert_eq!(judge("192.0.2.1"), Access::Neutral);
        assert!(policy.needs_client_ip(), "lists read the client address");
        assert!(!Policy::from_json("{}").unwrap().needs_client_ip());
    }

    #[test]
    fn bad_networks_are_reported_with_their_path() {
        assert_eq!(
            errors_of(
                r#"{"access":{"allow":["10.0.0.0/8"],"deny":["1.2.3.4","10.0.0.0/33","nowhere"]}}"#
            ),
            [
                "access.deny[1]: prefix \"33\" must be a number from 0 to 32 for this address family",
                "access.deny[2]: \"nowhere\" is not an IP address (expected e.g. 10.0.0.0/8, 2001:db8::/32 or 1.2.3.4)",
            ]
        );
        let unknown = Policy::from_json(r#"{"access":{"block":["1.2.3.4"]}}"#).unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `block`"),
            "{unknown}"
        );
    }

    #[test]
    fn lists_are_bounded() {
        let many: alloc::vec::Vec<_> = (0..=super::MAX_ACCESS_ENTRIES)
            .map(|i| alloc::format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
            .collect();
        let json = alloc::format!(r#"{{"access":{{"deny":[{}]}}}}"#, many.join(","));
        assert_eq!(
            errors_of(&json),
            ["access.deny: 10001 networks; at most 10000: merge them into wider prefixes"]
        );
        let json = alloc::format!(r#"{{"access":{{"deny":[{}]}}}}"#, many[1..].join(","));
        assert!(Policy::from_json(&json).is_ok());
    }
}
