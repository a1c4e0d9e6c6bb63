//! The `tollgate` command: run the gateway, or check a config file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use pingora_core::listeners::ListenerConfig;
use pingora_core::protocols::l4::stream::L4BufferSettings;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;

use tollgate::admin::AdminApp;
use tollgate::config::ConfigError;
use tollgate::edge::Edge;
use tollgate::gateway::{build, ConfigWatcher, Gateway};
use tollgate::proxy::Proxy;
use tollgate::upstream::HealthChecker;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Edge gateway on Pingora")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The gateway config file.
    #[arg(
        short = 'c',
        long = "conf",
        global = true,
        default_value = "conf/tollgate.yaml"
    )]
    conf: PathBuf,
    /// Take over the listening sockets of a running tollgate (binary upgrade).
    #[arg(short = 'u', long)]
    upgrade: bool,
    /// Run in the background.
    #[arg(short = 'd', long)]
    daemon: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config file (and everything it compiles to) without starting.
    Check,
    /// Replace the running tollgate with this binary through the socket handoff: checks the
    /// config first, starts this binary with --upgrade, hands the sockets over with SIGQUIT,
    /// and waits until the new process answers. The old process drains.
    Upgrade {
        /// How long the new process may take to answer after the handoff.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        ready_timeout: std::time::Duration,
        /// Append the new process's stdout and stderr to this file (default: inherit this
        /// command's, which under systemd is the journal).
        #[arg(long)]
        log: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Some(Command::Check) => check(&cli.conf),
        Some(Command::Upgrade { ready_timeout, log }) => {
            tollgate::lifecycle::upgrade::run(&cli.conf, ready_timeout, log.as_deref())
        }
        None => run(&cli),
    }
}

fn print_errors(errors: &[ConfigError]) {
    for e in errors {
        eprintln!("{e}");
    }
    eprintln!(
        "{} error{} found",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
}

/// `tollgate check`: everything a reload would do, short of swapping the snapshot.
fn check(path: &Path) -> ExitCode {
    let metrics = tollgate::observe::Metrics::new();
    match build(path, &tollgate::gateway::Registries::default(), &metrics, 1) {
        Ok((loaded, snap)) => {
            println!(
                "{}: ok ({} routes, {} upstreams, {} listeners)",
                path.display(),
                snap.router.routes().len(),
                snap.upstreams.len(),
                loaded.config.listeners.len()
            );
            if let Some(waf) = &snap.waf {
                let rs = &waf.ruleset;
                println!(
                    "waf: {} rules from {} files, {} not run",
                    rs.rules.len(),
                    rs.files.len(),
                    rs.unsupported.len()
                );
                for u in &rs.unsupported {
                    println!("waf: {u}");
                }
                for n in &rs.notes {
                    println!("waf: note: {n}");
                }
            }
            report_restart_only_changes(&loaded.config);
            ExitCode::SUCCESS
        }
        Err(errors) => {
            print_errors(&errors);
            ExitCode::FAILURE
        }
    }
}

/// When a tollgate answers on the file's admin address, says which changed settings it cannot
/// apply by reload (they wait for `tollgate upgrade`).
fn report_restart_only_changes(config: &tollgate::config::Config) {
    let Ok(admin) = config.admin.address.parse() else {
        return;
    };
    let running = tollgate::lifecycle::upgrade::fetch_status(admin).and_then(|s| {
        serde_json::from_value::<tollgate::config::Bound>(s.get("bound")?.clone()).ok()
    });
    let Some(running) = running else {
        return;
    };
    for change in running.changes(&tollgate::config::Bound::of(config)) {
        println!("note: compared with the tollgate running on {admin}: {change}");
    }
}

/// Downstream HTTP/2 settings from `server.h2`.
fn h2_options(
    limits: &tollgate::config::H2Limits,
) -> pingora_core::protocols::http::v2::server::H2Options {
    let clamp = |b: tollgate::config::units::ByteSize| b.get().min(u32::MAX as u64) as u32;
    let mut o = pingora_core::protocols::http::v2::server::default_h2_options();
    o.max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(clamp(limits.max_header_list))
        .initial_window_size(clamp(limits.stream_window).min((1 << 31) - 1))
        .initial_connection_window_size(clamp(limits.connection_window).min((1 << 31) - 1));
    o
}

fn run(cli: &Cli) -> ExitCode {
    let gateway = match Gateway::start(&cli.conf) {
        Ok(g) => g,
        Err(errors) => {
            print_errors(&errors);
            return ExitCode::FAILURE;
        }
    };

    let cfg = gateway.boot_config().clone();
    let mut conf = ServerConf {
        threads: cfg.server.threads,
        work_stealing: cfg.server.work_stealing,
        upstream_keepalive_pool_size: cfg.server.upstream_keepalive_pool_size,
        // The drainer (lifecycle::drain) exits the process when the drain is done or its
        // deadline passes; Pingora's unconditional grace sleep is only a backstop.
        grace_period_seconds: Some(30 * 24 * 3600),
        graceful_shutdown_timeout_seconds: Some(5),
        pid_file: cfg.server.pid_file.clone(),
        upgrade_sock: cfg.server.upgrade_sock.clone(),
        daemon: cli.daemon,
        ..ServerConf::default()
    };
    conf.max_retries = 16;
    let opt = Opt {
        upgrade: cli.upgrade,
        daemon: cli.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut proxy = pingora_proxy::http_proxy(
        &server.configuration,
        Proxy {
            gateway: gateway.clone(),
        },
    );
    // The edge hands Pingora only HTTP/2 connections through this path (ALPN h2, or the h2c
    // preface on listeners that allow it), so h2c here never catches an HTTP/1 client.
    let mut options = pingora_core::apps::HttpServerOptions::default();
    options.h2c = true;
    options.h2_idle_timeout = Some(cfg.server.h2.idle_timeout.get());
    proxy.server_options = Some(options);
    proxy.h2_options = Some(h2_options(&cfg.server.h2));
    let proxy = Arc::new(proxy);
    let mut edge = Service::new(
        "tollgate".to_string(),
        Edge {
            proxy,
            gateway: gateway.clone(),
        },
    );
    for l in &cfg.listeners {
        let buffers = L4BufferSettings::default().read(cfg.server.read_buffer.get() as usize);
        edge.add_listener(ListenerConfig::tcp(l.address.as_str()).l4_buffer(buffers));
    }
    edge.threads = Some(cfg.server.threads);

    let mut admin = Service::new(
        "admin".to_string(),
        pingora_core::apps::http_app::HttpServer::new_app(AdminApp {
            gateway: gateway.clone(),
        }),
    );
    admin.add_tcp(&cfg.admin.address);
    admin.threads = Some(1);

    let watcher = background_service(
        "config watcher",
        ConfigWatcher {
            gateway: gateway.clone(),
            binary: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("tollgate")),
        },
    );
    let drainer = background_service(
        "drain",
        tollgate::lifecycle::drain::Drainer {
            gateway: gateway.clone(),
            pid_file: cfg.server.pid_file.clone().into(),
        },
    );
    let source = gateway.clone();
    let health = background_service(
        "health checks",
        HealthChecker::new(Arc::new(move || source.current().upstreams.clone())),
    );

    let jwks = background_service(
        "jwks fetch",
        tollgate::policy::auth::jwks::JwksFetcher {
            registry: gateway.registries.jwks.clone(),
        },
    );

    server.add_service(edge);
    server.add_service(admin);
    server.add_service(watcher);
    server.add_service(health);
    server.add_service(jwks);
    server.add_service(background_service(
        "quota sweep",
        tollgate::policy::quota::QuotaSweeper {
            state: gateway.registries.quotas.clone(),
        },
    ));
    server.add_service(drainer);
    tracing::info!(
        config = %cli.conf.display(),
        listeners = ?cfg.listeners.iter().map(|l| l.address.as_str()).collect::<Vec<_>>(),
        admin = %cfg.admin.address,
        "tollgate starting"
    );
    server.run_forever()
}
