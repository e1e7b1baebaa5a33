//! Sluice's wire types: the messages of `sluice.quota.v1`
//! (`proto/sluice/quota/v1/quota.proto`), generated with prost.
//!
//! `no_std` + `alloc`, so the Envoy filter (wasm) and the quota server
//! share one definition; the server generates its tonic service over these
//! types.

#![no_std]
#![forbid(unsafe_code)]

/// The protobuf runtime the messages implement, for encoding and decoding.
pub use prost;
/// `google.protobuf.Duration`, as the messages use it.
pub use prost_types::Duration;

/// The `sluice.quota` package.
pub mod quota {
    /// Version 1 of the quota API.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/sluice.quota.v1.rs"));
    }
}

#[cfg(test)]
mod tests {
    use super::quota::v1::{CheckGroup, CheckItem, CheckRequest, ItemResult};
    use super::Duration;
    use prost::Message;

    #[test]
    fn check_request_has_the_documented_field_numbers() {
        let request = CheckRequest {
            groups: [CheckGroup {
                domain: "d".into(),
                items: [CheckItem {
                    rule: "r".into(),
                    key: "k".into(),
                    cost: 2,
                }]
                .into(),
            }]
            .into(),
            controls_version: None,
            omit_headers: false,
        };
        // groups = 1 { domain = 1 "d", items = 2 { rule = 1 "r", key = 2 "k", cost = 3 2 } }
        let wire = [
            0x0a, 0x0d, 0x0a, 0x01, b'd', 0x12, 0x08, 0x0a, 0x01, b'r', 0x12, 0x01, b'k', 0x18,
            0x02,
        ];
        assert_eq!(request.encode_to_vec(), wire);
        assert_eq!(CheckRequest::decode(&wire[..]).unwrap(), request);
    }

    #[test]
    fn a_controls_version_of_zero_is_sent_and_absent_is_not() {
        use super::quota::v1::SyncRequest;
        let absent = SyncRequest::default();
        assert!(absent.encode_to_vec().is_empty());
        let zero = SyncRequest {
            controls_version: Some(0),
            ..SyncRequest::default()
        };
        // controls_version = 5, varint 0: appended after the older fields.
        assert_eq!(zero.encode_to_vec(), [0x28, 0x00]);
        assert_eq!(SyncRequest::decode(&[0x28, 0x00][..]).unwrap(), zero);
    }

    #[test]
    fn durations_round_trip_without_std() {
        let item = ItemResult {
            retry_after: Some(Duration {
                seconds: 3,
                nanos: 5,
            }),
            ..ItemResult::default()
        };
        let again = ItemResult::decode(item.encode_to_vec().as_slice()).unwrap();
        assert_eq!(again.retry_after, item.retry_after);
    }
}
