//! `spendguard whoami`: which role the token has (and which agent).

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use serde::Deserialize;

use super::client::{Client, ConnArgs, OutputArgs};
use super::render;

#[derive(Debug, Args)]
pub struct WhoamiArgs {
    #[command(flatten)]
    output: OutputArgs,
}

/// `GET /v1/whoami`.
#[derive(Debug, Deserialize)]
pub struct Identity {
    pub role: String,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

pub fn run(args: WhoamiArgs, conn: &ConnArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let reply = Client::new(conn)?.get("/v1/whoami", &[])?;
    if args.output.json {
        return reply.print(out);
    }
    let me: Identity = reply.parse()?;
    render::labelled(out, "role", &me.role)?;
    if let Some(id) = &me.agent_id {
        render::labelled(out, "agent", id)?;
    }
    if let Some(name) = &me.name {
        render::labelled(out, "name", name)?;
    }
    Ok(ExitCode::SUCCESS)
}
