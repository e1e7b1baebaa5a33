//! Which requests a rule applies to.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use super::query;
use super::request::{grpc_method, Attributes, Protocol};
use crate::access::Cidr;

mod literal;

use literal::Literal;

#[cfg(feature = "reference")]
#[doc(hidden)]
pub mod reference;

/// How a rule matches the request path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathMatch {
    /// The pattern, which knows whether case matters.
    pattern: PathPattern,
}

/// The three ways to match a path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PathPattern {
    Exact(Literal),
    Prefix(Literal),
    Glob(Glob),
}

impl PathMatch {
    /// The whole path equals `path`.
    pub fn exact(path: &str, ignore_case: bool) -> PathMatch {
        PathMatch {
            pattern: PathPattern::Exact(Literal::new(path, ignore_case)),
        }
    }

    /// The path starts with `prefix`.
    pub fn prefix(prefix: &str, ignore_case: bool) -> PathMatch {
        PathMatch {
            pattern: PathPattern::Prefix(Literal::new(prefix, ignore_case)),
        }
    }

    /// The path matches the glob.
    pub fn glob(glob: Glob) -> PathMatch {
        PathMatch {
            pattern: PathPattern::Glob(glob),
        }
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match &self.pattern {
            PathPattern::Exact(p) => p.equals(path),
            PathPattern::Prefix(p) => p.strip_prefix_of(path).is_some(),
            PathPattern::Glob(g) => g.matches(path),
        }
    }

    /// Whether ASCII letters match in either case.
    pub fn ignores_case(&self) -> bool {
        match &self.pattern {
            PathPattern::Exact(p) | PathPattern::Prefix(p) => p.ignores_case(),
            PathPattern::Glob(g) => g.ignores_case(),
        }
    }
}

/// A condition on a header or a query parameter, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueMatch {
    /// The name: lower-case for a header, as decoded for a query parameter.
    pub name: String,
    /// What its value must be.
    pub wanted: Wanted,
}

/// What a header or query parameter must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// Present, whatever its value.
    Present,
    /// Absent.
    Absent,
    /// Present with one of these values (exact comparison).
    OneOf(Vec<String>),
}

impl Wanted {
    /// Whether a value found (`None`: absent) meets this, `equals` telling
    /// whether it is one text: so a query parameter is decoded only to be
    /// compared.
    fn holds<V>(&self, found: Option<V>, equals: impl Fn(&V, &str) -> bool) -> bool {
        match (self, found) {
            (Wanted::Present, found) => found.is_some(),
            (Wanted::Absent, found) => found.is_none(),
            (Wanted::OneOf(values), Some(found)) => values.iter().any(|v| equals(&found, v)),
            (Wanted::OneOf(_), None) => false,
        }
    }
}

/// A gRPC method condition: globs on the service and the method name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrpcMatch {
    /// Full service name (`chat.ChatService`); `None` means any.
    pub service: Option<Glob>,
    /// Method name (`Send`); `None` means any.
    pub method: Option<Glob>,
}

impl GrpcMatch {
    /// Whether a gRPC call to `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        grpc_method(path).is_some_and(|(service, method)| {
            self.service.as_ref().is_none_or(|g| g.matches(service))
                && self.method.as_ref().is_none_or(|g| g.matches(method))
        })
    }
}

/// All the conditions of a rule; an empty matcher matches every request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matcher {
    /// Upper-case methods; empty means any.
    pub methods: Vec<String>,
    /// Path conditions, any of which must hold; empty means any path.
    pub paths: Vec<PathMatch>,
    /// Header conditions, all required.
    pub headers: Vec<ValueMatch>,
    /// Query parameter conditions, all required.
    pub query: Vec<ValueMatch>,
    /// Networks the client address must be in (any of them); empty means
    /// any address. An unknown client address is in none.
    pub client_ip: Vec<Cidr>,
    /// Only gRPC calls to these methods.
    pub grpc: Option<GrpcMatch>,
    /// Only WebSocket upgrades.
    pub websocket: bool,
    /// Conditions that must not all hold.
    pub not: Option<Box<Matcher>>,
}

impl Matcher {
    /// Whether the request meets every condition.
    pub fn matches(&self, request: &impl Attributes) -> bool {
        let protocol_ok = match (&self.grpc, self.websocket) {
            (Some(grpc), _) => request.protocol() == Protocol::Grpc && grpc.matches(request.path()),
            (None, true) => request.protocol() == Protocol::WebSocket,
            (None, false) => true,
        };
        protocol_ok
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == request.method()))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(request.path())))
            && self.headers.iter().all(|h| {
                h.wanted
                    .holds(request.header(&h.name), |found, v| *found == v)
            })
            && self.query.iter().all(|q| {
                let found = query::find(request.query(), &q.name);
                q.wanted.holds(found, |raw, v| query::canonical_eq(raw, v))
            })
            && (self.client_ip.is_empty()
                || request
                    .client_ip()
                    .is_some_and(|ip| self.client_ip.iter().any(|net| net.contains(ip))))
            && self.not.as_ref().is_none_or(|not| !not.matches(request))
    }

    /// This matcher and those nested in it by `not`, outermost first: what
    /// a host must fetch is what any of them reads.
    pub fn nested(&self) -> impl Iterator<Item = &Matcher> {
        core::iter::successors(Some(self), |m| m.not.as_deref())
    }
}

/// A compiled path pattern: `*` matches any run of characters other than
/// `/`, `**` (or a longer run of `*`) any run of characters, and every other
/// character itself (or, ignoring case, an ASCII letter in either case).
/// `/**/` therefore needs at least `//`, and `/static/**` matches `/static/`
/// but not `/static`.
///
/// Matching takes O(n·m) time for a text of n bytes and a pattern of m, and
/// allocates nothing: the pattern is split once, here, at each `**`, then at
/// each `/`, then at each `*`, and matching only searches for literals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    /// The pattern between `**`s: `chunks[0] ** chunks[1] ** …`; never empty.
    chunks: Vec<Chunk>,
    /// Whether ASCII letters match in either case.
    ignore_case: bool,
}

/// Part of a pattern without `**`, split at each `/`:
/// `parts[0] / parts[1] / …`; never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Chunk {
    parts: Vec<Part>,
}

/// Part of a pattern without `**` or `/`, split at each `*`:
/// `literals[0] * literals[1] * …`; never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Part {
    literals: Vec<Literal>,
}

impl Glob {
    /// Compiles a pattern; every character other than `*` is literal.
    pub fn new(pattern: &str) -> Glob {
        Glob::compile(pattern, false)
    }

    /// Compiles a pattern whose ASCII letters match in either case.
    pub fn ignoring_case(pattern: &str) -> Glob {
        Glob::compile(pattern, true)
    }

    fn compile(pattern: &str, ignore_case: bool) -> Glob {
        let mut chunks = Vec::new();
        let mut rest = pattern;
        // The first `**` found starts a run of stars: the whole run is one `**`.
        while let Some((chunk, after)) = rest.split_once("**") {
            chunks.push(Chunk::new(chunk, ignore_case));
            rest = after.trim_start_matches('*');
        }
        chunks.push(Chunk::new(rest, ignore_case));
        Glob {
            chunks,
            ignore_case,
        }
    }

    /// Whether ASCII letters match in either case.
    pub fn ignores_case(&self) -> bool {
        self.ignore_case
    }

    /// Whether the whole of `text` matches.
    ///
    /// Each chunk between `**`s takes the match that ends earliest: the `**`
    /// after it can absorb whatever a later end would have covered, so no
    /// other choice can do better, and chunks never need revisiting.
    pub fn matches(&self, text: &str) -> bool {
        let Some((first, rest)) = self.chunks.split_first() else {
            return text.is_empty();
        };
        let Some((last, middle)) = rest.split_last() else {
            return first.matches_whole(text);
        };
        let Some(mut from) = first.earliest_end_at_start(text) else {
            return false;
        };
        for chunk in middle {
            match chunk.earliest_end_from(text, from) {
                Some(end) => from = end,
                None => return false,
            }
        }
        last.matches_end_from(text, from)
    }
}

// A chunk's `*`s never cross `/`, so the `/`s of its parts line up one for
// one with consecutive `/`s of the text it matches: placing the chunk means
// choosing which `/` of the text its first `/` falls on, and each part then
// matches within one `/`-free piece of the text.
impl Chunk {
    fn new(chunk: &str, ignore_case: bool) -> Chunk {
        Chunk {
            parts: chunk
                .split('/')
                .map(|part| Part::new(part, ignore_case))
                .collect(),
        }
    }

    /// Whether the chunk matches all of `text`.
    fn matches_whole(&self, text: &str) -> bool {
        let mut pieces = text.split('/');
        self.parts
            .iter()
            .all(|part| pieces.next().is_some_and(|piece| part.matches_whole(piece)))
            && pieces.next().is_none()
    }

    /// The earliest end of a match of the chunk starting at 0.
    fn earliest_end_at_start(&self, text: &str) -> Option<usize> {
        let (last, init) = self.parts.split_last()?;
        let mut pieces = pieces_from(text, 0);
        for part in init {
            let (_, piece) = pieces.next()?;
            if !part.matches_whole(piece) {
                return None;
            }
        }
        let (at, piece) = pieces.next()?;
        Some(at + last.earliest_end_at_start(piece)?)
    }

    /// The earliest end of a match of the chunk starting anywhere from `from`.
    ///
    /// Tries each piece of the text as the one holding the first part, in
    /// order: a later one can only give a later end. Each piece is looked at
    /// by at most one try per part, hence O(n·m).
    fn earliest_end_from(&self, text: &str, from: usize) -> Option<usize> {
        let mut pieces = pieces_from(text, from);
        let Some((first, rest)) = self.parts.split_first() else {
            return Some(from);
        };
        let Some((last, middle)) = rest.split_last() else {
            // No `/`: the chunk lies within one piece.
            return pieces.find_map(|(at, piece)| Some(at + first.earliest_end_within(piece)?));
        };
        loop {
            let mut window = pieces.clone();
            let (_, head) = pieces.next()?;
            window.next();
            let placed = first.matches_end_of(head)
                && middle.iter().all(|part| {
                    window
                        .next()
                        .is_some_and(|(_, piece)| part.matches_whole(piece))
                });
            if placed {
                let end = window
                    .next()
                    .and_then(|(at, piece)| Some(at + last.earliest_end_at_start(piece)?));
                if end.is_some() {
                    return end;
                }
            }
        }
    }

    /// Whether the chunk matches the end of `text`, starting at `from` or later.
    fn matches_end_from(&self, text: &str, from: usize) -> bool {
        let Some((first, rest)) = self.parts.split_first() else {
            return false;
        };
        let Some(tail) = text.get(from..) else {
            return false;
        };
        let mut pieces = tail.rsplit('/');
        rest.iter()
            .rev()
            .all(|part| pieces.next().is_some_and(|piece| part.matches_whole(piece)))
            && pieces
                .next()
                .is_some_and(|piece| first.matches_end_of(piece))
    }
}

/// The `/`-separated pieces of `text` from `from` on, each with its offset.
fn pieces_from(text: &str, from: usize) -> impl Iterator<Item = (usize, &str)> + Clone {
    let tail = text.get(from..);
    tail.into_iter()
        .flat_map(|tail| tail.split('/'))
        .scan(from, |at, piece| {
            let start = *at;
            *at += piece.len() + 1;
            Some((start, piece))
        })
}

// A part's `*`s match any run within a `/`-free piece, so finding each
// literal at its leftmost place after the previous one is always safe.
// Finding a literal is linear (see `literal`), so each of these is
// O(piece + part).
impl Part {
    fn new(part: &str, ignore_case: bool) -> Part {
        Part {
            literals: part
                .split('*')
                .map(|literal| Literal::new(literal, ignore_case))
                .collect(),
        }
    }

    /// Whether the part matches all of `piece`.
    fn matches_whole(&self, piece: &str) -> bool {
        let Some((first, rest)) = self.literals.split_first() else {
            return false;
        };
        let Some(piece) = first.strip_prefix_of(piece) else {
            return false;
        };
        match rest.split_last() {
            None => piece.is_empty(),
            Some((last, middle)) => last
                .strip_suffix_of(piece)
                .is_some_and(|inner| leftmost_end(middle, inner).is_some()),
        }
    }

    /// The earliest end of a match starting at 0.
    fn earliest_end_at_start(&self, piece: &str) -> Option<usize> {
        let (first, rest) = self.literals.split_first()?;
        let after = first.strip_prefix_of(piece)?;
        Some(first.len() + leftmost_end(rest, after)?)
    }

    /// The earliest end of a match starting anywhere.
    fn earliest_end_within(&self, piece: &str) -> Option<usize> {
        leftmost_end(&self.literals, piece)
    }

    /// Whether a match ends at the end of `piece`, starting anywhere.
    fn matches_end_of(&self, piece: &str) -> bool {
        self.literals.split_last().is_some_and(|(last, init)| {
            last.strip_suffix_of(piece)
                .is_some_and(|before| leftmost_end(init, before).is_some())
        })
    }
}

/// Where the last of `literals` ends when each is found, in order and without
/// overlap, at its leftmost place in `text`.
fn leftmost_end(literals: &[Literal], text: &str) -> Option<usize> {
    let mut end = 0;
    for literal in literals {
        end += literal.find_in(text.get(end..)?)? + literal.len();
    }
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::request::HttpRequest;
    use alloc::vec;

    #[test]
    fn globs() {
        let g = Glob::new("/api/*/items");
        assert!(g.matches("/api/v1/items"));
        assert!(!g.matches("/api/v1/x/items"));
        assert!(!g.matches("/api/v1/items/3"));
        let g = Glob::new("/static/**");
        assert!(g.matches("/static/a/b/c.css"));
        assert!(g.matches("/static/"));
        let g = Glob::new("/room/*");
        assert!(g.matches("/room/lobby"));
        assert!(!g.matches("/room/lobby/x"));
        assert!(Glob::new("*.png").matches("cat.png"));
        assert!(!Glob::new("*.png").matches("a/cat.png"));
    }

    #[test]
    fn glob_edge_cases() {
        let cases: &[(&str, &str, bool)] = &[
            ("", "", true),
            ("", "/", false),
            ("**", "", true),
            ("**", "/a/b", true),
            ("*", "", true),
            ("*", "/", false),
            // `/**/` matches one or more segments, never zero.
            ("/a/**/b", "/a/b", false),
            ("/a/**/b", "/a//b", true),
            ("/a/**/b", "/a/x/y/b", true),
            ("/x/**", "/x", false),
            ("/x/**", "/x/", true),
            ("**/x", "x", false),
            ("**/x", "/x", true),
            ("**x", "a/bx", true),
            // A run of three or more stars is one `**`.
            ("/a***b", "/a/x/b", true),
            ("/a/*/b", "/a//b", true),
            ("/a/*", "/a/b/", false),
            ("/*/*", "/a/b", true),
            ("/*/*", "/a", false),
            ("/a*b*c", "/abbc", true),
            ("/a*b*c", "/acb", false),
            ("/g/**/a/**/edit", "/g/x/a/y/edit", true),
            ("/g/**/a/**/edit", "/g/a/edit", false),
            ("/g/**/a/**/edit", "/g/x/a//edit", true),
            ("/**/a*/**", "/x/ab/y/", true),
            ("/**/a*/**", "/x/b/ab/", true),
            ("/**/a*/**", "/x/ba/y/", false),
            ("/é/*ü", "/é/xyü", true),
            ("/é/*ü", "/é/x/ü", false),
        ];
        for &(pattern, path, expected) in cases {
            assert_eq!(
                Glob::new(pattern).matches(path),
                expected,
                "{pattern:?} against {path:?}"
            );
        }
    }

    #[test]
    fn adversarial_paths_take_linear_time() {
        // Backtracking over every place each wildcard could end took about
        // 6 s per match here, so this loop would run for hours.
        let path = alloc::format!("/g{}", "/a".repeat(1600));
        let segment = alloc::format!("/{}", "a".repeat(3200));
        let cases = [
            (Glob::new("/g/**/a/**/a/**/edit"), &path),
            // The last `**` makes `/edit/` a chunk searched for, not a suffix.
            (Glob::new("/g/**/a/**/a/**/edit/**"), &path),
            (Glob::new("/*a*a*a*a*a*b"), &segment),
            (Glob::new("/**a*a*a*a*a*b**"), &segment),
            (Glob::ignoring_case("/G/**/A/**/a/**/EDIT"), &path),
            (Glob::ignoring_case("/**A*a*A*a*A*B**"), &segment),
        ];
        for _ in 0..1000 {
            for (glob, text) in &cases {
                assert!(!glob.matches(text));
            }
        }
        assert!(cases[0].0.matches(&alloc::format!("{path}/edit")));
        assert!(cases[1].0.matches(&alloc::format!("{path}/edit/")));
        assert!(cases[2].0.matches(&alloc::format!("{segment}b")));
        assert!(cases[3].0.matches(&alloc::format!("{segment}b")));
        assert!(cases[4].0.matches(&alloc::format!("{path}/edit")));
        assert!(cases[5].0.matches(&alloc::format!("{segment}b")));
    }

    #[test]
    fn paths_match_ignoring_ascii_case_only_when_asked() {
        let condition = |kind: &str, pattern: &str, ignore_case: bool| match kind {
            "exact" => PathMatch::exact(pattern, ignore_case),
            "prefix" => PathMatch::prefix(pattern, ignore_case),
            _ if ignore_case => PathMatch::glob(Glob::ignoring_case(pattern)),
            _ => PathMatch::glob(Glob::new(pattern)),
        };
        // (kind, pattern, path, matches ignoring case, matches exactly)
        let cases: &[(&str, &str, &str, bool, bool)] = &[
            ("exact", "/Login", "/lOGIN", true, false),
            ("exact", "/Login", "/Login", true, true),
            ("exact", "/Login", "/Login/", false, false),
            ("prefix", "/api/", "/API/x", true, false),
            ("prefix", "/api/", "/api/x", true, true),
            ("prefix", "/api/", "/Api", false, false),
            // Only ASCII letters fold.
            ("prefix", "/é/", "/É/x", false, false),
            ("glob", "/api/*/Items", "/API/V1/items", true, false),
            ("glob", "/api/**", "/aPi/x/Y", true, false),
            ("glob", "*.PNG", "cat.png", true, false),
            ("glob", "/a*B*c", "/AxbXC", true, false),
            ("glob", "/a*B*c", "/axBxc", true, true),
            ("glob", "/a/*/b", "/A/x/y/B", false, false),
        ];
        for &(kind, pattern, path, ignoring, exactly) in cases {
            let folded = condition(kind, pattern, true);
            let exact = condition(kind, pattern, false);
            assert!(folded.ignores_case() && !exact.ignores_case());
            assert_eq!(
                folded.matches(path),
                ignoring,
                "{kind} {pattern:?} ignoring case on {path:?}"
            );
            assert_eq!(
                exact.matches(path),
                exactly,
                "{kind} {pattern:?} on {path:?}"
            );
        }
    }

    #[test]
    fn matcher_combines_conditions() {
        let m = Matcher {
            methods: ["POST".into()].into(),
            paths: vec![PathMatch::exact("/login", false)],
            headers: [ValueMatch {
                name: "x-tier".into(),
                wanted: Wanted::OneOf(["free".into()].into()),
            }]
            .into(),
            ..Matcher::default()
        };
        let ok = HttpRequest::new("POST", "/login?next=/").with_header("X-Tier", "free");
        assert!(m.matches(&ok));
        assert!(!m.matches(&HttpRequest::new("GET", "/login").with_header("x-tier", "free")));
        assert!(!m.matches(&HttpRequest::new("POST", "/login").with_header("x-tier", "paid")));
        assert!(!m.matches(&HttpRequest::new("POST", "/login")));
        assert!(Matcher::default().matches(&HttpRequest::new("GET", "/")));
    }

    fn named(name: &str, wanted: Wanted) -> ValueMatch {
        ValueMatch {
            name: name.into(),
            wanted,
        }
    }

    fn one_of(values: &[&str]) -> Wanted {
        Wanted::OneOf(values.iter().map(|v| (*v).into()).collect())
    }

    #[test]
    fn header_conditions_present_absent_and_any_of() {
        let m = Matcher {
            headers: [
                named("x-tier", one_of(&["free", "trial"])),
                named("x-internal", Wanted::Absent),
                named("x-user", Wanted::Present),
            ]
            .into(),
            ..Matcher::default()
        };
        let req = |tier: &str| {
            HttpRequest::new("GET", "/")
                .with_header("x-tier", tier)
                .with_header("x-user", "")
        };
        assert!(m.matches(&req("free")));
        assert!(m.matches(&req("trial")));
        assert!(!m.matches(&req("paid")));
        assert!(!m.matches(&req("Free")));
        assert!(!m.matches(&req("free").with_header("x-internal", "1")));
        assert!(!m.matches(&HttpRequest::new("GET", "/").with_header("x-tier", "free")));
    }

    #[test]
    fn query_conditions_compare_decoded_first_values() {
        let m = Matcher {
            query: [
                named("tier", one_of(&["free plan"])),
                named("debug", Wanted::Absent),
            ]
            .into(),
            ..Matcher::default()
        };
        for target in [
            "/x?tier=free+plan",
            "/x?tier=free%20plan",
            "/x?%74ier=fre%65+plan&tier=paid",
            "/x?a=1&tier=free%20plan#debug",
        ] {
            assert!(m.matches(&HttpRequest::new("GET", target)), "{target}");
        }
        for target in [
            "/x",
            "/x?tier=paid&tier=free+plan",
            "/x?Tier=free+plan",
            "/x?tier=free+plan&debug",
            "/x?tier=free%2Bplan",
        ] {
            assert!(!m.matches(&HttpRequest::new("GET", target)), "{target}");
        }
    }

    #[test]
    fn client_networks_and_negation() {
        let internal = Matcher {
            client_ip: ["10.0.0.0/8", "2001:db8::/32"]
                .iter()
                .map(|n| Cidr::parse(n).unwrap())
                .collect(),
            ..Matcher::default()
        };
        let external = Matcher {
            paths: vec![PathMatch::prefix("/api/", false)],
            not: Some(Box::new(internal.clone())),
            ..Matcher::default()
        };
        let from = |ip: &str| HttpRequest::new("GET", "/api/x").with_client_ip(ip.parse().unwrap());
        for (ip, inside) in [
            ("10.1.2.3", true),
            ("::ffff:10.0.0.1", true),
            ("2001:db8::7", true),
            ("192.0.2.1", false),
            ("2001:db9::1", false),
        ] {
            assert_eq!(internal.matches(&from(ip)), inside, "{ip}");
            assert_eq!(external.matches(&from(ip)), !inside, "{ip}");
        }
        // An unknown address is in no network: the negation holds.
        assert!(!internal.matches(&HttpRequest::new("GET", "/api/x")));
        assert!(external.matches(&HttpRequest::new("GET", "/api/x")));
        assert!(!external.matches(&HttpRequest::new("GET", "/other")));
        assert_eq!(external.nested().count(), 2);
    }

    #[test]
    fn negation_holds_when_not_all_nested_conditions_hold() {
        // Not (POST and x-admin present).
        let m = Matcher {
            not: Some(Box::new(Matcher {
                methods: ["POST".into()].into(),
                headers: [named("x-admin", Wanted::Present)].into(),
                ..Matcher::default()
            })),
            ..Matcher::default()
        };
        assert!(m.matches(&HttpRequest::new("GET", "/").with_header("x-admin", "1")));
        assert!(m.matches(&HttpRequest::new("POST", "/")));
        assert!(!m.matches(&HttpRequest::new("POST", "/").with_header("x-admin", "1")));
    }

    #[test]
    fn grpc_and_websocket_conditions() {
        let m = Matcher {
            grpc: Some(GrpcMatch {
                service: Some(Glob::new("chat.*")),
                method: Some(Glob::new("Send*")),
            }),
            ..Matcher::default()
        };
        let call = |path: &str| HttpRequest::new("POST", path).with_protocol(Protocol::Grpc);
        assert!(m.matches(&call("/chat.ChatService/SendMessage")));
        assert!(!m.matches(&call("/chat.ChatService/Subscribe")));
        assert!(!m.matches(&call("/user.UserService/SendMessage")));
        assert!(!m.matches(&HttpRequest::new("POST", "/chat.ChatService/SendMessage")));
        let ws = Matcher {
            websocket: true,
            ..Matcher::default()
        };
        assert!(ws.matches(&HttpRequest::new("GET", "/ws").with_protocol(Protocol::WebSocket)));
        assert!(!ws.matches(&HttpRequest::new("GET", "/ws")));
    }
}
