//! The empty proxy-wasm HTTP filter (`tests/noop-filter`) plus `count` host
//! calls of one `kind` per request, both read from the plugin
//! configuration `kind=count`: `make bench-host-calls` runs it against the
//! empty filter, so the difference over `count` is what one such call
//! costs Envoy. Request-side kinds run in `on_http_request_headers`,
//! response headers in `on_http_response_headers`, as Sluice makes them.
//!
//! Kinds: `proxy-clock` (`proxy_get_current_time_nanoseconds`),
//! `wasi-clock` (WASI `clock_time_get`, realtime), `metric`
//! (`proxy_increment_metric`), `peer-address` (`proxy_get_property`
//! `source.address`), `request-header` (`proxy_get_header_map_value`
//! `:path`), `shared-get` (`proxy_get_shared_data`), `shared-cas` (a
//! shared-data read and a compare-and-swap write of what it read),
//! `response-header-replace` (`proxy_replace_header_map_value`),
//! `response-header-add` (`proxy_add_header_map_value`),
//! `response-headers-map` (`proxy_get_header_map_pairs`, then
//! `proxy_set_header_map_pairs` with five headers more: setting a whole
//! map in one call).

/// A host call kind and how many times a request makes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// One of the kinds of the crate doc.
    pub kind: Kind,
    /// Calls per request.
    pub count: u32,
}

/// The host calls a probe can make (see the crate doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `proxy_get_current_time_nanoseconds`.
    ProxyClock,
    /// WASI `clock_time_get` (realtime).
    WasiClock,
    /// `proxy_increment_metric`.
    Metric,
    /// `proxy_get_property("source.address")`.
    PeerAddress,
    /// `proxy_get_header_map_value(":path")`.
    RequestHeader,
    /// `proxy_get_shared_data`.
    SharedGet,
    /// `proxy_get_shared_data` then `proxy_set_shared_data` with its CAS.
    SharedCas,
    /// `proxy_replace_header_map_value` on the response.
    ResponseHeaderReplace,
    /// `proxy_add_header_map_value` on the response.
    ResponseHeaderAdd,
    /// The response's whole header map read and set back with five more.
    ResponseHeadersMap,
}

impl Kind {
    /// Every kind with its configuration name.
    pub const ALL: [(&'static str, Kind); 10] = [
        ("proxy-clock", Kind::ProxyClock),
        ("wasi-clock", Kind::WasiClock),
        ("metric", Kind::Metric),
        ("peer-address", Kind::PeerAddress),
        ("request-header", Kind::RequestHeader),
        ("shared-get", Kind::SharedGet),
        ("shared-cas", Kind::SharedCas),
        ("response-header-replace", Kind::ResponseHeaderReplace),
        ("response-header-add", Kind::ResponseHeaderAdd),
        ("response-headers-map", Kind::ResponseHeadersMap),
    ];

    /// Whether the calls belong to the response's headers.
    pub fn on_response(self) -> bool {
        matches!(
            self,
            Kind::ResponseHeaderReplace | Kind::ResponseHeaderAdd | Kind::ResponseHeadersMap
        )
    }
}

impl Probe {
    /// Reads `kind=count`; `None` for anything else.
    pub fn parse(config: &str) -> Option<Probe> {
        let (name, count) = config.trim().split_once('=')?;
        let kind = Kind::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, k)| *k)?;
        Some(Probe {
            kind,
            count: count.parse().ok()?,
        })
    }
}

#[cfg(target_arch = "wasm32")]
mod wasm {
    use super::{Kind, Probe};
    use proxy_wasm::hostcalls as host;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};
    use std::rc::Rc;

    /// The shared-data name the shared kinds read and write.
    const SHARED_NAME: &str = "sluice_probe";
    /// Response header names: distinct, as Sluice's are.
    const NAMES: [&str; 5] = [
        "x-probe-0",
        "x-probe-1",
        "x-probe-2",
        "x-probe-3",
        "x-probe-4",
    ];

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { probe: None }) });
    }}

    /// What each request does: the probe and the metric it may increment.
    struct Setup {
        probe: Probe,
        metric: u32,
    }

    struct Root {
        probe: Option<Rc<Setup>>,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            let config = host::get_buffer(
                proxy_wasm::types::BufferType::PluginConfiguration,
                0,
                usize::MAX,
            )
            .ok()
            .flatten()
            .unwrap_or_default();
            let Some(probe) = Probe::parse(&String::from_utf8_lossy(&config)) else {
                return false;
            };
            let Ok(metric) = host::define_metric(MetricType::Counter, "sluice_probe") else {
                return false;
            };
            // A value the size of a Sluice slot's.
            if host::set_shared_data(SHARED_NAME, Some(&[0u8; 64]), None).is_err() {
                return false;
            }
            self.probe = Some(Rc::new(Setup { probe, metric }));
            true
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Request {
                setup: self.probe.clone(),
            }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Request {
        setup: Option<Rc<Setup>>,
    }

    impl Context for Request {}

    impl Request {
        /// Makes the probe's calls if they belong to the response or not.
        fn probe(&self, on_response: bool) {
            let Some(setup) = self.setup.as_deref() else {
                return;
            };
            let kind = setup.probe.kind;
            if kind.on_response() != on_response {
                return;
            }
            for i in 0..setup.probe.count {
                let name = NAMES
                    .get(i as usize % NAMES.len())
                    .copied()
                    .unwrap_or("x-probe");
                call(kind, setup.metric, name);
            }
        }
    }

    /// One call of `kind` (results dropped: only the cost counts).
    fn call(kind: Kind, metric: u32, name: &str) {
        match kind {
            Kind::ProxyClock => {
                let _ = host::get_current_time();
            }
            Kind::WasiClock => {
                let _ = std::hint::black_box(std::time::SystemTime::now());
            }
            Kind::Metric => {
                let _ = host::increment_metric(metric, 1);
            }
            Kind::PeerAddress => {
                let _ = host::get_property(vec!["source", "address"]);
            }
            Kind::RequestHeader => {
                let _ = host::get_map_value(MapType::HttpRequestHeaders, ":path");
            }
            Kind::SharedGet => {
                let _ = host::get_shared_data(SHARED_NAME);
            }
            Kind::SharedCas => {
                if let Ok((Some(value), cas)) = host::get_shared_data(SHARED_NAME) {
                    let _ = host::set_shared_data(SHARED_NAME, Some(&value), cas);
                }
            }
            Kind::ResponseHeaderReplace => {
                let _ = host::set_map_value(MapType::HttpResponseHeaders, name, Some("12345"));
            }
            Kind::ResponseHeaderAdd => {
                let _ = host::add_map_value(MapType::HttpResponseHeaders, name, "12345");
            }
            Kind::ResponseHeadersMap => {
                if let Ok(mut map) = host::get_map(MapType::HttpResponseHeaders) {
                    map.extend(NAMES.iter().map(|n| ((*n).to_owned(), "12345".to_owned())));
                    let pairs = map.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                    let _ = host::set_map(MapType::HttpResponseHeaders, pairs);
                }
            }
        }
    }

    impl HttpContext for Request {
        fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
            self.probe(false);
            Action::Continue
        }

        fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
            self.probe(true);
            Action::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_names_a_kind_and_a_count() {
        assert_eq!(
            Probe::parse("shared-cas=10"),
            Some(Probe {
                kind: Kind::SharedCas,
                count: 10
            })
        );
        assert_eq!(Probe::parse("shared-cas"), None);
        assert_eq!(Probe::parse("clock=10"), None);
        assert_eq!(Probe::parse("metric=x"), None);
    }
}
