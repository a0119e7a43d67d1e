//! Benchmark only: the published `limitador` engine (Kuadrant's rate limiter) behind Envoy's
//! rate-limit service API (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), with
//! its in-memory, Redis and cached-Redis (`redis_cached`) storages, so that
//! `bench/vs-limitador.sh` measures it beside Tollgate with the same load generator, on the same
//! machine, in one run.
//!
//! The limits mirror the Tollgate bench config: three levels (organization, team, user), each a
//! fixed-window counter large enough never to deny, keyed by the request's one descriptor's
//! `customer`, `team` and `user` entries, as Limitador's own server binds descriptors to CEL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use limitador::limit::{Context, Expression, Limit, Namespace};
use limitador::storage::redis::{AsyncRedisStorage, CachedRedisStorageBuilder};
use limitador::{AsyncRateLimiter, RateLimiter};
use tonic::{Request, Response, Status};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Storage {
    Memory,
    /// `AsyncRedisStorage`: every decision is a Redis round trip.
    Redis,
    /// `CachedRedisStorage` with the library's defaults (as Limitador's server starts it): local
    /// counters flushed to Redis in batches, so replicas may overshoot a limit between flushes.
    RedisCached,
}

#[derive(Parser, Debug)]
struct Args {
    /// Where to listen (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long, value_enum, default_value = "memory")]
    storage: Storage,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Counters the in-memory storage caches.
    #[arg(long, default_value_t = 1_000_000)]
    cache: u64,
    /// Redis for `--storage redis` and `redis-cached` (loopback only).
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
}

enum Limiter {
    Blocking(RateLimiter),
    Async(AsyncRateLimiter),
}

struct Service {
    limiter: Limiter,
}

const NAMESPACE: &str = "bench";

fn limits() -> anyhow::Result<Vec<Limit>> {
    let var = |name: &str| {
        Expression::parse(format!("descriptors[0].{name}"))
            .map_err(|e| anyhow::anyhow!("limit variable `{name}`: {e:?}"))
    };
    Ok(vec![
        Limit::new(NAMESPACE, 4_000_000_000, 86_400, [], [var("customer")?]),
        Limit::new(
            NAMESPACE,
            4_000_000_000,
            86_400,
            [],
            [var("customer")?, var("team")?],
        ),
        Limit::new(
            NAMESPACE,
            1_000_000_000,
            86_400,
            [],
            [var("customer")?, var("team")?, var("user")?],
        ),
    ])
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let req = request.into_inner();
        let namespace = Namespace::from(req.domain.as_str());
        let descriptors: Vec<HashMap<String, String>> = req
            .descriptors
            .iter()
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.clone()))
                    .collect()
            })
            .collect();
        let mut ctx = Context::default();
        ctx.list_binding("descriptors".into(), descriptors);
        let delta = u64::from(req.hits_addend.max(1));
        let result = match &self.limiter {
            Limiter::Blocking(l) => l.check_rate_limited_and_update(&namespace, &ctx, delta),
            Limiter::Async(l) => {
                l.check_rate_limited_and_update(&namespace, &ctx, delta)
                    .await
            }
        }
        .map_err(|e| Status::unavailable(format!("limitador: {e}")))?;
        let code = if result.limited {
            Code::OverLimit
        } else {
            Code::Ok
        };
        Ok(Response::new(RateLimitResponse {
            overall_code: code as i32,
            ..RateLimitResponse::default()
        }))
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let redis = || -> anyhow::Result<&str> {
        let url = args.redis_url.as_str();
        anyhow::ensure!(
            url.starts_with("redis://127.0.0.1:") || url.starts_with("redis://[::1]:"),
            "Redis on loopback only, not {url}"
        );
        Ok(url)
    };
    let limiter = match args.storage {
        Storage::Memory => Limiter::Blocking(RateLimiter::new(args.cache)),
        Storage::Redis => Limiter::Async(AsyncRateLimiter::new_with_storage(Box::new(
            AsyncRedisStorage::new(redis()?)
                .await
                .with_context(|| format!("Redis at {}", args.redis_url))?,
        ))),
        Storage::RedisCached => Limiter::Async(AsyncRateLimiter::new_with_storage(Box::new(
            CachedRedisStorageBuilder::new(redis()?)
                .build()
                .await
                .with_context(|| format!("Redis at {}", args.redis_url))?,
        ))),
    };
    for limit in limits()? {
        match &limiter {
            Limiter::Blocking(l) => l.add_limit(limit),
            Limiter::Async(l) => l.add_limit(limit),
        };
    }
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "listen on loopback only, not {}",
        args.listen
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("ready rls={addr}");
    let service = Arc::new(Service { limiter });
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::from_arc(service))
        .serve_with_incoming_shutdown(tokio_stream_listener(listener), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()?
        .block_on(serve(args))
}
