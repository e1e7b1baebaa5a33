//! An empty proxy-wasm HTTP filter: every callback continues and nothing
//! else happens. What any proxy-wasm filter costs Envoy (the VM crossings,
//! the SDK's context per request), for `make bench-filter` to tell
//! Sluice's own cost apart.

#[cfg(target_arch = "wasm32")]
mod wasm {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{ContextType, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}

    struct Root;

    impl Context for Root {}

    impl RootContext for Root {
        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Pass))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    /// A request's context: the SDK's defaults continue every callback.
    struct Pass;

    impl Context for Pass {}

    impl HttpContext for Pass {}
}
