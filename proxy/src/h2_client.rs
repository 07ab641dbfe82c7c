//! HTTP/2 requests straight on `h2` client connections, for the proxy's two HTTP/2 clients: the
//! pool to meshed endpoints and the inbound side's shared connection to an HTTP/2 application.
//! Owns the connection's settings and task ([`handshake`]), and a request's way through it
//! ([`send`]): its stream opened from the task that handles the request, its body copied under
//! the peer's flow control ([`CopyBody`]), its response read ([`ResponseBody`]).
//!
//! hyper's HTTP/2 client, used before (ztunnel drives `h2` directly too), hands every request to
//! the connection's task through a channel and spawns a task to await each response and one to
//! send each request body still open: per request, two or three more tasks woken, on caches
//! that a request every millisecond leaves cold.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use hyper::body::{Body, Frame, SizeHint};
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::BoxError;

/// Streams a connection may open before the peer's settings say how many it allows.
const INITIAL_MAX_STREAMS: usize = 100;
/// Flow-control windows announced to the peer (hyper's client's, which these clients used
/// before), so a fast peer's response is not held back by a window update per 64 KiB.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// The largest response head accepted.
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// An open connection: where to open streams, and whether its task has ended.
#[derive(Clone)]
pub struct Connection {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl Connection {
    /// The connection's task ended (it broke, idled out or was closed), or a request found it
    /// unable to take a stream.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Waits until the connection can take one more stream. One that cannot (the peer closed
    /// it, or sent GOAWAY) is marked closed, so that the next request passes it by. Takes this
    /// handle rather than cloning its sender: each clone and drop of one takes h2's lock.
    pub async fn ready(self) -> Result<SendRequest<Bytes>, h2::Error> {
        let Connection { sender, closed } = self;
        let ready = sender.ready().await;
        ready.inspect_err(|_| closed.store(true, Ordering::Relaxed))
    }
}

/// Speaks HTTP/2 as a client over `io` and spawns the connection's task, which ends when the
/// connection does, when `until` resolves (dropping the connection closes it), or when every
/// handle to it is gone and its streams are done (after a GOAWAY).
pub async fn handshake<T>(
    io: T,
    peer: SocketAddr,
    until: impl Future<Output = ()> + Send + 'static,
) -> Result<Connection, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = h2::client::Builder::new()
        .initial_max_send_streams(INITIAL_MAX_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let ended = MarkClosed(closed.clone());
    tokio::spawn(async move {
        let _ended = ended;
        tokio::select! {
            ended = connection => if let Err(e) = ended {
                tracing::debug!(error = %e, %peer, "HTTP/2 client connection ended");
            },
            () = until => tracing::debug!(%peer, "closing an HTTP/2 client connection"),
        }
    });
    Ok(Connection { sender, closed })
}

/// Marks a connection closed when its task ends, however it ends.
struct MarkClosed(Arc<AtomicBool>);

impl Drop for MarkClosed {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Sends `request` on a new stream of `sender` (from [`Connection::ready`]) and waits for the
/// response head, copying the request body meanwhile; a body still going when the head is in
/// (a client stream, a slow upload) is left to a task of its own. Dropped before the head (a
/// timeout, the client gone), it drops both halves of the stream, and h2 resets it.
pub async fn send<B>(
    mut sender: SendRequest<Bytes>,
    request: Request<B>,
) -> Result<Response<ResponseBody>, h2::Error>
where
    B: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static,
{
    let (mut head, body) = request.into_parts();
    // HTTP/2 forbids connection-specific headers (RFC 9113 8.2.2) and h2 refuses to send them;
    // a route's header modifier may have added one after the hop-by-hop ones were removed.
    crate::l7::remove_hop_by_hop(&mut head.headers);
    let end_of_stream = body.is_end_stream();
    let (mut response, stream) =
        sender.send_request(Request::from_parts(head, ()), end_of_stream)?;
    let mut copy = (!end_of_stream).then(|| CopyBody::new(body, stream));
    let head = std::future::poll_fn(|cx| {
        if let Some(body) = copy.as_mut()
            && Pin::new(body).poll(cx).is_ready()
        {
            copy = None;
        }
        Pin::new(&mut response).poll(cx)
    })
    .await;
    if let (Ok(_), Some(copy)) = (&head, copy) {
        tokio::spawn(copy);
    }
    Ok(head?.map(ResponseBody::new))
}

/// Copies a request body onto its stream as the peer's flow control allows: the next chunk is
/// read from the client only when the last one went out, so a slow peer holds back the client,
/// not the proxy's memory.
struct CopyBody<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// A chunk read, waiting for the window to open, and whether it ends the body.
    waiting: Option<(Bytes, bool)>,
}

impl<B> CopyBody<B>
where
    B: Body<Data = Bytes, Error: Into<BoxError>> + Unpin,
{
    fn new(body: B, stream: SendStream<Bytes>) -> CopyBody<B> {
        CopyBody {
            body,
            stream,
            waiting: None,
        }
    }

    fn copy(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            // Registered first, so that a reset from the peer wakes a copy waiting on either
            // the client or the window.
            if let Poll::Ready(reason) = self.stream.poll_reset(cx)? {
                return Poll::Ready(Err(h2::Error::from(reason).into()));
            }
            if let Some((chunk, end)) = self.waiting.take() {
                while self.stream.capacity() == 0 {
                    match self.stream.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                        // The stream no longer sends: it was closed or reset.
                        Poll::Ready(None) => return Poll::Ready(Ok(())),
                        Poll::Pending => {
                            self.waiting = Some((chunk, end));
                            return Poll::Pending;
                        }
                    }
                }
                self.stream.send_data(chunk, end)?;
                if end {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let end = self.body.is_end_stream();
                        if chunk.is_empty() {
                            if end {
                                self.stream.send_data(chunk, true)?;
                                return Poll::Ready(Ok(()));
                            }
                            continue;
                        }
                        // A claim of one byte, not the chunk's length: h2 raises it to what is
                        // buffered once the chunk is sent, and a stream waiting for its client
                        // does not pin the connection's window meanwhile.
                        self.stream.reserve_capacity(1);
                        self.waiting = Some((chunk, end));
                    }
                    Err(frame) => {
                        match frame.into_trailers() {
                            Ok(trailers) => self.stream.send_trailers(trailers)?,
                            Err(_) => self.stream.send_data(Bytes::new(), true)?,
                        }
                        return Poll::Ready(Ok(()));
                    }
                },
                Some(Err(error)) => {
                    self.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(Err(error.into()));
                }
                None => {
                    self.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<B> Future for CopyBody<B>
where
    B: Body<Data = Bytes, Error: Into<BoxError>> + Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().copy(cx).map(|copied| {
            if let Err(error) = copied {
                tracing::debug!(%error, "a request body stopped before its end; its stream is reset");
            }
        })
    }
}

/// A response body from an HTTP/2 peer: its DATA frames, then its trailers. Each frame's bytes
/// are given back to the connection's window as they are passed on.
#[derive(Debug)]
pub struct ResponseBody {
    recv: RecvStream,
    data_done: bool,
}

impl ResponseBody {
    fn new(recv: RecvStream) -> ResponseBody {
        ResponseBody {
            recv,
            data_done: false,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(ended_by(error)),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(ended_by(error)),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    /// Exact only for a body already ended: a content-length travels as a header, and is what
    /// the client's side of the proxy frames the body by.
    fn size_hint(&self) -> SizeHint {
        if self.recv.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

/// A stream error as the end of a response body: a reset with NO_ERROR or CANCEL after the
/// response is a normal end (a peer that answered without reading all of the request, RFC 9113
/// 8.1), anything else the body's failure.
fn ended_by(error: h2::Error) -> Option<Result<Frame<Bytes>, h2::Error>> {
    match error.reason() {
        Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL) => None,
        _ => Some(Err(error)),
    }
}
