//! End-to-end tests of match conditions and keys through a real Envoy,
//! against README.md, "Match conditions", "Query parameters", "Fallback
//! keys", "Keys from JWT claims" and the gRPC metadata conditions of "gRPC
//! and WebSocket".
//!
//! Needs Envoy (`make setup`) and the filter (`make wasm`). Limits are per
//! hour, so nothing refills during a test; nothing sleeps.

// Test code: failing means panicking (the workspace denies these in
// library code; helpers here are outside #[test] functions).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use sluice_e2e::client::{Client, Reply};
use sluice_e2e::envoy::{Envoy, EnvoyBuilder};
use sluice_e2e::grpc::connect;
use sluice_e2e::grpc::user::user_service_client::UserServiceClient;
use sluice_e2e::grpc::user::GetUserRequest;
use sluice_e2e::grpc_upstream::GrpcUpstream;
use sluice_e2e::routes::with_upstreams;
use sluice_e2e::upstream::Upstream;
use tonic::{Code, Request};

/// An HTTP upstream, Envoy in front of it, and a client for Envoy.
struct Setup {
    _upstream: Upstream,
    envoy: Envoy,
    client: Client,
}

async fn setup(test: &str, config: Value, jwks: Option<&str>) -> Setup {
    let upstream = Upstream::start().await.expect("starting the upstream");
    let builder: EnvoyBuilder = Envoy::builder(test).upstream(upstream.port());
    let builder = match jwks {
        Some(jwks) => builder.jwt(jwks),
        None => builder,
    };
    let envoy = builder
        .sluice(&config)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy with the Sluice filter: {e:#}"));
    let client = envoy.client();
    Setup {
        _upstream: upstream,
        envoy,
        client,
    }
}

impl Setup {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.client
            .get_with(path, headers)
            .await
            .unwrap_or_else(|e| panic!("GET {path} {headers:?}: {e:#}"))
    }

    /// Sends each request in turn and checks its status (and, for a 429,
    /// the rule named).
    async fn expect(&self, steps: &[Step<'_>], rule: &str) {
        for (i, (path, headers, status)) in steps.iter().enumerate() {
            let reply = self.get(path, headers).await;
            assert_eq!(
                reply.status,
                *status,
                "step {i}: GET {path} {headers:?}: {}",
                reply.text()
            );
            if reply.status == 429 {
                assert_eq!(reply.json().unwrap()["rule"], rule, "step {i}");
            }
        }
    }

    async fn assert_no_errors(&self) {
        let errors = self
            .envoy
            .filter_errors()
            .await
            .expect("reading Envoy's stats");
        assert_eq!(errors, 0, "sluice_http.errors");
    }
}

/// A request to send (path, headers) and the status it must get.
type Step<'a> = (&'a str, &'a [(&'a str, &'a str)], u16);

fn rule(name: &str, prefix: &str, conditions: Value, key: Value) -> Value {
    let mut conditions = conditions;
    conditions["path"] = json!({"prefix": prefix});
    json!({"name": name, "match": conditions, "key": key, "limit": {"count": 1, "per": "1h"}})
}

#[tokio::test]
async fn header_query_and_network_conditions() {
    let config = json!({
        "client_ip": {"trusted_hops": 1},
        "rules": [
            rule("tiers", "/tiers/",
                 json!({"headers": [{"name": "x-tier", "values": ["free", "trial"]},
                                    {"name": "x-internal", "present": false}]}),
                 json!(["header:x-tier"])),
            rule("pages", "/pages/",
                 json!({"query": [{"name": "page", "values": ["1", "2"]}]}),
                 json!(["query:user"])),
            rule("outside", "/outside/",
                 json!({"not": {"client_ip": ["10.0.0.0/8", "2001:db8::/32"]}}),
                 json!(["client_ip"])),
        ]
    });
    let s = setup("header_query_and_network_conditions", config, None).await;
    let office = [("x-forwarded-for", "10.1.2.3")];
    let tier = |t: &'static str| [("x-forwarded-for", "192.0.2.1"), ("x-tier", t)];
    let internal_free = [
        ("x-forwarded-for", "192.0.2.1"),
        ("x-tier", "free"),
        ("x-internal", "1"),
    ];
    s.expect(
        &[
            ("/tiers/a", &tier("free"), 200),
            ("/tiers/a", &tier("free"), 429),
            // Another value of the list: its own key.
            ("/tiers/a", &tier("trial"), 200),
            ("/tiers/a", &tier("trial"), 429),
            // Not in the list, or x-internal present: the rule does not apply.
            ("/tiers/a", &tier("paid"), 200),
            ("/tiers/a", &tier("paid"), 200),
            ("/tiers/a", &internal_free, 200),
            ("/tiers/a", &office, 200),
        ],
        "tiers",
    )
    .await;
    s.expect(
        &[
            ("/pages/x?page=1&user=ann", &office, 200),
            // The same user, escaped, with another listed page.
            ("/pages/x?user=%61nn&page=2", &office, 429),
            ("/pages/x?page=1&user=a+b", &office, 200),
            ("/pages/x?page=2&user=a%20b", &office, 429),
            ("/pages/x?page=1&user=bob", &office, 200),
            // Page 3, or page only in a later occurrence: no match.
            ("/pages/x?page=3&user=ann", &office, 200),
            ("/pages/x?page=3&page=1&user=ann", &office, 200),
            // No user: the key part is missing, the rule does not apply.
            ("/pages/x?page=1", &office, 200),
            ("/pages/x?page=1", &office, 200),
        ],
        "pages",
    )
    .await;
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    s.expect(
        &[
            ("/outside/a", &from("10.9.9.9"), 200),
            ("/outside/a", &from("10.9.9.9"), 200),
            ("/outside/a", &from("2001:db8::1"), 200),
            ("/outside/a", &from("2001:db8::1"), 200),
            ("/outside/a", &from("192.0.2.1"), 200),
            ("/outside/a", &from("192.0.2.1"), 429),
            ("/outside/a", &from("2001:db9::1"), 200),
            ("/outside/a", &from("2001:db9::1"), 429),
        ],
        "outside",
    )
    .await;
    s.assert_no_errors().await;
}

#[tokio::test]
async fn fallback_chains_never_mix_their_alternatives() {
    let config = json!({
        "client_ip": {"trusted_hops": 1},
        "rules": [{"name": "callers", "limit": {"count": 1, "per": "1h"},
                   "key": [["header:x-api-key", "header:x-user-id", "client_ip"]]}]
    });
    let s = setup("fallback_chains_never_mix_their_alternatives", config, None).await;
    let ip = ("x-forwarded-for", "192.0.2.9");
    s.expect(
        &[
            // An API key that reads like the client's address…
            ("/a", &[ip, ("x-api-key", "192.0.2.9")], 200),
            ("/a", &[ip, ("x-api-key", "192.0.2.9")], 429),
            // …shares nothing with that address, nor with a user id of the
            // same text.
            ("/a", &[ip], 200),
            ("/a", &[ip], 429),
            ("/a", &[ip, ("x-user-id", "192.0.2.9")], 200),
            ("/a", &[ip, ("x-user-id", "192.0.2.9")], 429),
            // The API key comes first when both are sent.
            (
                "/a",
                &[ip, ("x-user-id", "u2"), ("x-api-key", "192.0.2.9")],
                429,
            ),
            ("/a", &[ip, ("x-user-id", "u2"), ("x-api-key", "k2")], 200),
            ("/a", &[("x-forwarded-for", "192.0.2.10")], 200),
        ],
        "callers",
    )
    .await;
    s.assert_no_errors().await;
}

#[tokio::test]
async fn grpc_metadata_conditions() {
    let upstream = GrpcUpstream::start()
        .await
        .expect("starting the gRPC upstream");
    let config = json!({"rules": [{
        "name": "free-users",
        "match": {"grpc": {"service": "user.UserService"},
                  "headers": [{"name": "x-plan", "values": ["free", "trial"]}],
                  "not": {"headers": [{"name": "x-staff", "value": "yes"}]}},
        "key": ["header:x-user-id"],
        "limit": {"count": 1, "per": "1h"}
    }]});
    let envoy = with_upstreams(
        Envoy::builder("grpc_metadata_conditions"),
        Some(upstream.port()),
        None,
    )
    .sluice(&config)
    .start()
    .await
    .unwrap_or_else(|e| panic!("starting Envoy with the Sluice filter: {e:#}"));
    let channel = connect(envoy.addr()).await.expect("gRPC channel to Envoy");
    let call = |user: &'static str, metadata: &'static [(&'static str, &'static str)]| {
        let mut client = UserServiceClient::new(channel.clone());
        async move {
            let mut request = Request::new(GetUserRequest { user_id: 1 });
            request
                .metadata_mut()
                .insert("x-user-id", user.parse().unwrap());
            for (name, value) in metadata {
                request.metadata_mut().insert(*name, value.parse().unwrap());
            }
            tokio::time::timeout(Duration::from_secs(10), client.get_user(request))
                .await
                .expect("GetUser answered")
                .map(|_| ())
                .map_err(|status| status.code())
        }
    };
    assert_eq!(call("ann", &[("x-plan", "free")]).await, Ok(()));
    assert_eq!(
        call("ann", &[("x-plan", "trial")]).await,
        Err(Code::ResourceExhausted)
    );
    assert_eq!(call("bob", &[("x-plan", "trial")]).await, Ok(()));
    // Another plan, no plan, or staff: the rule does not apply.
    for metadata in [
        &[("x-plan", "paid")][..],
        &[],
        &[("x-plan", "free"), ("x-staff", "yes")],
    ] {
        assert_eq!(call("ann", metadata).await, Ok(()), "{metadata:?}");
        assert_eq!(call("ann", metadata).await, Ok(()), "{metadata:?}");
    }
    assert_eq!(
        call("ann", &[("x-plan", "free"), ("x-staff", "no")]).await,
        Err(Code::ResourceExhausted)
    );
}

/// An ES256 key pair made for one test, signing tokens of the issuer the
/// template's `jwt` section trusts.
struct Issuer {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl Issuer {
    fn new() -> Issuer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Issuer { pair, rng }
    }

    /// The public key as a JWKS.
    fn jwks(&self) -> String {
        // An uncompressed P-256 point: 0x04, then x and y.
        let point = self.pair.public_key().as_ref();
        let (x, y) = point[1..].split_at(32);
        json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "test",
                         "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)}]})
        .to_string()
    }

    /// A signed token for `subject`, valid for an hour.
    fn token(&self, subject: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": "test"});
        let claims =
            json!({"iss": "https://issuer.example", "sub": subject, "iat": now, "exp": now + 3600});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self.pair.sign(&self.rng, input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

#[tokio::test]
async fn jwt_subjects_key_limits_and_a_spoofed_claim_header_does_not_escape() {
    let issuer = Issuer::new();
    let config = json!({
        "client_ip": {"trusted_hops": 1},
        "rules": [{"name": "per-subject", "limit": {"count": 2, "per": "1h"},
                   "key": [["header:x-jwt-sub", "client_ip"]]}]
    });
    let s = setup(
        "jwt_subjects_key_limits_and_a_spoofed_claim_header_does_not_escape",
        config,
        Some(&issuer.jwks()),
    )
    .await;
    let bearer = |subject: &str| format!("Bearer {}", issuer.token(subject));
    let (alice, bob) = (bearer("alice"), bearer("bob"));
    const IP: (&str, &str) = ("x-forwarded-for", "192.0.2.5");
    let ip = IP;
    fn with(token: &str) -> [(&str, &str); 2] {
        [IP, ("authorization", token)]
    }
    // Each subject has its own two permits, from the same address.
    s.expect(
        &[
            ("/a", &with(&alice), 200),
            ("/a", &with(&alice), 200),
            ("/a", &with(&alice), 429),
            ("/a", &with(&bob), 200),
            ("/a", &with(&bob), 200),
            ("/a", &with(&bob), 429),
        ],
        "per-subject",
    )
    .await;
    // A token signed by another key never reaches the filter.
    let forged = format!("Bearer {}", Issuer::new().token("carol"));
    assert_eq!(s.get("/a", &with(&forged)).await.status, 401);
    // Without a token, the address is the key: a claim header the client
    // writes itself is removed, so it gets no subject's counter, fresh or
    // anyone else's.
    let spoofing = |subject: &'static str| [ip, ("x-jwt-sub", subject)];
    s.expect(
        &[
            ("/a", &[ip], 200),
            ("/a", &spoofing("mallory"), 200),
            ("/a", &spoofing("someone-new"), 429),
            ("/a", &spoofing("alice"), 429),
            // Nor on a route exempt from token checks.
            ("/public/a", &spoofing("someone-else"), 429),
        ],
        "per-subject",
    )
    .await;
    // With a token, the claim wins over a header the client adds.
    let dave = bearer("dave");
    s.expect(
        &[
            (
                "/a",
                &[ip, ("authorization", &dave), ("x-jwt-sub", "erin")],
                200,
            ),
            (
                "/a",
                &[ip, ("authorization", &dave), ("x-jwt-sub", "frank")],
                200,
            ),
            ("/a", &[ip, ("authorization", &dave)], 429),
            (
                "/a",
                &[("x-forwarded-for", "192.0.2.6"), ("x-jwt-sub", "erin")],
                200,
            ),
        ],
        "per-subject",
    )
    .await;
    s.assert_no_errors().await;
}
