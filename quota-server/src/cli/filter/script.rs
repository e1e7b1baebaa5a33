//! The traffic script of `sluice filter simulate`: one line per request
//! (or burst of requests), each at a time on a simulated clock.
//!
//! ```text
//! # comments and blank lines are ignored
//! at 0.5s GET /api/x client=10.0.0.1 header:x-api-key=abc
//! after 1s POST /login client=10.0.0.2
//! repeat 20 every 10ms GET /login client=10.0.0.1
//! ```
//!
//! A line starts at the time of the previous line's last request, moved
//! by `at TIME` (from the start) or `after SPAN`; `repeat N every SPAN`
//! sends N requests SPAN apart. Then the method, the path (with any query
//! string, as rules read it), and any of `client=IP`, `header:NAME=VALUE`
//! and `protocol=http|grpc|websocket`.

use std::net::IpAddr;

use sluice_core::policy::{HttpRequest, Protocol};
use sluice_core::simulation::line_words;
use sluice_core::time::Span;

/// The most requests one script may send: the simulation's time and
/// memory grow with them.
pub const MAX_REQUESTS: u64 = 1_000_000;

/// Requests sent at the same or evenly spaced times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Where it is in the script (1-based).
    pub number: usize,
    /// When the first request is sent, from the start.
    pub at: Span,
    /// How many requests.
    pub count: u64,
    /// Time between them.
    pub every: Span,
    /// The request each one is.
    pub request: HttpRequest,
}

/// A whole script, in time order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Script {
    /// The request lines.
    pub lines: Vec<Line>,
}

impl Script {
    /// How many requests the script sends.
    pub fn requests(&self) -> u64 {
        self.lines.iter().map(|l| l.count).sum()
    }
}

/// A script line that does not parse, with its line number.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct ScriptError {
    /// The line at fault (1-based).
    pub line: usize,
    /// What is wrong there.
    pub problem: Problem,
}

/// What is wrong with a script line.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A span or time does not parse.
    #[error("{what}: {text:?} is not a duration such as 250ms, 1.5s or 2m")]
    Span {
        /// Which part.
        what: &'static str,
        /// The text found.
        text: String,
    },
    /// `at` goes back before the previous line.
    #[error(
        "at {at} is before the previous line's last request ({previous}): lines go forward in time"
    )]
    Backwards {
        /// The time asked for.
        at: Span,
        /// The previous line's last request.
        previous: Span,
    },
    /// `repeat` without a count of at least 1.
    #[error("repeat {0:?}: expected a count of at least 1, then `every SPAN`")]
    Repeat(String),
    /// No method and path.
    #[error("expected a method and a path, e.g. `GET /login`")]
    MissingRequest,
    /// A path not starting with `/`.
    #[error("path {0:?} must start with /")]
    Path(String),
    /// `client=` with something that is no IP address.
    #[error("client={0:?} is not an IP address")]
    Client(String),
    /// `protocol=` with an unknown protocol.
    #[error("protocol={0:?}: expected http, grpc or websocket")]
    Protocol(String),
    /// A word that is none of the known attributes.
    #[error("{0:?}: expected client=IP, header:NAME=VALUE or protocol=PROTOCOL")]
    Attribute(String),
    /// Too many requests in all.
    #[error("the script sends more than {MAX_REQUESTS} requests")]
    TooMany,
    /// The simulated clock would overflow.
    #[error("the time is out of range")]
    TimeOverflow,
}

/// Parses a script, checking every line; the first error stops it.
pub fn parse(text: &str) -> Result<Script, ScriptError> {
    let mut script = Script::default();
    let mut clock = Span::ZERO;
    let mut total = 0u64;
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let words = line_words(raw);
        if words.is_empty() {
            continue;
        }
        let fail = |problem| ScriptError {
            line: number,
            problem,
        };
        let line = parse_line(number, &words, clock).map_err(fail)?;
        total = total.saturating_add(line.count);
        if total > MAX_REQUESTS {
            return Err(fail(Problem::TooMany));
        }
        clock = last_request(&line).ok_or_else(|| fail(Problem::TimeOverflow))?;
        script.lines.push(line);
    }
    Ok(script)
}

/// When `line`'s last request is sent.
fn last_request(line: &Line) -> Option<Span> {
    let spread = line.every.as_nanos().checked_mul(line.count - 1)?;
    line.at.as_nanos().checked_add(spread).map(Span)
}

fn parse_line(number: usize, words: &[&str], clock: Span) -> Result<Line, Problem> {
    let mut rest = words;
    let mut at = clock;
    match rest {
        ["at", time, tail @ ..] => {
            at = span("at", time)?;
            if at < clock {
                return Err(Problem::Backwards {
                    at,
                    previous: clock,
                });
            }
            rest = tail;
        }
        ["after", delta, tail @ ..] => {
            let delta = span("after", delta)?;
            at = clock
                .as_nanos()
                .checked_add(delta.as_nanos())
                .map(Span)
                .ok_or(Problem::TimeOverflow)?;
            rest = tail;
        }
        _ => {}
    }
    let (mut count, mut every) = (1, Span::ZERO);
    if let ["repeat", n, tail @ ..] = rest {
        count = n
            .parse::<u64>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| Problem::Repeat((*n).to_owned()))?;
        let ["every", spacing, tail @ ..] = tail else {
            return Err(Problem::Repeat((*n).to_owned()));
        };
        if count > MAX_REQUESTS {
            return Err(Problem::TooMany);
        }
        every = span("every", spacing)?;
        rest = tail;
    }
    let [method, path, attributes @ ..] = rest else {
        return Err(Problem::MissingRequest);
    };
    if !path.starts_with('/') {
        return Err(Problem::Path((*path).to_owned()));
    }
    let mut request = HttpRequest::new(&method.to_ascii_uppercase(), path);
    for word in attributes {
        attribute(&mut request, word)?;
    }
    Ok(Line {
        number,
        at,
        count,
        every,
        request,
    })
}

/// Applies one `name=value` word to `request`.
fn attribute(request: &mut HttpRequest, word: &str) -> Result<(), Problem> {
    if let Some(ip) = word.strip_prefix("client=") {
        let ip: IpAddr = ip.parse().map_err(|_| Problem::Client(ip.to_owned()))?;
        request.client_ip = Some(ip);
    } else if let Some(protocol) = word.strip_prefix("protocol=") {
        request.protocol = match protocol.to_ascii_lowercase().as_str() {
            "http" => Protocol::Http,
            "grpc" => Protocol::Grpc,
            "websocket" => Protocol::WebSocket,
            _ => return Err(Problem::Protocol(protocol.to_owned())),
        };
    } else if let Some((name, value)) = word
        .strip_prefix("header:")
        .and_then(|h| h.split_once('='))
        .filter(|(name, _)| !name.is_empty())
    {
        request
            .headers
            .push((name.to_ascii_lowercase(), value.to_owned()));
    } else {
        return Err(Problem::Attribute(word.to_owned()));
    }
    Ok(())
}

fn span(what: &'static str, text: &str) -> Result<Span, Problem> {
    Span::parse(text).map_err(|_| Problem::Span {
        what,
        text: text.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> ScriptError {
        parse(text).unwrap_err()
    }

    #[test]
    fn lines_follow_each_other_in_time() {
        let script = parse(
            "# login storm\n\
             at 0.5s GET /api/x?q=1 client=10.0.0.1 header:X-Api-Key=abc\n\
             \n\
             repeat 3 every 10ms post /login client=::1 protocol=grpc\n\
             after 1s GET /later  # trailing comment\n",
        )
        .unwrap();
        let times: Vec<_> = script.lines.iter().map(|l| (l.number, l.at)).collect();
        assert_eq!(
            times,
            [
                (2, Span::from_millis(500)),
                (4, Span::from_millis(500)),
                (5, Span::from_millis(1_520)),
            ]
        );
        let first = &script.lines[0].request;
        assert_eq!(first.path, "/api/x");
        assert_eq!(first.headers, [("x-api-key".into(), "abc".into())]);
        assert_eq!(first.client_ip, Some("10.0.0.1".parse().unwrap()));
        let burst = &script.lines[1];
        assert_eq!((burst.count, burst.every), (3, Span::from_millis(10)));
        assert_eq!(burst.request.method, "POST");
        assert_eq!(burst.request.protocol, Protocol::Grpc);
        assert_eq!(script.requests(), 5);
    }

    #[test]
    fn errors_name_their_line() {
        let e = error_of("GET /a\n\nat 1x GET /b");
        assert_eq!(e.line, 3);
        assert!(e.to_string().starts_with("line 3: at: \"1x\""), "{e}");
        assert_eq!(error_of("at 2s GET /a\nat 1s GET /b").line, 2);
        assert!(matches!(
            error_of("at 2s GET /a\nat 1s GET /b").problem,
            Problem::Backwards { .. }
        ));
        assert_eq!(error_of("GET").problem, Problem::MissingRequest);
        assert_eq!(error_of("GET login").problem, Problem::Path("login".into()));
        assert_eq!(
            error_of("GET /a client=nope").problem,
            Problem::Client("nope".into())
        );
        assert_eq!(
            error_of("GET /a protocol=ftp").problem,
            Problem::Protocol("ftp".into())
        );
        assert_eq!(
            error_of("GET /a header:=x").problem,
            Problem::Attribute("header:=x".into())
        );
        assert_eq!(
            error_of("repeat 0 every 1s GET /a").problem,
            Problem::Repeat("0".into())
        );
        assert_eq!(
            error_of("repeat 2 GET /a").problem,
            Problem::Repeat("2".into())
        );
    }

    #[test]
    fn requests_are_capped() {
        let e = error_of("repeat 600000 every 1ms GET /a\nrepeat 400000 every 1ms GET /a\nGET /a");
        assert_eq!((e.line, e.problem), (3, Problem::TooMany));
        let e = error_of("repeat 1000001 every 1ms GET /a");
        assert_eq!((e.line, e.problem), (1, Problem::TooMany));
        assert_eq!(
            parse("repeat 1000000 every 0s GET /a").unwrap().requests(),
            MAX_REQUESTS
        );
    }

    #[test]
    fn time_overflow_is_an_error() {
        let e = error_of("at 100000d GET /a\nrepeat 1000 every 100000d GET /a");
        assert_eq!((e.line, e.problem), (2, Problem::TimeOverflow));
    }
}
