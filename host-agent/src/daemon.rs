//! `flowshard agent`: start the agent, serve the API, stop on SIGTERM or SIGINT.
//!
//! [`run`] is the whole daemon with its listener and shutdown signal passed in, so tests
//! run it as `main` does. Stopping asks the loop to finish its tick and the API to
//! finish its requests, within `shutdown_timeout_ms`; the NIC is left steering with its
//! last committed tables.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::registry::Registry;

use crate::Error;
use crate::agent::{Agent, Backend, Request, View};
use crate::agent_config::{AgentConfig, LogFormat};
use crate::api::{Api, router};
use crate::metrics::LoopMetrics;
use crate::node_metrics::scrape_loop;

/// Send logs to stderr, human-readable or as JSON lines.
pub fn init_tracing(format: LogFormat) {
    let b = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO);
    // A second call (tests running several agents) keeps the first subscriber.
    let _ = match format {
        LogFormat::Human => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

fn joined(e: tokio::task::JoinError) -> Error {
    Error::Agent(format!("agent task failed: {e}"))
}

/// Run the agent until `shutdown` completes or the loop fails.
pub async fn run(
    cfg: AgentConfig,
    backend: Backend,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let view = Arc::new(RwLock::new(View::default()));
    let mut registry = Registry::default();
    let metrics = LoopMetrics::register(&mut registry, view.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let (c, v) = (cfg.clone(), view.clone());
    let agent = tokio::task::spawn_blocking(move || Agent::start(&c, backend, v, metrics))
        .await
        .map_err(joined)??;
    let mut control = tokio::task::spawn_blocking(move || agent.run(rx));
    let (stop_scrapes, scrapes_stop) = tokio::sync::watch::channel(false);
    let every = Duration::from_millis(cfg.node_scrape_ms);
    let scrapers: Vec<_> = cfg
        .nodes
        .iter()
        .filter_map(|n| Some((n.id, n.metrics_url.clone()?)))
        .map(|(id, url)| {
            let s = scrape_loop(id, url, every, tx.clone(), scrapes_stop.clone());
            tokio::spawn(s)
        })
        .collect();
    let api = Api {
        view,
        requests: tx.clone(),
        token: cfg.token.clone(),
        registry: Arc::new(registry),
    };
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let addr = listener.local_addr().map_err(|source| Error::Io {
        what: "listening socket".into(),
        source,
    })?;
    let server = tokio::spawn(
        axum::serve(listener, router(api))
            .with_graceful_shutdown(async {
                let _ = api_stopped.await;
            })
            .into_future(),
    );
    tracing::info!(%addr, "agent running; API and /metrics served");
    let early = tokio::select! {
        () = shutdown => None,
        r = &mut control => Some(r),
    };
    // Scrapers end at the next tick or when their scrape returns (at most one period).
    let _ = stop_scrapes.send(true);
    if let Some(r) = early {
        let _ = stop_api.send(());
        let _ = server.await;
        r.map_err(joined)??;
        return Err(Error::Agent("the control loop stopped by itself".into()));
    }
    tracing::info!(timeout_ms = cfg.shutdown_timeout_ms, "shutting down");
    // The loop may already be gone (it then reported why); stopping is what matters.
    let _ = tx.send((Request::Stop, None));
    let _ = stop_api.send(());
    let drained = tokio::time::timeout(Duration::from_millis(cfg.shutdown_timeout_ms), async {
        let c = control.await;
        let s = server.await;
        for t in scrapers {
            // A scraper has no result; one that panicked already lost its node's load.
            let _ = t.await;
        }
        (c, s)
    })
    .await;
    match drained {
        Err(_) => Err(Error::Agent(format!(
            "tasks did not finish within shutdown_timeout_ms ({} ms); the NIC keeps its committed tables",
            cfg.shutdown_timeout_ms
        ))),
        Ok((c, s)) => {
            c.map_err(joined)??;
            s.map_err(joined)?.map_err(|source| Error::Io {
                what: format!("serve {addr}"),
                source,
            })?;
            tracing::info!("stopped; the NIC keeps steering with its committed tables");
            Ok(())
        }
    }
}

/// Resolves at SIGTERM or SIGINT.
pub async fn signalled() -> Result<(), Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let io = |source| Error::Io {
        what: "install signal handler".into(),
        source,
    };
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    Ok(())
}

/// `flowshard agent`: the daemon on a single-threaded runtime (the loop has a thread
/// of its own for device I/O).
pub fn main(cfg: AgentConfig) -> Result<(), Error> {
    init_tracing(cfg.log_format);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            what: "start the runtime".into(),
            source,
        })?;
    rt.block_on(async {
        let backend = Backend::from_config(&cfg)?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| Error::Io {
                what: format!(
                    "listen on {} (`listen` in the config, or --listen)",
                    cfg.listen
                ),
                source,
            })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let r = signalled().await;
            let _ = tx.send(r);
        });
        let mut failed = None;
        run(cfg, backend, listener, async {
            if let Ok(Err(e)) = rx.await {
                failed = Some(e);
            }
        })
        .await?;
        failed.map_or(Ok(()), Err)
    })
}
