//! The connection to Redis: one node (`ConnectionManager`, which reconnects on its own) or a
//! Cluster (replaced by a new one when every call has failed for a while), every call under a
//! timeout and a circuit breaker, failures counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use failsafe::StateMachine;
use failsafe::backoff::Constant;
use failsafe::failure_policy::ConsecutiveFailures;
use redis::Value;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;

use super::call::Call;

use super::wire::bad_reply;
use super::{RedisSettings, RedisTarget};
use crate::store::StoreError;

#[derive(Clone)]
pub enum Conn {
    Node(ConnectionManager),
    Cluster(Arc<Cluster>),
}

/// How long every call to a Cluster must have failed before the connection is replaced.
///
/// Why: the Cluster client repairs a lost node connection in the background, and a master
/// killed and restarted usually comes back through it within about 2 s of the restart (the
/// master's own 2 s before it takes writes again). But in about one run in ten of the restart
/// test, one replica's client kept failing every call to the restarted master's slots for more
/// than 8 s after Redis answered again (redis 1.8.1 and 1.8.2). A connection made anew from
/// the configured nodes reads the slots and connects afresh. While a master really is down a
/// new connection fails the same way, so it is tried at most once per this period.
pub const CLUSTER_REPLACE_AFTER: Duration = Duration::from_secs(2);

/// A Cluster connection that is replaced by a new one from `client` when every call has
/// failed for [`CLUSTER_REPLACE_AFTER`].
pub struct Cluster {
    current: ArcSwap<ClusterConnection>,
    client: redis::cluster::ClusterClient,
    /// Since when every call has failed, in ms after `epoch` plus one (0: the last call
    /// reached Redis). An atomic, not a lock: every call notes how it went.
    failing_since: AtomicU64,
    epoch: Instant,
    replacing: AtomicBool,
    /// Connections replaced, since start.
    pub replaced: AtomicU64,
}

impl Cluster {
    fn connection(&self) -> ClusterConnection {
        ClusterConnection::clone(&self.current.load())
    }

    /// Notes how a call went: a call that reached Redis ends a failing spell; a failure
    /// at the end of one [`CLUSTER_REPLACE_AFTER`] long starts a replacement in the
    /// background (one at a time; the spell then starts again).
    fn observe(self: &Arc<Self>, reached: bool) {
        if reached {
            // A load first: calls that go well write nothing shared.
            if self.failing_since.load(Ordering::Relaxed) != 0 {
                self.failing_since.store(0, Ordering::Relaxed);
            }
            return;
        }
        let now = u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        let started =
            match self
                .failing_since
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => now,
                Err(since) => since,
            };
        let after = u64::try_from(CLUSTER_REPLACE_AFTER.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(started) < after || self.replacing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.failing_since.store(now, Ordering::Relaxed);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.replacing.store(false, Ordering::Release);
            return;
        };
        let me = Arc::clone(self);
        runtime.spawn(async move {
            match tokio::time::timeout(CLUSTER_REPLACE_AFTER, me.client.get_async_connection())
                .await
            {
                Ok(Ok(conn)) => {
                    me.current.store(Arc::new(conn));
                    me.replaced.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "redis cluster: every call failed for {} ms; replaced the connection with a new one",
                        CLUSTER_REPLACE_AFTER.as_millis()
                    );
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "redis cluster: cannot make a new connection yet");
                }
                Err(_) => tracing::warn!("redis cluster: a new connection was not made in time"),
            }
            me.replacing.store(false, Ordering::Release);
        });
    }
}

/// How one call failed.
#[derive(Debug)]
pub enum Failure {
    /// Redis answered, but not as the script does: not the connection's fault.
    Reply(StoreError),
    /// Redis could not be reached, or did not answer in time.
    Transport(StoreError),
}

impl From<Failure> for StoreError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Reply(e) | Failure::Transport(e) => e,
        }
    }
}

impl Conn {
    /// Runs `invocation` once, within `timeout`; the reply's items.
    pub async fn invoke(
        &self,
        invocation: &Call<'_>,
        timeout: Duration,
    ) -> Result<Vec<Value>, Failure> {
        let reply = match self {
            Conn::Node(c) => {
                let mut c = c.clone();
                timed(invocation.run(&mut c), timeout).await
            }
            Conn::Cluster(cluster) => {
                let mut c = cluster.connection();
                let reply = timed(invocation.run(&mut c), timeout).await;
                cluster.observe(!matches!(reply, Err(Failure::Transport(_))));
                reply
            }
        };
        match reply? {
            Value::Array(items) => Ok(items),
            other => Err(Failure::Reply(bad_reply(
                &format!("{other:?}").chars().take(200).collect::<String>(),
            ))),
        }
    }

    /// Runs one plain command once, within `timeout`: for reads that must not run inside a
    /// script (a script holds Redis for its whole run).
    pub async fn command(&self, cmd: &redis::Cmd, timeout: Duration) -> Result<Value, Failure> {
        match self {
            Conn::Node(c) => {
                let mut c = c.clone();
                timed(cmd.query_async::<Value>(&mut c), timeout).await
            }
            Conn::Cluster(cluster) => {
                let mut c = cluster.connection();
                let reply = timed(cmd.query_async::<Value>(&mut c), timeout).await;
                cluster.observe(!matches!(reply, Err(Failure::Transport(_))));
                reply
            }
        }
    }

    /// Cluster connections replaced since start (0 on one node).
    pub fn replaced(&self) -> u64 {
        match self {
            Conn::Node(_) => 0,
            Conn::Cluster(c) => c.replaced.load(Ordering::Relaxed),
        }
    }
}

/// `call` within `timeout`, its failures as transport failures.
async fn timed(
    call: impl std::future::Future<Output = redis::RedisResult<Value>>,
    timeout: Duration,
) -> Result<Value, Failure> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::Transport(StoreError::Unavailable(format!(
            "redis: {e}"
        )))),
        Err(_) => Err(Failure::Transport(StoreError::Unavailable(format!(
            "redis: no answer within {} ms",
            timeout.as_millis()
        )))),
    }
}

/// Why the Redis store could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("redis storage: bad target `{target}`: {source}")]
    Target {
        target: String,
        source: redis::RedisError,
    },
    #[error("redis storage: cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: redis::RedisError,
    },
    #[error(
        "redis storage: `server.storage.urlEnv` names `{var}`, which is not set in the environment (or is not a redis:// or rediss:// URL)"
    )]
    Env { var: String },
}

type Breaker = StateMachine<ConsecutiveFailures<Constant>, ()>;

/// The connection with its breaker and its counts.
pub struct Link {
    pub conn: Conn,
    timeout: Duration,
    breaker: Breaker,
    breaker_failures: u32,
    breaker_open: Duration,
    pub failures: AtomicU64,
    pub rejected: AtomicU64,
}

/// The one node's URL, and how errors name it: a URL from the environment may carry a
/// password, so errors name the variable instead.
fn node_url(target: &RedisTarget) -> Result<(String, String), ConnectError> {
    match target {
        RedisTarget::NodeFromEnv(var) => std::env::var(var)
            .ok()
            .filter(|u| u.starts_with("redis://") || u.starts_with("rediss://"))
            .map(|u| (u, format!("the URL in ${var}")))
            .ok_or_else(|| ConnectError::Env { var: var.clone() }),
        RedisTarget::Node(url) => Ok((url.clone(), url.clone())),
        RedisTarget::Cluster(urls) => Ok((urls.join(","), urls.join(","))),
    }
}

impl Link {
    /// Connects (the first connection is made now, so a wrong address fails at start).
    pub async fn connect(settings: &RedisSettings) -> Result<Self, ConnectError> {
        let conn = match &settings.target {
            RedisTarget::Node(_) | RedisTarget::NodeFromEnv(_) => {
                let (url, shown) = node_url(&settings.target)?;
                let client =
                    redis::Client::open(url.as_str()).map_err(|e| ConnectError::Target {
                        target: shown.clone(),
                        source: e,
                    })?;
                // Reconnects on its own after a connection loss or a Redis restart; a call
                // made while it is down fails at once and the breaker counts it.
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(settings.timeout))
                    .set_response_timeout(Some(settings.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let manager = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(|e| ConnectError::Connect {
                        target: shown,
                        source: e,
                    })?;
                Conn::Node(manager)
            }
            RedisTarget::Cluster(urls) => {
                let target = urls.join(",");
                let client = redis::cluster::ClusterClientBuilder::new(urls.clone())
                    .connection_timeout(settings.timeout)
                    .response_timeout(settings.timeout)
                    .retries(2)
                    .min_retry_wait(5)
                    .max_retry_wait(50)
                    .build()
                    .map_err(|e| ConnectError::Target {
                        target: target.clone(),
                        source: e,
                    })?;
                let conn = client
                    .get_async_connection()
                    .await
                    .map_err(|e| ConnectError::Connect { target, source: e })?;
                Conn::Cluster(Arc::new(Cluster {
                    current: ArcSwap::from_pointee(conn),
                    client,
                    failing_since: AtomicU64::new(0),
                    epoch: Instant::now(),
                    replacing: AtomicBool::new(false),
                    replaced: AtomicU64::new(0),
                }))
            }
        };
        let breaker = failsafe::Config::new()
            .failure_policy(failsafe::failure_policy::consecutive_failures(
                settings.breaker_failures.max(1),
                failsafe::backoff::constant(settings.breaker_open),
            ))
            .build();
        Ok(Self {
            conn,
            timeout: settings.timeout,
            breaker,
            breaker_failures: settings.breaker_failures,
            breaker_open: settings.breaker_open,
            failures: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one plain command within the timeout, through the circuit breaker.
    pub async fn command(&self, cmd: &redis::Cmd) -> Result<Value, StoreError> {
        self.guarded(self.conn.command(cmd, self.timeout)).await
    }

    /// Runs one script call within the timeout, through the circuit breaker; the reply's
    /// items. Sets `sent` once the call has gone to Redis (so a failure after it may still
    /// have run there, late).
    pub async fn call(
        &self,
        invocation: &Call<'_>,
        sent: &AtomicBool,
    ) -> Result<Vec<Value>, StoreError> {
        self.guarded(async {
            sent.store(true, Ordering::Relaxed);
            self.conn.invoke(invocation, self.timeout).await
        })
        .await
    }

    /// Runs `call` unless the breaker is open (it is not started then), and tells the
    /// breaker how it went: a transport failure counts against it, a bad reply does not.
    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, Failure>>,
    ) -> Result<T, StoreError> {
        if !self.breaker.is_call_permitted() {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Unavailable(format!(
                "redis: circuit breaker open after {} consecutive failed calls; calls are tried again after {} ms",
                self.breaker_failures,
                self.breaker_open.as_millis()
            )));
        }
        match call.await {
            Ok(v) => {
                self.breaker.on_success();
                Ok(v)
            }
            Err(Failure::Reply(e)) => Err(e),
            Err(Failure::Transport(e)) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.breaker.on_error();
                Err(e)
            }
        }
    }
}
