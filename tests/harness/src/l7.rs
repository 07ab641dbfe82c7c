//! Real HTTP peers for the L7 tests in network namespaces (tests/e2e/proxy_l7_peers.rs): the
//! Python interpreter that has PyPI's `grpcio` and `websockets` (gRPC and WebSocket clients and
//! servers), waiting for such a process to say it serves, and an HTTP/1.1 + h2c echo
//! application inside a namespace that records what each request looked like when it reached
//! the application (version, Host, framing, headers the mesh must not leak).

use std::collections::HashMap;
use std::convert::Infallible;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::JoinHandle;

use crate::Proc;
use crate::netns::Netns;

/// The Python that `scripts/test` installs `grpcio` and `websockets` into (the `python3` on
/// PATH: pyenv's under /root, which only root can run, so the peers run as root, whose traffic
/// `sigil proxy init` redirects like any uid but the proxy's). Panics with the install command
/// if either module is missing.
pub fn peer_python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import grpc, websockets, sys; print(sys.executable)"])
            .output()
            .expect("running python3");
        assert!(
            out.status.success(),
            "grpcio or websockets is not installed (python3 -m pip install grpcio==1.85.3 \
             websockets==15.0.1): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    })
}

/// Waits up to 20 s for `line` in the output of `proc` (a server saying it listens), panicking
/// with that output if the process exits or the time passes.
pub async fn wait_for_output(proc: &mut Proc, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proc.logs().lines().any(|l| l.contains(line)) {
        if let Some(status) = proc.child.try_wait().unwrap() {
            panic!("{:?} exited ({status}):\n{}", proc.log, proc.logs());
        }
        assert!(
            Instant::now() < deadline,
            "{:?} never printed {line:?}:\n{}",
            proc.log,
            proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request as it reached [`EchoApp`].
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2.0`...
    pub version: String,
    /// The Host header, else the URI's authority (HTTP/2's `:authority`).
    pub host: String,
    /// Every header, names lower-case (values joined with `, ` when repeated).
    pub headers: HashMap<String, String>,
    pub body_len: usize,
}

/// What [`EchoApp`] answers to GET and HEAD.
pub const HELLO_BODY: &str = "hello from b's app\n";

/// An HTTP application inside a namespace, HTTP/1.1 or h2c (told apart by the HTTP/2 preface),
/// on 0.0.0.0:`port`: GET and HEAD answer [`HELLO_BODY`]; any other method echoes the request
/// body with `x-received-length`. Records every request ([`EchoApp::seen`]); stops on drop.
pub struct EchoApp {
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    task: JoinHandle<()>,
}

impl EchoApp {
    pub fn start(netns: &Netns, port: u16) -> EchoApp {
        let listener = netns.listen(port);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let answer = echo(request, record.clone());
                        async move { Ok::<_, Infallible>(answer.await) }
                    });
                    let mut first = [0u8; 3];
                    let _ = stream.peek(&mut first).await;
                    let io = TokioIo::new(stream);
                    if &first == b"PRI" {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    }
                });
            }
        });
        EchoApp { seen, task }
    }

    /// The requests so far, in the order they were answered.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for EchoApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(
    request: Request<Incoming>,
    record: Arc<Mutex<Vec<SeenRequest>>>,
) -> Response<Full<Bytes>> {
    let mut headers: HashMap<String, String> = HashMap::new();
    for (name, value) in request.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let host = headers
        .get("host")
        .cloned()
        .or_else(|| request.uri().authority().map(ToString::to_string))
        .unwrap_or_default();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let version = format!("{:?}", request.version());
    // Reading the body is what makes hyper answer `Expect: 100-continue` with a 100.
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return Response::builder()
                .status(400)
                .body(Full::new(Bytes::from(format!("reading the body: {e}\n"))))
                .unwrap();
        }
    };
    record.lock().unwrap().push(SeenRequest {
        method: method.to_string(),
        path,
        version,
        host,
        headers,
        body_len: body.len(),
    });
    let response = Response::builder().header("x-app", "b");
    if method == hyper::Method::GET || method == hyper::Method::HEAD {
        // HEAD says how long GET's body is, and has none (HTTP/2 resets a HEAD answered with
        // DATA).
        let body = if method == hyper::Method::HEAD {
            Bytes::new()
        } else {
            Bytes::from_static(HELLO_BODY.as_bytes())
        };
        response
            .header("content-type", "text/plain")
            .header("content-length", HELLO_BODY.len())
            .body(Full::new(body))
            .unwrap()
    } else {
        response
            .header("content-type", "application/octet-stream")
            .header("x-received-length", body.len())
            .body(Full::new(body))
            .unwrap()
    }
}
