//! The policy model: named rules, each a match, a key, a limit, an
//! algorithm and an action, evaluated together on every request.

pub mod charging;
pub mod key;
pub mod matcher;
pub mod query;
pub mod request;
pub mod sync;

use alloc::string::String;
use alloc::vec::Vec;

pub use charging::{read_amount, ChargeFrom, CostFrom, ReportedIn};
pub use key::{KeyElement, KeyPart, KeySpec};
pub use matcher::{Glob, GrpcMatch, Matcher, PathMatch, ValueMatch, Wanted};
pub use request::{grpc_method, split_target, Attributes, HttpRequest, Protocol};
pub use sync::{Leasing, OnFailure, RuleSync, SyncMode, SyncedRule};

use crate::access::AccessList;
use crate::algorithm::{Limiter, Quota};
use crate::client_ip::ClientIpSource;
use crate::decision::HeaderSets;
use crate::time::Span;

/// What happens to a request a rule would limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Refuse it (HTTP 429, gRPC RESOURCE_EXHAUSTED).
    Reject,
    /// Count and report it, never block it (a dry run).
    Shadow,
    /// Hold it until a permit frees up, at most this long; else reject.
    Delay {
        /// The longest a request may be held.
        max: Span,
    },
    /// Discard the offending WebSocket message, keep the connection.
    Drop,
    /// Let it through, marked for the upstream (a request header naming
    /// the rule) so it can serve a cheaper answer; it takes nothing from
    /// the rule.
    Degrade,
}

impl Action {
    /// Whether a limit of this action stops the request or message: all
    /// but `shadow` (a dry run) and `degrade` (marked, let through).
    pub fn stops(self) -> bool {
        !matches!(self, Action::Shadow | Action::Degrade)
    }
}

/// Which way stream messages travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the upstream.
    Client,
    /// From the upstream to the client.
    Server,
}

/// Which directions a stream rule counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Flow {
    /// Client to server only.
    Client,
    /// Server to client only.
    Server,
    /// Both.
    #[default]
    Both,
}

impl Flow {
    /// Whether messages travelling `direction` count.
    pub fn includes(self, direction: Direction) -> bool {
        matches!(
            (self, direction),
            (Flow::Both, _) | (Flow::Client, Direction::Client) | (Flow::Server, Direction::Server)
        )
    }
}

/// What one permit of a rule stands for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Counts {
    /// An HTTP request, a gRPC call or a WebSocket connection opened.
    #[default]
    Requests,
    /// A request, call or connection open right now (released at its end).
    InFlight,
    /// A gRPC stream message or WebSocket data message.
    Messages(Flow),
    /// A byte of message payload.
    Bytes(Flow),
    /// Not a rate: the largest message allowed, in bytes (`quota.count()`).
    MessageSize(Flow),
}

impl Counts {
    /// Whether the rule is decided when the request arrives (rather than
    /// per message of the stream that follows).
    pub fn at_request(self) -> bool {
        matches!(self, Counts::Requests | Counts::InFlight)
    }

    /// The directions a stream rule counts (`None` for request rules).
    pub fn flow(self) -> Option<Flow> {
        match self {
            Counts::Messages(f) | Counts::Bytes(f) | Counts::MessageSize(f) => Some(f),
            Counts::Requests | Counts::InFlight => None,
        }
    }

    /// The directions whose message sizes the rule reads (`bytes` and
    /// `message_size`): there a compressed message cannot be measured.
    pub fn sized_flow(self) -> Option<Flow> {
        match self {
            Counts::Bytes(f) | Counts::MessageSize(f) => Some(f),
            _ => None,
        }
    }
}

/// Whose counter a request is charged to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// One counter per distinct key.
    #[default]
    PerKey,
    /// One counter for every request the rule matches.
    Global,
}

/// One validated rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Unique name: in stats, headers and the rejection body.
    pub name: String,
    /// Which requests it applies to.
    pub matcher: Matcher,
    /// How the key is built (empty for global scope).
    pub key: KeySpec,
    /// Per key or global.
    pub scope: Scope,
    /// What a permit stands for.
    pub counts: Counts,
    /// The limit (for `message_size`, its count is the size bound).
    pub quota: Quota,
    /// The algorithm enforcing it (never consulted for `message_size`).
    pub limiter: Limiter,
    /// Permits each request takes (unless `cost_from` reads them).
    pub cost: u64,
    /// Each request's cost from a request header, when set.
    pub cost_from: Option<CostFrom>,
    /// What the upstream reports a request used, charged after the
    /// response in place of its cost, when set.
    pub charge: Option<ChargeFrom>,
    /// What happens when it limits.
    pub action: Action,
    /// How long a key stays limited once the rule limits it, whatever its
    /// budget says meanwhile (`block_duration`; `None`: no block).
    pub block_duration: Option<Span>,
    /// Higher first.
    pub priority: i32,
    /// The rules of one group stand in for each other: a request counts
    /// against the first of them that applies to it (see
    /// [`applicable_rules`](crate::engine::applicable_rules)).
    pub group: Option<String>,
}

impl Rule {
    /// What `request` costs under this rule: `cost`, or the amount its
    /// `cost_from` header says.
    pub fn request_cost(&self, request: &impl Attributes) -> u64 {
        self.cost_from
            .as_ref()
            .map_or(self.cost, |from| from.cost(request, self.cost))
    }
}

/// A set of status codes: single codes and whole classes (`5xx`), and
/// gRPC status codes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusSet {
    codes: Vec<u16>,
    classes: Vec<u16>,
    /// Bit `n` set: gRPC status `n` (0 to 16) is in the set.
    grpc: u32,
}

impl StatusSet {
    /// Adds one code.
    pub fn add_code(&mut self, code: u16) {
        self.codes.push(code);
    }

    /// Adds a class by its first digit (5 for `5xx`).
    pub fn add_class(&mut self, first_digit: u16) {
        self.classes.push(first_digit);
    }

    /// Whether `status` is in the set.
    pub fn contains(&self, status: u16) -> bool {
        self.codes.contains(&status) || self.classes.contains(&(status / 100))
    }

    /// Adds a gRPC status code (0 to 16; others are ignored).
    pub fn add_grpc(&mut self, code: u8) {
        if let Some(bit) = 1u32.checked_shl(u32::from(code)) {
            self.grpc |= bit;
        }
    }

    /// Whether gRPC status `code` (as the `grpc-status` value) is in the set.
    pub fn contains_grpc(&self, code: &str) -> bool {
        code.parse::<u8>()
            .ok()
            .and_then(|c| 1u32.checked_shl(u32::from(c)))
            .is_some_and(|bit| self.grpc & bit != 0)
    }

    /// Whether no HTTP status is in the set (no response needs its
    /// `:status` checked).
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty() && self.classes.is_empty()
    }

    /// Whether some gRPC status is in the set (gRPC responses need their
    /// `grpc-status` checked).
    pub fn has_grpc(&self) -> bool {
        self.grpc != 0
    }
}

/// A validated, ready-to-evaluate set of rules and their options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Enabled rules in evaluation order: descending priority, then config order.
    pub rules: Vec<Rule>,
    /// Which headers to send.
    pub header_sets: HeaderSets,
    /// Whether allowed responses get the headers too.
    pub headers_on_allowed: bool,
    /// Responses whose permits are given back.
    pub exclude_statuses: StatusSet,
    /// How the client address is found.
    pub client_ip: ClientIpSource,
    /// The most keys kept per rule.
    pub max_keys: usize,
    /// What a new key gets when every place for it holds a limited key.
    pub when_full: crate::store::WhenFull,
    /// How long a gRPC call cut after its response started may wait for
    /// the upstream to end it (the client then sees RESOURCE_EXHAUSTED)
    /// before the filter resets it.
    pub grpc_cut_grace: Span,
    /// The request header naming the rules that degraded a request, sent
    /// upstream (`None` when no rule degrades). Any copy the client sent
    /// is removed from every request.
    pub degrade_header: Option<String>,
    /// The rules a quota server decides, by position (a synced rule's
    /// `quota` and `limiter` are its local fallback limit).
    pub synced: Vec<SyncedRule>,
    /// The configuration's own allow and deny lists, judged with the quota
    /// server's (see [`access::judge`](crate::access::judge)).
    pub access: AccessList,
}

impl Policy {
    /// The default bound on keys per rule.
    pub const DEFAULT_MAX_KEYS: usize = 100_000;
    /// The default `degrade_header`.
    pub const DEFAULT_DEGRADE_HEADER: &'static str = "x-sluice-limited";
    /// The default `grpc_cut_grace`.
    pub const DEFAULT_GRPC_CUT_GRACE: Span = Span::SECOND;

    /// How the rule at `rule_index` is synced (`None`: decided locally).
    pub fn sync_of(&self, rule_index: usize) -> Option<&RuleSync> {
        self.synced
            .iter()
            .find(|s| s.rule_index == rule_index)
            .map(|s| &s.sync)
    }

    /// Lower-case names of the request headers some rule reads (for match,
    /// key or cost), so a host fetches only those.
    pub fn headers_needed(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for rule in &self.rules {
            let from_match = rule
                .matcher
                .nested()
                .flat_map(|m| m.headers.iter().map(|h| h.name.as_str()));
            let from_key = rule.key.parts().filter_map(|p| match p {
                KeyPart::Header(name) => Some(name.as_str()),
                _ => None,
            });
            let from_cost = rule.cost_from.iter().map(|c| c.header.as_str());
            for name in from_match.chain(from_key).chain(from_cost) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names
    }

    /// Whether evaluating the policy reads the client address: a rule keys
    /// on it or has a `client_ip` condition, or the configuration lists
    /// networks.
    pub fn needs_client_ip(&self) -> bool {
        !self.access.is_empty()
            || self.rules.iter().any(|r| {
                r.key.parts().any(|p| *p == KeyPart::ClientIp)
                    || r.matcher.nested().any(|m| !m.client_ip.is_empty())
            })
    }

    /// Whether any rule matches on gRPC or WebSocket, so a host must tell
    /// the request's protocol before matching.
    pub fn needs_protocol(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.matcher.nested().any(|m| m.grpc.is_some() || m.websocket))
    }

    /// Whether any rule reads the method (a host then skips fetching it).
    pub fn needs_method(&self) -> bool {
        self.rules.iter().any(|r| {
            r.matcher.nested().any(|m| !m.methods.is_empty())
                || r.key.parts().any(|p| *p == KeyPart::Method)
        })
    }

    /// Whether any rule reads the path.
    pub fn needs_path(&self) -> bool {
        self.rules.iter().any(|r| {
            r.matcher
                .nested()
                .any(|m| !m.paths.is_empty() || m.grpc.is_some())
                || r.key
                    .parts()
                    .any(|p| matches!(p, KeyPart::Path | KeyPart::PathSegment(_)))
        })
    }

    /// Whether any rule reads the query string (a host keeps it only then).
    pub fn needs_query(&self) -> bool {
        self.rules.iter().any(|r| {
            r.matcher.nested().any(|m| !m.query.is_empty())
                || r.key.parts().any(|p| matches!(p, KeyPart::Query(_)))
        })
    }
}
