//! The control API: a REST API over a Unix socket (`exitless run --api-socket PATH`) through
//! which a user or a program drives a running VM, and its client (`exitless ctl`, `exitless top`,
//! the benchmarks).
//!
//! | method | path | does | answers |
//! |---|---|---|---|
//! | GET | `/api/v1/vm` | the VM's info and lifecycle state | `{"state":"running","vcpus":2,...}` |
//! | PUT | `/api/v1/vm/pause` | Running -> Paused (every vCPU parked, kvmclock frozen) | the info |
//! | PUT | `/api/v1/vm/resume` | Paused -> Running | the info |
//! | GET | `/api/v1/vm/stats` | live exits by reason, devices' facts, KVM's counters | `{"uptime_s":..,"exits":{..},..}` |
//! | PUT | `/api/v1/vm/snapshot` | `{"dir":"/abs/path"}`: a paused VM written there (see `snapshot`) | `{"dir":..,"state_bytes":..,"memory_data_bytes":..,"ms":..}` |
//! | PUT | `/api/v1/vm/balloon` | `{"size":"256M"}` or `{"bytes":N}`: the balloon's new target | `{"target_pages":N}` |
//! | PUT | `/api/v1/vm/shutdown` | no body: stops the VM (as `quit`: the summary and report are written); `{"acpi":true,"grace_s":10}`: presses the ACPI power button and stops it after the grace unless the guest powered off | `{}`, or `{"acpi":true,"grace_s":..,"guest_listens":..}` |
//!
//! Errors are HTTP statuses with a JSON body `{"error":"why"}`: 400 for a bad body (a body is a
//! JSON object with only its route's keys) or a request in the wrong state (`cannot resume a VM
//! that is running`), 403 for a snapshot outside `--snapshot-dir`, 404 for an unknown path, 405
//! for a known path with another method (with `Allow`), 409 for a valid request this VM cannot do
//! as asked, 413 for a body over [`MAX_BODY`] bytes, 415 for a body of another media type than
//! JSON, 500 when the VM could not do it. The routes are one table, [`ROUTES`]; `docs/api.yaml` (OpenAPI 3) documents them
//! and a test keeps the two in step.
//!
//! **Why hyper (on a single-threaded tokio runtime).** hyper is the HTTP implementation most of
//! the Rust ecosystem runs on, maintained and fuzzed; it bounds what a client can make it hold
//! (request head at most [`MAX_HEAD`] bytes, a header read timeout) and serves any byte stream,
//! here tokio's `UnixListener`. On one current-thread runtime every connection is a task on the
//! one `api` thread: a client that connects and never speaks, or many of them, costs a task (at
//! most [`MAX_CLIENTS`] at once; more are answered 503 and closed), never a thread, and nothing
//! here can block a vCPU. (tiny_http, the synchronous alternative, reads a header line without
//! bound and starts a thread per connection; Firecracker's and Cloud Hypervisor's `micro_http`
//! is not published on crates.io.) A lifecycle request blocks the runtime only while the vCPUs
//! park or resume (milliseconds; at most [`crate::lifecycle::PAUSE_TIMEOUT`]).
//!
//! Owns the socket and its thread (filter [`crate::seccomp::Kind::Api`]; the runtime and the
//! listener are set up before it, on the caller's thread). It may touch the VM only through
//! [`Control`]. A bad request gets an error and changes nothing.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use serde_json::{json, Value};

use crate::lifecycle::LifecycleError;

/// Longest request body.
pub const MAX_BODY: usize = 4096;
/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Connections served at once.
pub const MAX_CLIENTS: usize = 8;
/// How long a client may take to send a request's head, or its body.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A refused request: its HTTP status and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(m: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: m.into(),
        }
    }
    /// A request the document allows that this VM cannot do as asked (a balloon larger than its
    /// memory, a snapshot directory that already holds one): 409, not 400.
    pub fn conflict(m: impl Into<String>) -> Self {
        ApiError::new(409, m)
    }
    /// A request this VM is not allowed to do (a snapshot outside `--snapshot-dir`).
    pub fn forbidden(m: impl Into<String>) -> Self {
        ApiError::new(403, m)
    }
    fn new(status: u16, m: impl Into<String>) -> Self {
        ApiError {
            status,
            message: m.into(),
        }
    }
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::WrongState { .. } => ApiError::bad_request(e.to_string()),
            LifecycleError::Failed(m) => ApiError::new(500, m),
        }
    }
}

/// What the API may do to a running VM.
pub trait Control: Send + Sync {
    /// The VM's info: its lifecycle state, size, uptime.
    fn info(&self) -> Value;
    /// Running -> Paused.
    fn pause(&self) -> Result<(), ApiError>;
    /// Paused -> Running.
    fn resume(&self) -> Result<(), ApiError>;
    /// Live facts: uptime, devices, KVM's counters.
    fn stats(&self) -> Value;
    /// Paused only: writes a snapshot into `dir`; what was written.
    fn snapshot(&self, dir: &Path) -> Result<Value, ApiError>;
    /// A new balloon target in bytes: the target in 4 KiB pages, or why not.
    fn set_balloon(&self, bytes: u64) -> Result<u32, String>;
    /// Stop the VM.
    fn quit(&self);
    /// Press the ACPI power button and stop the VM after `grace` unless the guest powers off
    /// first; what was done.
    fn power_button(&self, grace: Duration) -> Result<Value, ApiError>;
}

type Handler = fn(&[u8], &dyn Control) -> Result<Value, ApiError>;

/// One route: method, path, handler.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    handler: Handler,
}

/// Every route the API serves (the router is this table; `docs/api.yaml` documents it).
pub const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/api/v1/vm",
        handler: |_, vm| Ok(vm.info()),
    },
    Route {
        method: "PUT",
        path: "/api/v1/vm/pause",
        handler: |_, vm| vm.pause().map(|()| vm.info()),
    },
    Route {
        method: "PUT",
        path: "/api/v1/vm/resume",
        handler: |_, vm| vm.resume().map(|()| vm.info()),
    },
    Route {
        method: "GET",
        path: "/api/v1/vm/stats",
        handler: |_, vm| Ok(vm.stats()),
    },
    Route {
        method: "PUT",
        path: "/api/v1/vm/snapshot",
        handler: snapshot,
    },
    Route {
        method: "PUT",
        path: "/api/v1/vm/balloon",
        handler: balloon,
    },
    Route {
        method: "PUT",
        path: "/api/v1/vm/shutdown",
        handler: shutdown,
    },
];

/// Answers one request: its status and JSON body (no transport: the server, the tests and the
/// fuzzer call it).
pub fn handle(method: &str, path: &str, body: &[u8], vm: &dyn Control) -> (u16, Value) {
    let found = ROUTES.iter().find(|r| r.path == path && r.method == method);
    let answer = match found {
        Some(r) => (r.handler)(body, vm),
        None if ROUTES.iter().any(|r| r.path == path) => {
            Err(ApiError::new(405, format!("{path} does not take {method}")))
        }
        None => Err(ApiError::new(404, format!("no route {path}"))),
    };
    match answer {
        Ok(v) => (200, v),
        Err(e) => (e.status, json!({"error": e.message})),
    }
}

/// A request body that must be a JSON object (the document's bodies all are): anything else,
/// `[]`, `7` or `"x"` included, is refused rather than read as an object without keys (which
/// for `shutdown` meant "stop now").
fn json_object(body: &[u8]) -> Result<Value, ApiError> {
    let req: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    let kind = match &req {
        Value::Object(_) => return Ok(req),
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
    };
    Err(ApiError::bad_request(format!(
        "the body must be a JSON object, not {kind}"
    )))
}

/// Refuses a body with a key its route does not take (a typo such as `"szie"` is told, not
/// ignored; the document says `additionalProperties: false`).
fn only_keys(req: &Value, keys: &[&str]) -> Result<(), ApiError> {
    let unknown = req
        .as_object()
        .and_then(|o| o.keys().find(|k| !keys.contains(&k.as_str())));
    match unknown {
        Some(k) => Err(ApiError::bad_request(format!(
            "unknown key {k:?}: this route takes {keys:?}"
        ))),
        None => Ok(()),
    }
}

/// The `Allow` header of a 405 for `path` (RFC 9110: a 405 lists the methods the path takes):
/// its methods, or None for a path with no route.
pub fn allowed_methods(path: &str) -> Option<String> {
    let methods: Vec<&str> = ROUTES
        .iter()
        .filter(|r| r.path == path)
        .map(|r| r.method)
        .collect();
    (!methods.is_empty()).then(|| methods.join(", "))
}

/// `PUT /api/v1/vm/snapshot`: `{"dir":"/absolute/path"}` (the API's working directory is not
/// the client's: a relative path is refused).
fn snapshot(body: &[u8], vm: &dyn Control) -> Result<Value, ApiError> {
    let req = json_object(body)?;
    let dir = req
        .get("dir")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("a snapshot needs \"dir\" (a directory's path)"))?;
    let dir = Path::new(dir);
    if !dir.is_absolute() {
        return Err(ApiError::bad_request(format!(
            "\"dir\" must be an absolute path, not {}",
            dir.display()
        )));
    }
    vm.snapshot(dir)
}

/// The longest grace a shutdown through the power button may ask for.
const MAX_GRACE_S: f64 = 3600.0;

/// `PUT /api/v1/vm/shutdown`: no body (an empty one: whitespace is not JSON) or `{}` stops the
/// VM at once; `{"acpi": true}` presses the ACPI power button and stops it after `"grace_s"`
/// (default 10, at most an hour) unless the guest powers off first. Any other key is refused.
fn shutdown(body: &[u8], vm: &dyn Control) -> Result<Value, ApiError> {
    let req: Value = if body.is_empty() {
        json!({})
    } else {
        json_object(body)?
    };
    only_keys(&req, &["acpi", "grace_s"])?;
    let acpi = match req.get("acpi") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::bad_request("\"acpi\" must be true or false"))?,
    };
    let grace = match req.get("grace_s") {
        None => 10.0,
        Some(_) if !acpi => {
            return Err(ApiError::bad_request(
                "\"grace_s\" is the grace after the power button: it needs \"acpi\": true",
            ))
        }
        Some(g) => g
            .as_f64()
            .filter(|g| (0.0..=MAX_GRACE_S).contains(g))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "\"grace_s\" must be a number of seconds from 0 to {MAX_GRACE_S}"
                ))
            })?,
    };
    if !acpi {
        vm.quit();
        return Ok(json!({}));
    }
    vm.power_button(Duration::from_secs_f64(grace))
}

/// `PUT /api/v1/vm/balloon`: `{"size":"256M"}` or `{"bytes":N}`.
fn balloon(body: &[u8], vm: &dyn Control) -> Result<Value, ApiError> {
    let req = json_object(body)?;
    only_keys(&req, &["size", "bytes"])?;
    let bytes = match (req.get("size"), req.get("bytes")) {
        (Some(s), None) => crate::config::parse_size(
            s.as_str()
                .ok_or_else(|| ApiError::bad_request("\"size\" must be a string"))?,
        )
        .map_err(ApiError::bad_request)?,
        (None, Some(b)) => b
            .as_u64()
            .ok_or_else(|| ApiError::bad_request("\"bytes\" must be a whole number"))?,
        _ => {
            return Err(ApiError::bad_request(
                "the balloon needs one of \"size\" (\"256M\") or \"bytes\"",
            ))
        }
    };
    let pages = vm.set_balloon(bytes).map_err(ApiError::conflict)?;
    Ok(json!({"target_pages": pages}))
}

/// The listening socket; closing it (drop) stops the accept loop and removes the file.
pub struct ApiServer {
    path: PathBuf,
    closed: Arc<AtomicBool>,
}

/// A socket bound but not answering yet ([`ApiServer::bind`]); connections wait in its backlog
/// until [`BoundApi::serve`]. Dropped unserved, it removes its file.
pub struct BoundApi {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl ApiServer {
    /// Listens on `path` and answers at once ([`ApiServer::bind`] then [`BoundApi::serve`]).
    pub fn start(path: &Path, vm: Arc<dyn Control>) -> Result<Self, String> {
        Self::bind(path)?.serve(vm)
    }

    /// Binds `path`: a stale socket file (nobody listening) is replaced; a live one, or any
    /// other file there, is an error. The VM binds before it starts anything (a bad path fails
    /// the start) and serves once its state is settled (the first answer is never "created").
    pub fn bind(path: &Path) -> Result<BoundApi, String> {
        Ok(BoundApi {
            path: path.to_path_buf(),
            listener: Some(bind(path)?),
        })
    }
}

impl BoundApi {
    /// Starts the API thread answering on the socket.
    pub fn serve(mut self, vm: Arc<dyn Control>) -> Result<ApiServer, String> {
        let path = self.path.clone();
        let listener = self.listener.take().expect("served once");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the API's runtime: {e}"))?;
        let listener = {
            let _in_rt = rt.enter();
            listener
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixListener::from_std(listener))
                .map_err(|e| format!("--api-socket {}: {e}", path.display()))?
        };
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                crate::seccomp::apply(crate::seccomp::Kind::Api);
                rt.block_on(accept_loop(listener, vm, flag));
            })
            .map_err(|e| format!("cannot start the API thread: {e}"))?;
        // The server owns the file now (its drop removes it).
        self.path = PathBuf::new();
        Ok(ApiServer { path, closed })
    }
}

impl Drop for BoundApi {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The socket at `path`, replacing a stale one.
fn bind(path: &Path) -> Result<UnixListener, String> {
    if path.exists() {
        let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        });
        if !is_socket {
            return Err(format!(
                "--api-socket {}: a file that is not a socket is in the way",
                path.display()
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "--api-socket {}: another VM is listening there",
                path.display()
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|e| format!("--api-socket {}: {e}", path.display()))
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The answer to a connection over [`MAX_CLIENTS`].
fn busy() -> String {
    let body =
        json!({"error": format!("more than {MAX_CLIENTS} API connections at once")}).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn accept_loop(
    listener: tokio::net::UnixListener,
    vm: Arc<dyn Control>,
    closed: Arc<AtomicBool>,
) {
    let clients = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if closed.load(Ordering::SeqCst) {
            return;
        }
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.try_write(busy().as_bytes());
            continue;
        }
        let (vm, clients) = (vm.clone(), clients.clone());
        tokio::spawn(async move {
            serve_connection(stream, vm).await;
            clients.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

async fn serve_connection(stream: tokio::net::UnixStream, vm: Arc<dyn Control>) {
    let service = hyper::service::service_fn(move |req| answer(req, vm.clone()));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(CLIENT_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        // A client that shuts down its side after its request still gets the answer.
        .half_close(true)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let _ = conn.await;
}

async fn answer(
    req: Request<Incoming>,
    vm: Arc<dyn Control>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let media = req.headers().get(hyper::header::CONTENT_TYPE).cloned();
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    let (status, value) = match tokio::time::timeout(CLIENT_TIMEOUT, body).await {
        Ok(Ok(b)) => {
            let b = b.to_bytes();
            match media_refused(media.as_ref().map(|m| m.as_bytes()), &b) {
                Some(e) => (e.status, json!({"error": e.message})),
                None => handle(&method, &path, &b, &*vm),
            }
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => (
            413,
            json!({"error": format!("the body is longer than {MAX_BODY} bytes")}),
        ),
        Ok(Err(e)) => (400, json!({"error": format!("reading the body: {e}")})),
        Err(_) => (408, json!({"error": "the body did not arrive in time"})),
    };
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    let allow = (status == 405).then(|| allowed_methods(&path)).flatten();
    if let Some(v) = allow.and_then(|m| hyper::header::HeaderValue::from_str(&m).ok()) {
        resp.headers_mut().insert(hyper::header::ALLOW, v);
    }
    Ok(resp)
}

/// Why a request body may not be read as JSON, if so: it has a `Content-Type` other than
/// `application/json` (415). A body without one is read as JSON; an empty body needs none.
/// (Found by tools/api-fuzz.sh: `{"acpi": false}` sent as `text/plain` stopped the VM.)
fn media_refused(content_type: Option<&[u8]>, body: &[u8]) -> Option<ApiError> {
    let ct = content_type?;
    if body.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(ct);
    let media = text.split(';').next().unwrap_or_default().trim();
    (!media.eq_ignore_ascii_case("application/json")).then(|| {
        ApiError::new(
            415,
            format!("the body is {media:?}; the API takes application/json"),
        )
    })
}

/// A request of the client (`exitless ctl`, `top`, the benchmarks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    State,
    Pause,
    Resume,
    Stats,
    /// A size: `512M`, `1G`, bytes.
    Balloon(String),
    /// A directory (made absolute by the caller).
    Snapshot(PathBuf),
    Quit,
    /// The ACPI power button, then a stop after this grace.
    PowerButton(Duration),
}

impl Call {
    /// Its method, path and body.
    pub fn route(&self) -> (&'static str, &'static str, Option<Value>) {
        match self {
            Call::State => ("GET", "/api/v1/vm", None),
            Call::Pause => ("PUT", "/api/v1/vm/pause", None),
            Call::Resume => ("PUT", "/api/v1/vm/resume", None),
            Call::Stats => ("GET", "/api/v1/vm/stats", None),
            Call::Balloon(size) => ("PUT", "/api/v1/vm/balloon", Some(json!({"size": size}))),
            Call::Snapshot(dir) => ("PUT", "/api/v1/vm/snapshot", Some(json!({"dir": dir}))),
            Call::Quit => ("PUT", "/api/v1/vm/shutdown", None),
            Call::PowerButton(grace) => (
                "PUT",
                "/api/v1/vm/shutdown",
                Some(json!({"acpi": true, "grace_s": grace.as_secs_f64()})),
            ),
        }
    }
}

/// Sends `call` to the VM at `socket`; its reply with `"ok"` added (true for a 2xx status).
pub fn request(socket: &Path, call: &Call) -> Result<Value, String> {
    let (method, path, body) = call.route();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, mut reply) = http(socket, method, path, body.as_bytes())?;
    match reply.as_object_mut() {
        Some(o) => {
            o.insert("ok".into(), json!((200..300).contains(&status)));
        }
        None => reply = json!({"ok": false, "error": format!("HTTP {status}: {reply}")}),
    }
    Ok(reply)
}

/// One HTTP/1.1 request on a new connection (closed after the reply): the status and the JSON
/// body. A client this small needs no HTTP stack: the server closes the connection after its
/// one reply, so the body is what follows the head.
pub fn http(socket: &Path, method: &str, path: &str, body: &[u8]) -> Result<(u16, Value), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach a VM at {}: {e} (is it running with --api-socket?)",
            socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut raw = Vec::new();
    stream
        .take(16 << 20)
        .read_to_end(&mut raw)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Result<(u16, Value), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("the VM's reply is not HTTP: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("the VM's reply has no status: {head:?}"))?;
    let value = serde_json::from_str(body.trim())
        .map_err(|e| format!("the VM's reply is not JSON ({e}): {body:?}"))?;
    Ok((status, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        balloon: Mutex<Option<u64>>,
        quit: AtomicBool,
        paused: AtomicBool,
        button: Mutex<Option<Duration>>,
    }

    impl Control for Fake {
        fn info(&self) -> Value {
            let state = if self.paused.load(Ordering::SeqCst) {
                "paused"
            } else {
                "running"
            };
            json!({"state": state})
        }
        fn pause(&self) -> Result<(), ApiError> {
            if self.paused.swap(true, Ordering::SeqCst) {
                return Err(LifecycleError::WrongState {
                    op: "pause",
                    state: crate::lifecycle::VmState::Paused,
                }
                .into());
            }
            Ok(())
        }
        fn resume(&self) -> Result<(), ApiError> {
            if !self.paused.swap(false, Ordering::SeqCst) {
                return Err(ApiError::bad_request("cannot resume a VM that is running"));
            }
            Ok(())
        }
        fn stats(&self) -> Value {
            json!({"uptime_s": 1.5, "devices": {"virtio-rng": {"requests": 3}}})
        }
        fn snapshot(&self, dir: &Path) -> Result<Value, ApiError> {
            if !self.paused.load(Ordering::SeqCst) {
                return Err(ApiError::bad_request(
                    "cannot snapshot a VM that is running",
                ));
            }
            Ok(json!({"dir": dir}))
        }
        fn set_balloon(&self, bytes: u64) -> Result<u32, String> {
            if bytes > 1 << 30 {
                return Err("larger than guest memory".into());
            }
            *self.balloon.lock().unwrap() = Some(bytes);
            Ok((bytes / 4096) as u32)
        }
        fn quit(&self) {
            self.quit.store(true, Ordering::SeqCst);
        }
        fn power_button(&self, grace: Duration) -> Result<Value, ApiError> {
            *self.button.lock().unwrap() = Some(grace);
            Ok(json!({"acpi": true, "grace_s": grace.as_secs_f64()}))
        }
    }

    #[test]
    fn requests_are_answered_and_bad_ones_change_nothing() {
        let vm = Fake::default();
        let (s, r) = handle("GET", "/api/v1/vm/stats", b"", &vm);
        assert_eq!(s, 200);
        assert_eq!(r["devices"]["virtio-rng"]["requests"], 3);
        let (s, r) = handle("PUT", "/api/v1/vm/balloon", br#"{"size":"48M"}"#, &vm);
        assert_eq!((s, r), (200, json!({"target_pages": 12288})));
        let (_, r) = handle("PUT", "/api/v1/vm/balloon", br#"{"bytes":8192}"#, &vm);
        assert_eq!(r["target_pages"], 2);
        assert_eq!(*vm.balloon.lock().unwrap(), Some(8192));
        for (method, path, body, want) in [
            ("PUT", "/api/v1/vm/balloon", "", 400),
            ("PUT", "/api/v1/vm/balloon", "stats", 400),
            ("PUT", "/api/v1/vm/balloon", "{}", 400),
            ("PUT", "/api/v1/vm/balloon", r#"{"size":"lots"}"#, 400),
            (
                "PUT",
                "/api/v1/vm/balloon",
                r#"{"size":"48M","bytes":4096}"#,
                400,
            ),
            ("PUT", "/api/v1/vm/balloon", r#"{"bytes":-1}"#, 400),
            ("PUT", "/api/v1/vm/balloon", r#"{"size":"2G"}"#, 409),
            ("PUT", "/api/v1/vm/balloon", r#"{"size":7}"#, 400),
            ("PUT", "/api/v1/vm/snapshot", "", 400),
            ("PUT", "/api/v1/vm/snapshot", r#"{"dir":"rel/dir"}"#, 400),
            ("PUT", "/api/v1/vm/snapshot", r#"{"dir":7}"#, 400),
            ("PUT", "/api/v1/vm/snapshot", r#"{"dir":"/abs"}"#, 400),
            ("GET", "/api/v1/vm/snapshot", "", 405),
            ("GET", "/api/v1/vm/balloon", "", 405),
            ("DELETE", "/api/v1/vm", "", 405),
            ("GET", "/api/v1/vm/reboot", "", 404),
            ("GET", "/", "", 404),
            ("PUT", "/api/v1/vm/shutdown", "off", 400),
            // Found by tools/api-fuzz.sh: a JSON body that is not an object (`1048577`) was
            // read as `{}` and stopped the VM.
            ("PUT", "/api/v1/vm/shutdown", "1048577", 400),
            ("PUT", "/api/v1/vm/shutdown", "[]", 400),
            ("PUT", "/api/v1/vm/shutdown", r#""now""#, 400),
            ("PUT", "/api/v1/vm/shutdown", "null", 400),
            ("PUT", "/api/v1/vm/shutdown", " \n", 400),
            (
                "PUT",
                "/api/v1/vm/shutdown",
                r#"{"acpi":false,"now":1}"#,
                400,
            ),
            ("PUT", "/api/v1/vm/balloon", r#"{"szie":"48M"}"#, 400),
            ("PUT", "/api/v1/vm/balloon", r#"{"size":"48M","x":1}"#, 400),
            ("PUT", "/api/v1/vm/balloon", "[]", 400),
            ("PUT", "/api/v1/vm/snapshot", r#"["/abs"]"#, 400),
            ("PUT", "/api/v1/vm/shutdown", r#"{"acpi":"yes"}"#, 400),
            ("PUT", "/api/v1/vm/shutdown", r#"{"grace_s":5}"#, 400),
            (
                "PUT",
                "/api/v1/vm/shutdown",
                r#"{"acpi":true,"grace_s":-1}"#,
                400,
            ),
            (
                "PUT",
                "/api/v1/vm/shutdown",
                r#"{"acpi":true,"grace_s":1e9}"#,
                400,
            ),
            (
                "PUT",
                "/api/v1/vm/shutdown",
                r#"{"acpi":true,"grace_s":"5"}"#,
                400,
            ),
        ] {
            let (s, r) = handle(method, path, body.as_bytes(), &vm);
            assert_eq!(s, want, "{method} {path} {body:?}: {r}");
            assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
        }
        assert_eq!(*vm.balloon.lock().unwrap(), Some(8192), "untouched");
        assert!(!vm.quit.load(Ordering::SeqCst));
        assert_eq!(*vm.button.lock().unwrap(), None, "untouched");
        // The power button: its grace, 10 s by default; no stop yet.
        let body = br#"{"acpi":true,"grace_s":2.5}"#;
        assert_eq!(handle("PUT", "/api/v1/vm/shutdown", body, &vm).0, 200);
        assert_eq!(
            *vm.button.lock().unwrap(),
            Some(Duration::from_millis(2500))
        );
        let (s, r) = handle("PUT", "/api/v1/vm/shutdown", br#"{"acpi":true}"#, &vm);
        assert_eq!((s, r["grace_s"].as_f64()), (200, Some(10.0)));
        assert!(!vm.quit.load(Ordering::SeqCst));
        assert_eq!(handle("PUT", "/api/v1/vm/shutdown", b"{}", &vm).0, 200);
        assert!(vm.quit.load(Ordering::SeqCst));
        vm.quit.store(false, Ordering::SeqCst);
        assert_eq!(handle("PUT", "/api/v1/vm/shutdown", b"", &vm).0, 200);
        assert!(vm.quit.load(Ordering::SeqCst));
    }

    #[test]
    fn a_request_in_the_wrong_state_is_a_400_with_the_reason() {
        let vm = Fake::default();
        let (s, r) = handle("PUT", "/api/v1/vm/resume", b"", &vm);
        assert_eq!(
            (s, r["error"].as_str()),
            (400, Some("cannot resume a VM that is running"))
        );
        assert_eq!(
            handle("PUT", "/api/v1/vm/pause", b"", &vm).1["state"],
            "paused"
        );
        let (s, r) = handle("PUT", "/api/v1/vm/pause", b"", &vm);
        assert_eq!(
            (s, r["error"].as_str()),
            (400, Some("cannot pause a VM that is paused"))
        );
        assert_eq!(
            handle("PUT", "/api/v1/vm/resume", b"", &vm).1["state"],
            "running"
        );
        let failed: ApiError = LifecycleError::Failed("vCPU 1 did not answer".into()).into();
        assert_eq!(failed.status, 500);
    }

    /// The paths and methods of `docs/api.yaml` (OpenAPI 3: paths at two spaces, their
    /// operations at four).
    fn documented() -> std::collections::BTreeSet<(String, String)> {
        let doc = include_str!("../docs/api.yaml");
        let mut out = std::collections::BTreeSet::new();
        let mut in_paths = false;
        let mut path = None;
        for line in doc.lines() {
            if !line.starts_with(' ') {
                in_paths = line.trim_end() == "paths:";
                continue;
            }
            let Some(key) = line.trim_end().strip_suffix(':') else {
                continue;
            };
            if !in_paths {
                continue;
            }
            if let Some(p) = key.strip_prefix("  /") {
                path = Some(format!("/{p}"));
            } else if let (Some(m), Some(p)) = (key.strip_prefix("    "), &path) {
                if !m.starts_with(' ') {
                    out.insert((m.to_uppercase(), p.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn the_openapi_document_has_every_route_and_no_other() {
        let routes: std::collections::BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        assert_eq!(documented(), routes, "docs/api.yaml and api::ROUTES differ");
        // Every client call is a route.
        for c in [
            Call::State,
            Call::Pause,
            Call::Resume,
            Call::Stats,
            Call::Balloon("1M".into()),
            Call::Snapshot("/s".into()),
            Call::Quit,
        ] {
            let (m, p, _) = c.route();
            assert!(routes.contains(&(m.into(), p.into())), "{c:?}");
        }
    }

    fn temp_socket(name: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("exitless-api-{name}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        (dir.join("api.sock"), dir)
    }

    #[test]
    fn the_socket_serves_clients_and_refuses_a_second_vm() {
        let (path, dir) = temp_socket("serve");
        let vm = Arc::new(Fake::default());
        let server = ApiServer::start(&path, vm.clone()).unwrap();
        let r = request(&path, &Call::Balloon("4M".into())).unwrap();
        assert_eq!(
            (r["ok"].clone(), r["target_pages"].clone()),
            (json!(true), json!(1024))
        );
        let r = request(&path, &Call::Resume).unwrap();
        assert_eq!(r["ok"], false, "{r}");
        assert!(r["error"].as_str().unwrap().contains("running"), "{r}");
        // A second VM on the same path is refused while this one listens.
        let e = ApiServer::start(&path, vm.clone()).err().unwrap();
        assert!(e.contains("another VM"), "{e}");
        drop(server);
        assert!(!path.exists(), "the socket file is removed at the end");
        // Nobody listens: the client says so.
        let e = request(&path, &Call::Stats).unwrap_err();
        assert!(e.contains("--api-socket"), "{e}");
        // A regular file in the way is not replaced.
        std::fs::write(&path, "data").unwrap();
        let e = ApiServer::start(&path, vm).err().unwrap();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A bound socket takes connections at once but answers only once served; dropped unserved,
    /// it removes its file.
    #[test]
    fn a_bound_socket_answers_only_once_served() {
        let (path, dir) = temp_socket("bound");
        let bound = ApiServer::bind(&path).unwrap();
        let client = {
            let path = path.clone();
            std::thread::spawn(move || request(&path, &Call::Balloon("4M".into())))
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(!client.is_finished(), "answered before serve");
        let server = bound.serve(Arc::new(Fake::default())).unwrap();
        let r = client.join().unwrap().unwrap();
        assert_eq!(r["target_pages"], json!(1024), "{r}");
        drop(server);
        assert!(!path.exists());
        let unserved = ApiServer::bind(&path).unwrap();
        assert!(path.exists());
        drop(unserved);
        assert!(!path.exists(), "an unserved socket's file is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Sends raw bytes, returns what the server answered before closing.
    fn raw(path: &Path, bytes: &[u8]) -> String {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn a_body_that_is_not_json_by_its_content_type_is_a_415() {
        let json = Some(&b"application/json"[..]);
        assert_eq!(media_refused(json, b"{}"), None);
        assert_eq!(
            media_refused(Some(b"Application/JSON; charset=utf-8"), b"{}"),
            None
        );
        assert_eq!(
            media_refused(None, b"{}"),
            None,
            "no content type: read as JSON"
        );
        assert_eq!(media_refused(Some(b"text/plain"), b""), None, "no body");
        for ct in [
            &b"text/plain"[..],
            b"multipart/form-data",
            b"application/x-www-form-urlencoded",
        ] {
            let e = media_refused(Some(ct), br#"{"acpi": false}"#).expect("refused");
            assert_eq!(e.status, 415, "{e:?}");
        }
        // Through the socket: refused, and the VM is not stopped.
        let (path, dir) = temp_socket("media");
        let vm = Arc::new(Fake::default());
        let _server = ApiServer::start(&path, vm.clone()).unwrap();
        let body = r#"{"acpi": false}"#;
        let req = format!(
            "PUT /api/v1/vm/shutdown HTTP/1.1\r\ncontent-type: text/plain\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        let r = raw(&path, req.as_bytes());
        assert!(r.starts_with("HTTP/1.1 415"), "{r}");
        assert!(
            !vm.quit.load(Ordering::SeqCst),
            "a refused request changes nothing"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Found by tools/api-fuzz.sh (schemathesis' `unsupported_method` check): a 405 names the
    /// methods its path takes in `Allow` (RFC 9110); a 404 has none.
    #[test]
    fn a_405_lists_the_allowed_methods() {
        let (path, dir) = temp_socket("allow");
        let _server = ApiServer::start(&path, Arc::new(Fake::default())).unwrap();
        for (req, allow) in [
            ("TRACE /api/v1/vm HTTP/1.1\r\n\r\n", "GET"),
            ("DELETE /api/v1/vm/pause HTTP/1.1\r\n\r\n", "PUT"),
            ("GET /api/v1/vm/shutdown HTTP/1.1\r\n\r\n", "PUT"),
        ] {
            let r = raw(&path, req.as_bytes()).to_ascii_lowercase();
            assert!(r.starts_with("http/1.1 405"), "{r}");
            assert!(
                r.contains(&format!("\r\nallow: {}\r\n", allow.to_ascii_lowercase())),
                "{r}"
            );
        }
        let r = raw(&path, b"GET /api/v1/nothing HTTP/1.1\r\n\r\n").to_ascii_lowercase();
        assert!(
            r.starts_with("http/1.1 404") && !r.contains("allow:"),
            "{r}"
        );
        assert_eq!(allowed_methods("/api/v1/vm").as_deref(), Some("GET"));
        assert_eq!(allowed_methods("/nothing"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn garbage_huge_and_idle_clients_get_4xx_and_do_not_block_others() {
        let (path, dir) = temp_socket("garbage");
        let vm = Arc::new(Fake::default());
        let _server = ApiServer::start(&path, vm.clone()).unwrap();
        // Idle clients up to the limit hold a slot each; the one over it is refused with 503.
        let idle: Vec<UnixStream> = (0..MAX_CLIENTS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let over = raw(&path, b"GET /api/v1/vm HTTP/1.1\r\n\r\n");
        assert!(over.starts_with("HTTP/1.1 503"), "{over}");
        drop(idle);
        // Once they are gone (the server notices the hang-ups), requests are served again.
        let mut served = None;
        for _ in 0..600 {
            if let Ok(r) = request(&path, &Call::State) {
                if r["ok"] == true {
                    served = Some(r);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(served.expect("served again")["state"], "running");
        let garbage = raw(&path, b"\x00\x01\x02 nonsense\r\n\r\n");
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage:?}");
        let long_head = format!(
            "GET /api/v1/vm HTTP/1.1\r\nx: {}\r\n\r\n",
            "a".repeat(MAX_HEAD * 4)
        );
        let r = raw(&path, long_head.as_bytes());
        assert!(
            r.starts_with("HTTP/1.1 431") || r.starts_with("HTTP/1.1 400"),
            "{r:?}"
        );
        let body = "x".repeat(MAX_BODY * 4);
        let huge = format!(
            "PUT /api/v1/vm/balloon HTTP/1.1\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let r = raw(&path, huge.as_bytes());
        assert!(r.starts_with("HTTP/1.1 413"), "{r:?}");
        assert_eq!(*vm.balloon.lock().unwrap(), None);
        assert_eq!(request(&path, &Call::Stats).unwrap()["ok"], true);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
