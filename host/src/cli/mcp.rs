//! `spendguard mcp`: the MCP server on stdio, for MCP clients that start
//! their tools as processes. A client of the daemon at `SPENDGUARD_URL`
//! holding only an agent's token (`SPENDGUARD_TOKEN`): each tool is one
//! request of the daemon's HTTP API with it. Nothing but MCP goes to
//! stdout; logs go to stderr.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use rmcp::service::RequestContext;
use rmcp::{RoleServer, ServiceExt as _};
use serde_json::Value;
use spendguard::mcp::{Api, ApiCall, Method, Refusal, SpendTools};

use super::EXIT_INVALID_INPUT;
use super::client::{Client, ConnArgs, Refused};
use super::whoami::Identity;

#[derive(Debug, Args)]
pub struct McpArgs {}

/// The daemon over HTTP with the agent's token.
#[derive(Debug, Clone)]
struct Remote(Arc<Client>);

impl Api for Remote {
    async fn call(&self, call: ApiCall, _context: &RequestContext<RoleServer>) -> Result<Value, Refusal> {
        let client = Arc::clone(&self.0);
        let sent = tokio::task::spawn_blocking(move || {
            let reply = match call.method {
                Method::Get => client.get(&call.path, &call.query)?,
                Method::Post => {
                    client.post(&call.path, call.body.as_ref(), call.idempotency_key.as_deref())?
                }
            };
            reply.parse::<Value>()
        })
        .await;
        match sent {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(match err.downcast::<Refused>() {
                Ok(refused) => Refusal::new(refused.code, refused.message),
                Err(other) => Refusal::new("unavailable", format!("{other:#}")),
            }),
            Err(_) => Err(Refusal::new("internal", "the request to the daemon was cut short")),
        }
    }
}

/// Refuse to start (exit 2), saying why on stderr.
fn refuse(why: &str) -> anyhow::Result<ExitCode> {
    eprintln!("error: {why}");
    Ok(ExitCode::from(EXIT_INVALID_INPUT))
}

pub fn run(_args: McpArgs, conn: &ConnArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    let client = Client::new(conn)?;
    if !client.has_token() {
        return refuse(
            "`spendguard mcp` needs an agent's token: set `SPENDGUARD_TOKEN` to the token printed when the agent was created",
        );
    }
    // Which token this is, before anything is served: only an agent's.
    let me: Identity = match client.get("/v1/whoami", &[]) {
        Ok(reply) => reply.parse()?,
        Err(err) => match err.downcast_ref::<Refused>() {
            Some(refused) if refused.status == 401 => {
                return refuse(&format!(
                    "the daemon refused this token ({}: {}): `spendguard mcp` needs a valid agent token",
                    refused.code, refused.message
                ));
            }
            // Unreachable, or the daemon failed: exit 1.
            _ => return Err(err),
        },
    };
    if me.role != "agent" {
        return refuse(&format!(
            "this is the {} token: `spendguard mcp` serves agents only, and holds only an agent's token \
             (use the token printed when the agent was created)",
            me.role
        ));
    }
    tracing::info!(agent = me.agent_id.as_deref().unwrap_or(""), "serving MCP on stdio");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let tools = SpendTools::new(Remote(Arc::new(client)));
    let served: anyhow::Result<()> = runtime.block_on(async move {
        let running = tools.serve(rmcp::transport::stdio()).await.context("the MCP handshake failed")?;
        running.waiting().await.context("the MCP server stopped")?;
        Ok(())
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served?;
    Ok(ExitCode::SUCCESS)
}

/// Logs on stderr (stdout is the protocol's); `SPENDGUARD_LOG` filters
/// (default: warnings).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPENDGUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}
