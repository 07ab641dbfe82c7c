//! What retries of a routed request need (GEP-1731): which answers may be tried again, the
//! request body kept while it is sent so that another attempt can send it again (up to
//! [`MAX_RETRY_BODY_BYTES`]; past that the request is no longer retryable, and is still sent),
//! and a retry budget per backend Service: retries may add `percent`% of the original requests
//! of the last `interval` plus `min_retries` per `min_interval` (Finagle's and tower's budget,
//! as Linkerd's), counted in atomics over a sliding window of [`BUCKETS`] buckets, so that an
//! outage never multiplies the load.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use sigil_proxy_api::routes::MAX_RETRY_BODY_BYTES;
use sigil_route::{RetryBudget, RetryPolicy, ServiceRef};
use tokio::time::Instant;

use crate::pool::RequestBody;

/// The buckets a budget's window is counted in: it slides by a tenth of its length.
pub const BUCKETS: usize = 10;

/// Methods retried on a response code without `non_idempotent` (RFC 9110 section 9.2.2).
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether an answer with HTTP `status` (and, for gRPC, the `grpc-status` of a trailers-only
/// answer) is one `policy` retries.
pub fn retried_answer(
    policy: &RetryPolicy,
    grpc: bool,
    status: u16,
    grpc_status: Option<u32>,
) -> bool {
    if grpc {
        grpc_status.is_some_and(|code| policy.grpc_codes.contains(&code))
    } else {
        policy.http_codes.contains(&status)
    }
}

/// Why a retry was or was not sent: the `outcome` label of `sigil_proxy_retries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOutcome {
    /// Sent.
    Sent,
    /// The backend's budget had no room: the last answer went back as it was.
    BudgetExhausted,
    /// A failure the policy names, on a request that may not be repeated (a method that is not
    /// idempotent, a protocol switch, a gRPC response already forwarded).
    NotRetryable,
    /// The request body went past [`MAX_RETRY_BODY_BYTES`]: it was sent once.
    BodyTooLarge,
}

impl RetryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOutcome::Sent => "sent",
            RetryOutcome::BudgetExhausted => "budget_exhausted",
            RetryOutcome::NotRetryable => "not_retryable",
            RetryOutcome::BodyTooLarge => "body_too_large",
        }
    }
}

sigil_base::label_value_as_str!(RetryOutcome);

/// A request body kept while it is sent, so that each attempt sends it whole: the first
/// attempt reads the client's body, later ones replay what was read and go on reading where the
/// earlier stopped. Only the newest attempt's body reads; an older one ends.
pub struct Replay {
    state: Arc<Mutex<ReplayState>>,
}

struct ReplayState {
    /// The client's body, not read yet (`None` once it ended).
    rest: Option<RequestBody>,
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    buffered: usize,
    limit: usize,
    /// Past the limit, or broken: not replayable.
    overflowed: bool,
    /// The attempt whose body reads now.
    generation: u64,
}

impl Replay {
    pub fn new(body: RequestBody) -> Replay {
        Replay::with_limit(body, MAX_RETRY_BODY_BYTES)
    }

    fn with_limit(body: RequestBody, limit: usize) -> Replay {
        let rest = (!body.is_end_stream()).then_some(body);
        Replay {
            state: Arc::new(Mutex::new(ReplayState {
                rest,
                chunks: Vec::new(),
                trailers: None,
                buffered: 0,
                limit,
                overflowed: false,
                generation: 0,
            })),
        }
    }

    /// Whether another attempt can send the body whole.
    pub fn replayable(&self) -> bool {
        self.state.lock().is_ok_and(|state| !state.overflowed)
    }

    /// The body of the next attempt (earlier attempts' bodies end); `None` if the body can no
    /// longer be sent whole.
    pub fn body(&self) -> Option<RequestBody> {
        let mut state = self.state.lock().ok()?;
        if state.overflowed {
            return None;
        }
        state.generation += 1;
        Some(
            ReplayBody {
                state: self.state.clone(),
                generation: state.generation,
                position: 0,
                trailers_sent: false,
            }
            .boxed_unsync(),
        )
    }
}

struct ReplayBody {
    state: Arc<Mutex<ReplayState>>,
    generation: u64,
    /// Chunks of `state.chunks` sent by this body.
    position: usize,
    trailers_sent: bool,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Ok(mut state) = this.state.lock() else {
            return Poll::Ready(None);
        };
        if state.generation != this.generation {
            // A newer attempt took over.
            return Poll::Ready(None);
        }
        if let Some(chunk) = state.chunks.get(this.position) {
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        let Some(rest) = state.rest.as_mut() else {
            if !this.trailers_sent
                && let Some(trailers) = state.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                state.rest = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                // What was read is not the whole body: never sent again.
                state.overflowed = true;
                state.rest = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !state.overflowed {
                        state.buffered += data.len();
                        if state.buffered > state.limit {
                            state.overflowed = true;
                            state.chunks = Vec::new();
                        } else {
                            state.chunks.push(data.clone());
                            this.position += 1;
                        }
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    state.trailers = Some(trailers.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state.lock().is_ok_and(|state| {
            state.generation == self.generation
                && state.rest.is_none()
                && self.position >= state.chunks.len()
                && (state.trailers.is_none() || self.trailers_sent)
        })
    }

    fn size_hint(&self) -> SizeHint {
        let Ok(state) = self.state.lock() else {
            return SizeHint::default();
        };
        let replayed: usize = state.chunks[self.position.min(state.chunks.len())..]
            .iter()
            .map(Bytes::len)
            .sum();
        match &state.rest {
            None => SizeHint::with_exact(replayed as u64),
            Some(rest) => {
                let hint = rest.size_hint();
                let mut sum = SizeHint::new();
                sum.set_lower(hint.lower() + replayed as u64);
                if let Some(upper) = hint.upper() {
                    sum.set_upper(upper + replayed as u64);
                }
                sum
            }
        }
    }
}

/// The retry budgets of this proxy, one per backend Service, made on first use.
#[derive(Default)]
pub struct RetryBudgets {
    by_service: Mutex<HashMap<ServiceRef, Arc<Budget>>>,
}

impl RetryBudgets {
    /// `service`'s budget, made anew (empty) if its policy changed.
    pub fn get(&self, service: &ServiceRef, policy: &RetryBudget) -> Arc<Budget> {
        let mut by_service = self.by_service.lock().unwrap_or_else(|e| e.into_inner());
        match by_service.get(service) {
            Some(budget) if budget.policy == *policy => budget.clone(),
            _ => {
                let budget = Arc::new(Budget::new(policy.clone()));
                by_service.insert(service.clone(), budget.clone());
                budget
            }
        }
    }
}

/// One backend Service's retry budget.
pub struct Budget {
    policy: RetryBudget,
    started: Instant,
    buckets: [Bucket; BUCKETS],
}

struct Bucket {
    /// Which slice of time since `started` this bucket counts (`u64::MAX`: none yet).
    epoch: AtomicU64,
    deposits: AtomicU64,
    withdrawals: AtomicU64,
}

impl Budget {
    pub fn new(policy: RetryBudget) -> Budget {
        Budget {
            policy,
            started: Instant::now(),
            buckets: std::array::from_fn(|_| Bucket {
                epoch: AtomicU64::new(u64::MAX),
                deposits: AtomicU64::new(0),
                withdrawals: AtomicU64::new(0),
            }),
        }
    }

    /// The bucket of now, emptied if it last counted an older slice, and the slice.
    fn current(&self) -> (u64, &Bucket) {
        let slice = (self.policy.interval.as_nanos() / BUCKETS as u128).max(1);
        let epoch = (self.started.elapsed().as_nanos() / slice) as u64;
        let bucket = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let seen = bucket.epoch.load(Ordering::Acquire);
        if seen != epoch
            && bucket
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            bucket.deposits.store(0, Ordering::Release);
            bucket.withdrawals.store(0, Ordering::Release);
        }
        (epoch, bucket)
    }

    /// An original request to the Service.
    pub fn deposit(&self) {
        self.current().1.deposits.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes room for one retry, if there is any.
    pub fn try_withdraw(&self) -> bool {
        let (epoch, bucket) = self.current();
        let (mut deposits, mut withdrawals) = (0u64, 0u64);
        for b in &self.buckets {
            let seen = b.epoch.load(Ordering::Acquire);
            if seen <= epoch && epoch - seen < BUCKETS as u64 {
                deposits += b.deposits.load(Ordering::Acquire);
                withdrawals += b.withdrawals.load(Ordering::Acquire);
            }
        }
        let policy = &self.policy;
        let floor = if policy.min_interval.is_zero() {
            0
        } else {
            (u128::from(policy.min_retries) * policy.interval.as_nanos()
                / policy.min_interval.as_nanos()) as u64
        };
        let allowed = deposits * u64::from(policy.percent) / 100 + floor;
        if withdrawals >= allowed {
            return false;
        }
        bucket.withdrawals.fetch_add(1, Ordering::AcqRel);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{Full, StreamBody};

    use super::*;

    fn budget(percent: u32, min_retries: u32) -> Budget {
        Budget::new(RetryBudget {
            percent,
            interval: Duration::from_secs(10),
            min_retries,
            min_interval: Duration::from_secs(1),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_allows_its_percentage_plus_the_floor_over_its_window() {
        // 20% of 100 requests, plus 3 per second over 10 s.
        let b = budget(20, 3);
        for _ in 0..100 {
            b.deposit();
        }
        let allowed = (0..200).take_while(|_| b.try_withdraw()).count();
        assert_eq!(allowed, 20 + 30);
        // Once the window slid past them, neither the requests nor the retries count.
        tokio::time::advance(Duration::from_secs(11)).await;
        let allowed = (0..200).take_while(|_| b.try_withdraw()).count();
        assert_eq!(allowed, 30);
        // No floor: retries only with requests.
        let b = budget(100, 0);
        assert!(!b.try_withdraw());
        b.deposit();
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
    }

    async fn read_all(body: RequestBody) -> (Vec<u8>, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    fn streamed(chunks: &[&'static [u8]], trailers: bool) -> RequestBody {
        let mut frames: Vec<Result<Frame<Bytes>, hyper::Error>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("x-t", "1".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
    }

    #[tokio::test]
    async fn a_body_is_replayed_whole_after_a_partial_read_and_not_past_its_limit() {
        let replay = Replay::with_limit(streamed(&[b"ab", b"cd", b"ef"], true), 6);
        // The first attempt reads one chunk and is abandoned.
        let mut first = replay.body().unwrap();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        let second = replay.body().unwrap();
        // The older body stops once a newer one exists.
        assert!(first.frame().await.is_none());
        let (bytes, trailers) = read_all(second).await;
        assert_eq!(bytes, b"abcdef");
        assert_eq!(trailers.unwrap()["x-t"], "1");
        assert!(replay.replayable());
        let (bytes, trailers) = read_all(replay.body().unwrap()).await;
        assert_eq!(bytes, b"abcdef");
        assert!(trailers.is_some());

        // Past the limit: sent whole once, never again.
        let replay = Replay::with_limit(streamed(&[b"abcd", b"efg"], false), 6);
        let (bytes, _) = read_all(replay.body().unwrap()).await;
        assert_eq!(bytes, b"abcdefg");
        assert!(!replay.replayable());
        assert!(replay.body().is_none());

        // An empty body ends at once.
        let replay = Replay::new(
            Full::new(Bytes::new())
                .map_err(|n| match n {})
                .boxed_unsync(),
        );
        assert!(replay.body().unwrap().is_end_stream());
    }
}
