//! The Model Context Protocol server: how agents plug in (docs/mcp.md).
//!
//! Seven tools, the only ones: propose_spend, check_spend, get_spend,
//! list_spends, request_mandate, list_mandates, get_mandate. None approves,
//! deposits, or changes a policy, a limit or another agent. Each tool is one
//! call of the daemon's own HTTP API with the caller's agent token, so the
//! same validation, authorization, rate limits and audit trail apply as to
//! any other client: this module implements no rule of its own.
//!
//! Served on both standard transports: stdio by `spendguard mcp` (a client
//! of the daemon, see the CLI), and Streamable HTTP by the daemon at `/mcp`
//! ([`http`]).

pub mod http;
mod tools;

use std::future::Future;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};

pub use tools::TOOL_NAMES;

/// How a tool's call reaches the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

/// One request of the daemon's HTTP API, as a tool makes it.
#[derive(Debug, Clone)]
pub struct ApiCall {
    pub method: Method,
    /// The path, its ids already escaped as path segments.
    pub path: String,
    pub query: Vec<(&'static str, String)>,
    pub body: Option<Value>,
    pub idempotency_key: Option<String>,
}

/// The daemon refused a call (its error `code` and `message`), or could not
/// be reached (`unavailable`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: String,
    pub message: String,
}

impl Refusal {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Refusal {
        Refusal { code: code.into(), message: message.into() }
    }
}

/// The daemon's HTTP API as the caller reaches it: over the network with
/// the agent's token (stdio), or in process with the request's own
/// `Authorization` header (Streamable HTTP).
pub trait Api: Clone + Send + Sync + 'static {
    fn call(
        &self,
        call: ApiCall,
        context: &RequestContext<RoleServer>,
    ) -> impl Future<Output = Result<Value, Refusal>> + Send;
}

/// What the server says of itself when a client connects.
const INSTRUCTIONS: &str = "spendguard is the wallet through which you may spend money. Before you pay \
for anything, propose the spend with `propose_spend`: the operator's policies decide. An approved spend \
comes with a single-use virtual card locked to that merchant, that amount and a short life; its card \
number and CVV are shown only once, in that result. A spend or mandate in `pending_approval` waits for a \
human: tell the user, and call `get_spend` or `get_mandate` later. `check_spend` asks what the policies \
would say without committing anything. A mandate is a budget for one task: request one with \
`request_mandate`, and once a human approves it, pass its id as `mandate_id` when you propose spends \
for that task.";

/// The MCP server: the tools, each answered through `api`.
#[derive(Debug, Clone)]
pub struct SpendTools<A> {
    api: A,
}

impl<A: Api> SpendTools<A> {
    pub fn new(api: A) -> SpendTools<A> {
        SpendTools { api }
    }

    /// Answer one tool call: its result, or a tool error (`isError: true`)
    /// whose text carries the error's code and message.
    pub async fn answer(
        &self,
        name: &str,
        arguments: Value,
        context: &RequestContext<RoleServer>,
    ) -> CallToolResult {
        let call = match tools::request(name, arguments) {
            Ok(call) => call,
            Err(refusal) => return tool_error(&refusal),
        };
        let status_filter = call.status_filter.clone();
        match self.api.call(call.api, context).await {
            Ok(value) => {
                let value = match status_filter {
                    Some((status, limit)) => tools::keep_status(value, &status, limit),
                    None => value,
                };
                tool_result(name, value)
            }
            Err(refusal) => tool_error(&refusal),
        }
    }
}

/// A result: the API's JSON as `structuredContent`, a line for the model and
/// the same JSON as text (for clients that show models only text).
fn tool_result(name: &str, value: Value) -> CallToolResult {
    let summary = tools::summary(name, &value);
    let mut result = CallToolResult::structured(value.clone());
    result.content = vec![ContentBlock::text(summary), ContentBlock::text(value.to_string())];
    result
}

/// A refused call: `code: message` for the model, and the API's error shape
/// as `structuredContent`.
fn tool_error(refusal: &Refusal) -> CallToolResult {
    let value = json!({ "error": { "code": refusal.code, "message": refusal.message } });
    let mut result = CallToolResult::structured_error(value);
    result.content = vec![ContentBlock::text(format!("{}: {}", refusal.code, refusal.message))];
    result
}

impl<A: Api> ServerHandler for SpendTools<A> {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("spendguard", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools::all()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        tools::all().into_iter().find(|t| t.name == name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if !TOOL_NAMES.contains(&request.name.as_ref()) {
            return Err(ErrorData::invalid_params(format!("no tool `{}`", request.name), None));
        }
        let arguments = Value::Object(request.arguments.unwrap_or_default());
        Ok(self.answer(&request.name, arguments, &context).await.into())
    }
}
