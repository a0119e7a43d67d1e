//! `tollgate serve`: binds the ext_authz, gRPC and HTTP listeners, runs the hold-expiry sweep
//! and config reload (SIGHUP or a change to the file), and drains in-flight calls on SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::transport::Server;
use tracing_subscriber::EnvFilter;

use crate::net::{Bound, ConnectionBudget, Timeouts, incoming};

use crate::clock::SystemClock;
use crate::config::server::{ListenAddr, LogFormat, ServerSettings, Storage};
use crate::config::{self, ConfigErrors, Loaded};
use crate::engine::Engine;
use crate::grpc::access_log::{AccessLogServiceServer, AccessLogSettlement};
use crate::grpc::{ExtAuthzService, TollgateServer, TollgateService};
use crate::service::Service;
use crate::store::{CounterStore, DurableStore, MemoryStore};

/// How often holds past their TTL are committed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// File-change events closer together than this make one reload (editors write in steps).
const RELOAD_SETTLE: Duration = Duration::from_millis(250);
/// How often the config file is compared when no file event arrives.
const RELOAD_POLL: Duration = Duration::from_secs(5);

/// Starts `tracing` as the config says; `RUST_LOG` overrides the level.
pub fn init_tracing(settings: &ServerSettings) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(settings.log_level.as_str()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second initialisation (tests running several servers in one process) is harmless.
    let _ = match settings.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// Binds `addr`.
async fn bind(addr: &ListenAddr, what: &str) -> anyhow::Result<(Bound, ListenAddr)> {
    match addr {
        ListenAddr::Tcp(a) => {
            let l = TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen for {what} on {a}"))?;
            let local = l.local_addr()?;
            Ok((Bound::Tcp(l), ListenAddr::Tcp(local)))
        }
        ListenAddr::Unix(p) => {
            // A socket file left by a previous run would make bind fail.
            if p.exists() {
                std::fs::remove_file(p).with_context(|| {
                    format!("cannot remove the stale socket {} for {what}", p.display())
                })?;
            }
            let l = UnixListener::bind(p)
                .with_context(|| format!("cannot listen for {what} on {}", p.display()))?;
            Ok((Bound::Unix(l), addr.clone()))
        }
    }
}

async fn serve_grpc(
    router: tonic::transport::server::Router,
    incoming: impl futures_util::Stream<Item = std::io::Result<crate::net::Guarded>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let signal = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    router.serve_with_incoming_shutdown(incoming, signal).await
}

/// A gRPC server with the settings every gRPC listener shares: server pings every 30 s, so
/// that a live but quiet peer (a watcher waiting for events) is never idle, and a dead one is
/// found.
fn grpc_builder() -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

/// Opens the store `storage` names: the durable file (reporting what it holds), or a
/// connection to Redis (the first connection made now, so a wrong address fails at start).
pub async fn open_store(storage: &Storage) -> anyhow::Result<Arc<dyn CounterStore>> {
    Ok(match storage {
        Storage::Memory => Arc::new(MemoryStore::new()),
        Storage::Durable { path, durability } => {
            let started = std::time::Instant::now();
            let store = DurableStore::open(path, *durability)?;
            let stats = store.stats();
            tracing::info!(
                file = %path.display(),
                ?durability,
                customers = stats.customers,
                counters = stats.counters,
                holds_open = stats.holds_open,
                millis = started.elapsed().as_millis() as u64,
                "durable store opened"
            );
            Arc::new(store)
        }
        Storage::Redis(settings) => {
            let store = crate::store::RedisStore::connect(
                settings.clone(),
                crate::core::ledger::KeyRetention::default(),
            )
            .await?;
            tracing::info!(target = ?settings.target, prefix = %settings.prefix, "redis store connected");
            Arc::new(store)
        }
    })
}

/// Builds the engine and service for a loaded config.
pub async fn build_service(loaded: Loaded) -> anyhow::Result<Arc<Service>> {
    build_service_with_clock(loaded, Arc::new(SystemClock)).await
}

/// As [`build_service`], reading the time from `clock` (tests pin the time of day with it).
pub async fn build_service_with_clock(
    loaded: Loaded,
    clock: Arc<dyn crate::clock::Clock>,
) -> anyhow::Result<Arc<Service>> {
    let Loaded { doc, model, server } = loaded;
    for w in model.skippable_limits() {
        tracing::warn!("{w}");
    }
    let mut store = open_store(&server.storage).await?;
    let leases = server.leases.map(|terms| {
        tracing::info!(?terms, "escrow leases on");
        crate::store::LeasedStore::new(Arc::clone(&store), terms, Arc::clone(&clock))
    });
    if let Some(l) = &leases {
        store = Arc::new(l.clone());
    }
    let engine = Engine::new(model, store, clock)
        .await
        .context("cannot seed the store with the config's grants")?;
    let service = Arc::new(Service::new(engine, doc, &server).with_leases(leases));
    // Admin changes kept by the store (from before a restart, or made on another replica
    // sharing it) go back on the file.
    let restored = service
        .restore_admin_changes()
        .await
        .context("cannot restore the admin changes the store kept")?;
    if restored > 0 {
        tracing::info!(kept = restored, "stored admin changes restored");
    }
    Ok(service)
}

/// How many tokio worker threads the sidecar runs, and what set the number (for the log).
#[derive(Debug, Clone, Copy)]
pub struct Workers {
    pub threads: usize,
    pub from: &'static str,
}

/// Runs the sidecar until SIGTERM or SIGINT, then drains.
pub async fn run(config_path: PathBuf, workers: Workers) -> anyhow::Result<()> {
    let text = config::read_path(&config_path).map_err(config_error)?;
    let loaded = config::load(&text, &config_path.display().to_string()).map_err(config_error)?;
    init_tracing(&loaded.server);
    tracing::info!(
        workers = workers.threads,
        from = workers.from,
        "tokio workers"
    );
    let settings = loaded.server.clone();
    let service = build_service(loaded).await?;

    let (ext_bound, ext_addr) = bind(&settings.ext_authz_listen, "ext_authz").await?;
    let (grpc_bound, grpc_addr) = bind(&settings.grpc_listen, "gRPC").await?;
    let (http_bound, http_addr) = bind(&settings.http_listen, "HTTP").await?;
    let budget = ConnectionBudget::from_limits(&settings.connections);
    tracing::info!(
        ext_authz = budget.ext_authz,
        grpc = budget.grpc,
        http = budget.http,
        "connection limits"
    );
    let events: Arc<dyn crate::net::ConnectionEvents> = Arc::new(service.connection_events());
    let c = &settings.connections;
    let grpc_timeouts = Timeouts {
        idle: c.idle_timeout,
        auth: Some(c.auth_timeout),
    };
    let max_message = settings.limits.max_grpc_message_bytes;
    for w in settings.warnings() {
        tracing::warn!("{w}");
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AuthorizationServer<ExtAuthzService>>()
        .await;
    health
        .set_serving::<TollgateServer<TollgateService>>()
        .await;

    let mut servers = JoinSet::new();
    let ext_router = grpc_builder()
        .add_service(health_service.clone())
        .add_service(
            AuthorizationServer::new(ExtAuthzService::new(Arc::clone(&service)))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            TollgateServer::new(TollgateService::ext_authz(
                Arc::clone(&service),
                shutdown_rx.clone(),
            ))
            .max_decoding_message_size(max_message),
        )
        .add_service(
            AccessLogServiceServer::new(AccessLogSettlement::new(
                Arc::clone(&service),
                shutdown_rx.clone(),
            ))
            .max_decoding_message_size(max_message),
        );
    let mut spawn_grpc = |router: tonic::transport::server::Router,
                          bound: Bound,
                          listener: &'static str,
                          max: usize| {
        let incoming = incoming(bound, listener, max, grpc_timeouts, Arc::clone(&events));
        let rx = shutdown_rx.clone();
        servers.spawn(async move {
            serve_grpc(router, incoming, rx)
                .await
                .with_context(|| format!("{listener} server"))
        });
    };
    spawn_grpc(ext_router, ext_bound, "ext_authz", budget.ext_authz);
    let grpc_router = grpc_builder().add_service(health_service).add_service(
        TollgateServer::new(TollgateService::new(
            Arc::clone(&service),
            shutdown_rx.clone(),
        ))
        .max_decoding_message_size(max_message),
    );
    spawn_grpc(grpc_router, grpc_bound, "grpc", budget.grpc);
    let http_router = crate::http::router(Arc::clone(&service), settings.max_body_bytes);
    let http_incoming = incoming(
        http_bound,
        "http",
        budget.http,
        Timeouts {
            idle: c.idle_timeout,
            auth: None,
        },
        Arc::clone(&events),
    );
    servers.spawn({
        let rx = shutdown_rx.clone();
        let connections = settings.connections.clone();
        async move {
            crate::net::serve_http(http_router, http_incoming, &connections, rx).await;
            Ok(())
        }
    });

    let sweeper = tokio::spawn(sweep(Arc::clone(&service), shutdown_rx.clone()));
    let deliverer = tokio::spawn(deliver(Arc::clone(&service), shutdown_rx.clone()));
    // Set up before "ready": a SIGHUP or an edit right after start must not be lost (or,
    // for SIGHUP, kill the process with the default action).
    let reloader = Reloader::new(
        Arc::clone(&service),
        config_path.clone(),
        text,
        settings.clone(),
    )?;
    let reloader = tokio::spawn(reloader.run(shutdown_rx.clone()));

    tracing::info!(ext_authz = %ext_addr, grpc = %grpc_addr, http = %http_addr, config = %config_path.display(), "tollgate serving");
    // One machine-readable line on stdout, for scripts and tests that bind port 0.
    println!("tollgate ready ext_authz={ext_addr} grpc={grpc_addr} http={http_addr}");

    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let early_exit = tokio::select! {
        _ = term.recv() => None,
        _ = int.recv() => None,
        r = servers.join_next() => r,
    };
    if let Some(r) = early_exit {
        let _ = shutdown_tx.send(true);
        return match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("a listener stopped unexpectedly")),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow::anyhow!("a listener task failed: {e}")),
        };
    }
    tracing::info!("shutting down: refusing new connections, draining in-flight calls");
    health
        .set_not_serving::<AuthorizationServer<ExtAuthzService>>()
        .await;
    let _ = shutdown_tx.send(true);
    service.stop();
    let grace = Duration::from_millis(u64::try_from(settings.shutdown_grace_millis).unwrap_or(0));
    let drained = tokio::time::timeout(grace, async {
        while let Some(r) = servers.join_next().await {
            match r {
                Ok(Err(e)) => tracing::warn!(error = %e, "listener ended with an error"),
                Err(e) => tracing::warn!(error = %e, "listener task failed"),
                Ok(Ok(())) => {}
            }
        }
    })
    .await;
    sweeper.abort();
    deliverer.abort();
    reloader.abort();
    if let Err(e) = service.return_leases().await {
        tracing::warn!(error = %e, "leases not returned; the store commits them at their TTL");
    }
    // Whatever the durability mode, a clean stop loses nothing.
    if let Err(e) = service.flush() {
        tracing::error!(error = %e, "could not store the last changes");
    }
    match drained {
        Ok(()) => tracing::info!("drained; bye"),
        Err(_) => tracing::warn!(
            ?grace,
            "calls still in flight after the shutdown grace; exiting anyway"
        ),
    }
    for addr in [&ext_addr, &grpc_addr, &http_addr] {
        if let ListenAddr::Unix(p) = addr {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(())
}

/// Config errors as one `anyhow` error listing every problem.
pub fn config_error(errors: ConfigErrors) -> anyhow::Error {
    anyhow::anyhow!("{errors}\n{} problem(s) in the config", errors.0.len())
}

/// Every second: commits holds past their TTL, and follows admin changes other replicas save.
async fn sweep(service: Arc<Service>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        match service.expire_due().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(expired = n, "holds past their TTL committed"),
            Err(e) => tracing::warn!(error = %e, "hold expiry sweep failed"),
        }
        // A store shared by replicas: take in admin changes another replica saved.
        match service.follow_admin_changes().await {
            Ok(false) => {}
            Ok(true) => tracing::info!("admin changes saved by another replica are in force"),
            Err(e) => tracing::warn!(error = %e, "cannot take in the shared admin changes"),
        }
    }
}

/// Four times a second: sends the webhook deliveries due; every minute, the alerts that read
/// recent usage (projected exhaustion, denial bursts). Apart from the sweep, so a slow
/// receiver never delays hold expiry.
async fn deliver(service: Arc<Service>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut minute = tokio::time::interval(Duration::from_secs(60));
    minute.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
            _ = minute.tick() => {
                match service.alerts_pass().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(fired = n, "projection and denial-burst alerts fired"),
                    Err(e) => tracing::warn!(error = %e, "projection and denial-burst pass failed"),
                }
                continue;
            }
        }
        service.deliver_due();
    }
}

/// Reloads the config on SIGHUP or when the file changes.
struct Reloader {
    service: Arc<Service>,
    path: PathBuf,
    /// The text in force, so that events that do not change the file do nothing.
    last: String,
    running: ServerSettings,
    hup: tokio::signal::unix::Signal,
    changed: mpsc::Receiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Reloader {
    fn new(
        service: Arc<Service>,
        path: PathBuf,
        text: String,
        running: ServerSettings,
    ) -> anyhow::Result<Self> {
        let hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
        let (tx, changed) = mpsc::channel::<()>(1);
        let watcher = match watch_file(&path, tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, file = %path.display(), "cannot watch the config file; it is polled every {}s, or reload with SIGHUP", RELOAD_POLL.as_secs());
                None
            }
        };
        Ok(Self {
            service,
            path,
            last: text,
            running,
            hup,
            changed,
            _watcher: watcher,
        })
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        // File events can be missing (network and some overlay filesystems, an exhausted
        // inotify limit), so the file is also compared on a slow timer.
        let mut poll = tokio::time::interval(RELOAD_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            let forced = tokio::select! {
                _ = shutdown.changed() => return,
                _ = self.hup.recv() => true,
                Some(()) = self.changed.recv() => {
                    // Let a burst of writes finish before reading.
                    tokio::time::sleep(RELOAD_SETTLE).await;
                    while self.changed.try_recv().is_ok() {}
                    false
                }
                _ = poll.tick() => false,
            };
            let text = match config::read_path(&self.path) {
                Ok(t) => t,
                Err(errors) => {
                    reject(&self.service, &errors);
                    continue;
                }
            };
            if !forced && text == self.last {
                continue;
            }
            self.last.clone_from(&text);
            reload_text(&self.service, &self.path, &text, &self.running).await;
        }
    }
}

fn reject(service: &Service, errors: &ConfigErrors) {
    service.reload_counted("rejected");
    for e in &errors.0 {
        tracing::error!(problem = %e, "config reload rejected; the running config stays");
    }
}

/// Objects held by admin changes a reload names one by one; past this, only how many more.
const MAX_KEPT_LOGGED: usize = 20;

/// Validates the config `text` read from `path` and, only if it is valid, puts it in force.
/// Returns whether it did.
async fn reload_text(service: &Service, path: &Path, text: &str, running: &ServerSettings) -> bool {
    let loaded = match config::load(text, &path.display().to_string()) {
        Ok(l) => l,
        Err(errors) => {
            reject(service, &errors);
            return false;
        }
    };
    let s = &loaded.server;
    if s.ext_authz_listen != running.ext_authz_listen
        || s.grpc_listen != running.grpc_listen
        || s.http_listen != running.http_listen
    {
        tracing::warn!("listener addresses changed in the config; they take effect on restart");
    }
    match service.reload(loaded).await {
        Ok(r) => {
            for d in r.dropped {
                tracing::warn!("{d}");
            }
            service.reload_counted("applied");
            tracing::info!(
                file = %path.display(),
                admin_changes_kept = r.kept.len(),
                "config reloaded"
            );
            for o in &r.shadowed {
                tracing::warn!("the file's edit does not apply: {o}");
            }
            // Every hold over the file, named (a bounded number of lines).
            for o in r.kept.iter().take(MAX_KEPT_LOGGED) {
                tracing::info!("kept over the file: {o}");
            }
            if r.kept.len() > MAX_KEPT_LOGGED {
                tracing::info!(
                    "and {} more objects held by admin changes (GET /v1/customers/<id>/overrides)",
                    r.kept.len() - MAX_KEPT_LOGGED
                );
            }
            true
        }
        Err(e) => {
            service.reload_counted("rejected");
            tracing::error!(error = %e, "config reload rejected; the running config stays");
            false
        }
    }
}

fn watch_file(path: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let name = path.file_name().map(ToOwned::to_owned);
    // Watch the directory: editors and config management replace the file by renaming.
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && event.paths.iter().any(|p| p.file_name() == name.as_deref())
        {
            // A full channel already holds a pending reload.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
