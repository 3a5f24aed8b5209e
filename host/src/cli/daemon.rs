//! `spendguard init`, `spendguard serve` and `spendguard token new
//! --data-dir`: the commands that work on a data directory directly.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;
use spendguard::config::ServeConfig;
use spendguard::datadir::{self, DEFAULT_DATA_DIR, Database, new_token, now_ms, token_hash};
use spendguard::server::{self, AppState};
use spendguard::storage::{Actor, Role};

use super::LimitArgs;
use super::token::TokenRole;

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where to create the data directory; it must not exist.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR, env = "SPENDGUARD_DATA_DIR")]
    data_dir: PathBuf,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Print the tokens as JSON.
    #[arg(long)]
    json: bool,
}

/// Where the wallet lives when not in the data directory's SQLite file.
#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// Keep the wallet in this PostgreSQL database (`postgres://user@host:port/db`),
    /// which several daemons may share; each needs a copy of the data directory.
    #[arg(long, value_name = "URL", env = "SPENDGUARD_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Connections to PostgreSQL to keep at most.
    #[arg(long, value_name = "N", env = "SPENDGUARD_DATABASE_POOL_SIZE")]
    database_pool_size: Option<u32>,
}

impl DatabaseArgs {
    /// Whether either was given on the command line (or the environment).
    pub fn given(&self) -> bool {
        self.database_url.is_some() || self.database_pool_size.is_some()
    }

    fn database(self) -> anyhow::Result<Database> {
        let pool_size = self.database_pool_size.unwrap_or(spendguard::storage::postgres::DEFAULT_POOL_SIZE);
        Database::from_url(self.database_url, pool_size)
    }
}

pub fn init(args: InitArgs) -> anyhow::Result<ExitCode> {
    let tokens = datadir::init(&args.data_dir, &args.database.database()?, now_ms())?;
    if args.json {
        println!(
            "{}",
            json!({ "operator_token": tokens.operator_token, "network_token": tokens.network_token })
        );
    } else {
        println!("initialised `{}`", args.data_dir.display());
        println!();
        println!("operator token: {}", tokens.operator_token);
        println!("network token:  {}", tokens.network_token);
        println!();
        println!("These are shown once and stored only as hashes: keep them now.");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The data directory made by `spendguard init`.
    #[arg(long, value_name = "DIR", env = "SPENDGUARD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:7420).
    #[arg(long, value_name = "ADDR", env = "SPENDGUARD_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// A TOML config file (every key: docs/contract/configuration.md).
    #[arg(long, value_name = "FILE", env = "SPENDGUARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    let mut config = match &args.config {
        Some(file) => ServeConfig::from_file(file)?,
        None => ServeConfig::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(url) = args.database.database_url {
        config.database_url = Some(spendguard::config::DatabaseUrl(url));
    }
    if let Some(size) = args.database.database_pool_size {
        config.database_pool_size = size;
    }
    config.sandbox = args.limits.apply(config.sandbox);
    config.check()?;
    let opened = datadir::open(&config.data_dir, &config.database()?)?;
    let state = Arc::new(AppState::new(opened.storage, opened.key, config.clone())?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on `{}`", config.listen))?;
        server::serve(state, listener).await
    });
    // Past the shutdown deadline, connections still open are dropped here;
    // a storage call under way gets a moment to end (SQLite and PostgreSQL
    // keep a commit cut short out anyway).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served?;
    Ok(ExitCode::SUCCESS)
}

/// Structured logs on stderr; `SPENDGUARD_LOG` filters (default `info`,
/// the MCP library's own only from warnings: it would log every request).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPENDGUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmcp=warn"));
    use std::io::IsTerminal as _;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// A token minted on the data directory: shown once.
#[derive(Debug)]
pub struct Minted {
    pub id: String,
    pub token: String,
    pub role: &'static str,
}

/// Mint a token directly in the data directory at `dir` (it needs its
/// files, not the daemon): the way back in for an operator who lost every
/// token. Its audit record names the data directory as the actor.
pub fn mint(
    dir: &std::path::Path,
    database: DatabaseArgs,
    role: TokenRole,
    agent: Option<String>,
    label: &str,
) -> anyhow::Result<Minted> {
    server::parse::token_label(label).map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let opened = datadir::open(dir, &database.database()?)?;
    let role = match (role, agent) {
        (TokenRole::Operator, None) => Role::Operator,
        (TokenRole::Network, None) => Role::Network,
        (TokenRole::Agent, Some(id)) => {
            match opened.storage.agent(&id)? {
                Some(agent) if !agent.revoked => {}
                Some(_) => bail!("agent `{id}` is revoked"),
                None => bail!("no agent `{id}`"),
            }
            Role::Agent(id)
        }
        (TokenRole::Agent, None) => bail!("`--role agent` needs `--agent ID`"),
        (_, Some(_)) => bail!("`--agent` goes only with `--role agent`"),
    };
    let token = new_token(&role);
    let id = opened.storage.add_token(&role, &token_hash(&token), label, &Actor::DataDirectory, now_ms())?;
    Ok(Minted { id, token, role: role.name() })
}
