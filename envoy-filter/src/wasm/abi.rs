//! The proxy-wasm host calls the filter makes, returning the host's status
//! instead of panicking on an unexpected one as the SDK's wrappers do: a
//! panic would kill this worker's VM.

use std::ptr::{null, null_mut};

/// A host status other than Ok.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(pub u32);

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
/// A compare-and-swap lost.
pub const CAS_MISMATCH: Status = Status(8);

/// Header maps of the current request.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Map {
    RequestHeaders = 0,
    ResponseHeaders = 2,
    ResponseTrailers = 3,
}

/// Body buffers of the current request.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Body {
    Request = 0,
    Response = 1,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message: *const u8, size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(millis: u32) -> u32;
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_register_shared_queue(name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_resolve_shared_queue(
        vm_id: *const u8,
        vm_id_size: usize,
        name: *const u8,
        name_size: usize,
        id: *mut u32,
    ) -> u32;
    fn proxy_dequeue_shared_queue(id: u32, value: *mut *mut u8, value_size: *mut usize) -> u32;
    fn proxy_enqueue_shared_queue(id: u32, value: *const u8, value_size: usize) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_set_buffer_bytes(
        buffer: u32,
        start: usize,
        size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer: u32,
        start: usize,
        max_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
    ) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    fn proxy_close_stream(stream: u32) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
}

fn check(status: u32) -> Result<(), Status> {
    if status == OK {
        Ok(())
    } else {
        Err(Status(status))
    }
}

/// Takes ownership of a buffer the host allocated through the SDK's
/// `proxy_on_memory_allocate` (the module's global allocator).
fn host_bytes(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        None
    } else {
        // SAFETY: the host wrote `size` bytes into memory it obtained from
        // this module's allocator, and hands ownership to us.
        Some(unsafe { Vec::from_raw_parts(data, size, size) })
    }
}

/// Logs at `level` (0 trace … 4 error).
pub fn log(level: u32, message: &str) {
    // SAFETY: pointer and length describe a live string.
    unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

/// Wall-clock nanoseconds since the Unix epoch.
pub fn now_nanos() -> Result<u64, Status> {
    let mut time = 0u64;
    // SAFETY: the host writes one u64.
    check(unsafe { proxy_get_current_time_nanoseconds(&mut time) })?;
    Ok(time)
}

/// Sets this VM's tick period (0 stops ticks).
pub fn set_tick_period(millis: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_set_tick_period_milliseconds(millis) })
}

/// One header value; `Ok(None)` when absent.
pub fn header(map: Map, name: &str) -> Result<Option<Vec<u8>>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the host fills data/size with a buffer it allocated.
    let status = unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    match status {
        OK => Ok(host_bytes(data, size)),
        NOT_FOUND => Ok(None),
        other => Err(Status(other)),
    }
}

/// Replaces (or adds) one header.
pub fn set_header(map: Map, name: &str, value: &str) -> Result<(), Status> {
    // SAFETY: pointers and lengths describe live strings.
    check(unsafe {
        proxy_replace_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Removes one header (absent is fine).
pub fn remove_header(map: Map, name: &str) -> Result<(), Status> {
    // SAFETY: pointer and length describe a live string.
    check(unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) })
}

/// A property by its path as the ABI encodes it, each segment followed by
/// a NUL (`b"source\0address\0"`: written out, so no request builds it);
/// `Ok(None)` when absent.
pub fn property(encoded: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the host fills data/size with a buffer it allocated.
    let status =
        unsafe { proxy_get_property(encoded.as_ptr(), encoded.len(), &mut data, &mut size) };
    match status {
        OK => Ok(host_bytes(data, size)),
        NOT_FOUND => Ok(None),
        other => Err(Status(other)),
    }
}

/// The plugin configuration bytes (empty when none was given).
pub fn plugin_configuration() -> Result<Vec<u8>, Status> {
    const PLUGIN_CONFIGURATION: u32 = 7;
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the host fills data/size with a buffer it allocated.
    let status = unsafe {
        proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, usize::MAX, &mut data, &mut size)
    };
    match status {
        OK => Ok(host_bytes(data, size).unwrap_or_default()),
        NOT_FOUND => Ok(Vec::new()),
        other => Err(Status(other)),
    }
}

/// The first `size` bytes of a body chunk.
pub fn body(which: Body, size: usize) -> Result<Vec<u8>, Status> {
    let (mut data, mut size_out) = (null_mut(), 0usize);
    // SAFETY: the host fills data/size with a buffer it allocated.
    let status = unsafe { proxy_get_buffer_bytes(which as u32, 0, size, &mut data, &mut size_out) };
    match status {
        OK => Ok(host_bytes(data, size_out).unwrap_or_default()),
        NOT_FOUND => Ok(Vec::new()),
        other => Err(Status(other)),
    }
}

/// The message of a gRPC call's answer, inside that call's callback.
pub fn grpc_answer(size: usize) -> Result<Vec<u8>, Status> {
    const GRPC_RECEIVE_BUFFER: u32 = 5;
    let (mut data, mut size_out) = (null_mut(), 0usize);
    // SAFETY: the host fills data/size with a buffer it allocated.
    let status =
        unsafe { proxy_get_buffer_bytes(GRPC_RECEIVE_BUFFER, 0, size, &mut data, &mut size_out) };
    match status {
        OK => Ok(host_bytes(data, size_out).unwrap_or_default()),
        NOT_FOUND => Ok(Vec::new()),
        other => Err(Status(other)),
    }
}

/// Replaces the first `size` bytes of a body chunk by `value` (Envoy can
/// replace a prefix or append, nothing else).
pub fn set_body(which: Body, size: usize, value: &[u8]) -> Result<(), Status> {
    // SAFETY: pointer and length describe a live buffer.
    check(unsafe { proxy_set_buffer_bytes(which as u32, 0, size, value.as_ptr(), value.len()) })
}

/// Shared data at `key`: the bytes (`None` if never written) and its CAS token.
pub fn get_shared(key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
    let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: the host fills data/size/cas.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match status {
        OK => Ok((Some(host_bytes(data, size).unwrap_or_default()), cas)),
        NOT_FOUND => Ok((None, 0)),
        other => Err(Status(other)),
    }
}

/// Writes shared data if its token is still `cas` (0: unconditionally).
pub fn set_shared(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    let ptr = if value.is_empty() {
        null()
    } else {
        value.as_ptr()
    };
    // SAFETY: pointers and lengths describe live buffers.
    check(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), ptr, value.len(), cas) })
}

/// Registers this VM as the reader of queue `name`; its id.
pub fn register_queue(name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: pointer and length describe a live string; the host writes one u32.
    check(unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// The id of queue `name` registered by a VM of `vm_id`; `Ok(None)` when
/// none is registered.
pub fn resolve_queue(vm_id: &str, name: &str) -> Result<Option<u32>, Status> {
    let mut id = 0u32;
    // SAFETY: pointers and lengths describe live strings; the host writes one u32.
    let status = unsafe {
        proxy_resolve_shared_queue(
            vm_id.as_ptr(),
            vm_id.len(),
            name.as_ptr(),
            name.len(),
            &mut id,
        )
    };
    match status {
        OK => Ok(Some(id)),
        NOT_FOUND => Ok(None),
        other => Err(Status(other)),
    }
}

/// The next message of queue `id`; `Ok(None)` when it is empty.
pub fn dequeue(id: u32) -> Result<Option<Vec<u8>>, Status> {
    const EMPTY: u32 = 7;
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the host fills data/size with a buffer it allocated.
    match unsafe { proxy_dequeue_shared_queue(id, &mut data, &mut size) } {
        OK => Ok(Some(host_bytes(data, size).unwrap_or_default())),
        EMPTY => Ok(None),
        other => Err(Status(other)),
    }
}

/// Puts `value` on queue `id`.
pub fn enqueue(id: u32, value: &[u8]) -> Result<(), Status> {
    // SAFETY: pointer and length describe a live buffer.
    check(unsafe { proxy_enqueue_shared_queue(id, value.as_ptr(), value.len()) })
}

/// Kinds of metric.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum MetricKind {
    Counter = 0,
    Gauge = 1,
}

/// Defines a metric.
pub fn define_metric(kind: MetricKind, name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: the host writes one u32.
    check(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Adds `offset` to a metric. Callers never pass 0 (Envoy refuses it).
pub fn increment_metric(id: u32, offset: i64) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_increment_metric(id, offset) })
}

/// Makes `context_id` the target of the following calls.
pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_set_effective_context(context_id) })
}

/// Continues the current request.
pub fn resume_request() -> Result<(), Status> {
    // SAFETY: no pointers; 0 is the request stream.
    check(unsafe { proxy_continue_stream(0) })
}

/// Resets the current request's stream (Envoy resets the client's and the
/// upstream's side alike).
pub fn reset_stream() -> Result<(), Status> {
    // SAFETY: no pointers; 0 is the request stream.
    check(unsafe { proxy_close_stream(0) })
}

/// Sends a local reply for the current request.
pub fn send_local_response(
    status: u32,
    headers: &[(&str, &str)],
    body: &[u8],
    grpc_status: Option<u32>,
) -> Result<(), Status> {
    let headers = serialize_headers(headers);
    let grpc_status = grpc_status
        .and_then(|s| i32::try_from(s).ok())
        .unwrap_or(-1);
    // SAFETY: pointers and lengths describe live buffers; -1 = no gRPC status.
    check(unsafe {
        proxy_send_local_response(
            status,
            null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            grpc_status,
        )
    })
}

/// The ABI's map encoding: count, then (name size, value size) pairs,
/// then each name and value NUL-terminated.
fn serialize_headers(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (name, value) in headers {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}
