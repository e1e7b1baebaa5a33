//! Which requests a rule applies to.

use alloc::string::String;
use alloc::vec::Vec;

use super::request::{grpc_method, Attributes, Protocol};

/// How a rule matches the request path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    /// The whole path equals this.
    Exact(String),
    /// The path starts with this.
    Prefix(String),
    /// `*` matches within one segment, `**` across segments.
    Glob(Glob),
}

impl PathMatch {
    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Glob(g) => g.matches(path),
        }
    }
}

/// A header condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Lower-case header name.
    pub name: String,
    /// Required exact value; `None` means the header only has to be present.
    pub value: Option<String>,
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
    /// Path condition, if any.
    pub path: Option<PathMatch>,
    /// Header conditions, all required.
    pub headers: Vec<HeaderMatch>,
    /// Only gRPC calls to these methods.
    pub grpc: Option<GrpcMatch>,
    /// Only WebSocket upgrades.
    pub websocket: bool,
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
            && self.path.as_ref().is_none_or(|p| p.matches(request.path()))
            && self.headers.iter().all(|h| match request.header(&h.name) {
                Some(actual) => h.value.as_deref().is_none_or(|v| v == actual),
                None => false,
            })
    }
}

/// A compiled path pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    tokens: Vec<GlobToken>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum GlobToken {
    Literal(String),
    /// `*`: any run of characters other than `/`.
    Segment,
    /// `**`: any run of characters.
    Any,
}

impl Glob {
    /// Compiles a pattern; every byte other than `*` is literal.
    pub fn new(pattern: &str) -> Glob {
        let mut tokens = Vec::new();
        let mut literal = String::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '*' {
                literal.push(c);
                continue;
            }
            if !literal.is_empty() {
                tokens.push(GlobToken::Literal(core::mem::take(&mut literal)));
            }
            if chars.peek() == Some(&'*') {
                chars.next();
                while chars.peek() == Some(&'*') {
                    chars.next();
                }
                tokens.push(GlobToken::Any);
            } else {
                tokens.push(GlobToken::Segment);
            }
        }
        if !literal.is_empty() {
            tokens.push(GlobToken::Literal(literal));
        }
        Glob { tokens }
    }

    /// Whether the whole of `text` matches.
    pub fn matches(&self, text: &str) -> bool {
        match_tokens(&self.tokens, text)
    }
}

/// Backtracking matcher; patterns come from config (a handful of tokens),
/// and each wildcard only tries the positions after it, so the cost stays
/// small for real paths.
fn match_tokens(tokens: &[GlobToken], text: &str) -> bool {
    let Some((first, rest)) = tokens.split_first() else {
        return text.is_empty();
    };
    match first {
        GlobToken::Literal(lit) => text
            .strip_prefix(lit.as_str())
            .is_some_and(|after| match_tokens(rest, after)),
        GlobToken::Segment | GlobToken::Any => {
            let crosses = matches!(first, GlobToken::Any);
            for (i, c) in text.char_indices() {
                if match_tokens(rest, &text[i..]) {
                    return true;
                }
                if c == '/' && !crosses {
                    return false;
                }
            }
            match_tokens(rest, "")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::request::HttpRequest;

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
    fn matcher_combines_conditions() {
        let m = Matcher {
            methods: ["POST".into()].into(),
            path: Some(PathMatch::Exact("/login".into())),
            headers: [HeaderMatch {
                name: "x-tier".into(),
                value: Some("free".into()),
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
