//! Answering the other side's calls on modules and systems, through the local runtime.

use crate::control::Claim;
use crate::link::{IncomingRequest, Responder};
use crate::protocol::{Json, ModuleRef, Request, Response, StreamItem};
use crate::runtime::{ExecError, Origin, Runtime, StatusEvent, SystemAction};

use super::errors::to_remote;

/// Answers `request` if it is a call on a module or a system (exec, status, debug, status
/// and debug streams, start, stop, expire), each in its own task so a slow method never
/// holds up the link's other requests; gives any other request back. `via` names the
/// link it came in on (an edge id on the master, `master` on an edge): the call may go on
/// to another link, never back over this one.
pub fn serve_call(
    runtime: &Runtime,
    request: Box<IncomingRequest>,
    via: &str,
) -> Option<Box<IncomingRequest>> {
    if !is_call(&request.body) {
        return Some(request);
    }
    let runtime = runtime.clone();
    let via = Origin::link(via);
    let IncomingRequest {
        body, responder, ..
    } = *request;
    match body {
        Request::Execute {
            module,
            method,
            args,
            epoch,
            holder,
        } => {
            tokio::spawn(async move {
                let claim = Claim { epoch, holder };
                let answer = execute(&runtime, &module, &method, &args, claim, &via).await;
                responder.respond(answer.map_err(to_remote)).await;
            });
        }
        Request::StatusRequest { module } => {
            tokio::spawn(async move {
                let answer =
                    runtime
                        .status_from(&module, &via)
                        .await
                        .map(|status| Response::Status {
                            entries: status
                                .into_iter()
                                .map(|(key, value)| (key, Json::from_value(&value)))
                                .collect(),
                        });
                responder.respond(answer.map_err(to_remote)).await;
            });
        }
        Request::DebugRead { module } => {
            tokio::spawn(async move {
                let answer =
                    runtime
                        .debug_from(&module, &via)
                        .await
                        .map(|lines| Response::DebugLines {
                            lines: lines.into_iter().map(|l| (l.time_ms, l.line)).collect(),
                        });
                responder.respond(answer.map_err(to_remote)).await;
            });
        }
        Request::StatusSubscribe { module } => {
            tokio::spawn(stream_status(runtime, module, via, responder));
        }
        Request::DebugSubscribe { module } => {
            tokio::spawn(stream_debug(runtime, module, via, responder));
        }
        Request::DebugUnsubscribe { .. } => {
            // Streams end when their request is cancelled; nothing else to do.
            tokio::spawn(responder.respond(Ok(Response::Ack)));
        }
        Request::StartSystem { system } => {
            system_action(runtime, system, SystemAction::Start, via, responder)
        }
        Request::StopSystem { system } => {
            system_action(runtime, system, SystemAction::Stop, via, responder)
        }
        Request::ExpireSystemCache { system } => {
            system_action(runtime, system, SystemAction::ExpireCache, via, responder)
        }
        _ => unreachable!("is_call admits only the calls above"),
    }
    None
}

/// The requests [`serve_call`] answers.
fn is_call(body: &Request) -> bool {
    matches!(
        body,
        Request::Execute { .. }
            | Request::StatusRequest { .. }
            | Request::DebugRead { .. }
            | Request::StatusSubscribe { .. }
            | Request::DebugSubscribe { .. }
            | Request::DebugUnsubscribe { .. }
            | Request::StartSystem { .. }
            | Request::StopSystem { .. }
            | Request::ExpireSystemCache { .. }
    )
}

async fn execute(
    runtime: &Runtime,
    module: &ModuleRef,
    method: &str,
    args: &Json,
    claim: Claim,
    via: &Origin,
) -> Result<Response, ExecError> {
    let args = match args.to_value() {
        Ok(serde_json::Value::Array(args)) => args,
        Ok(other) => vec![other],
        Err(err) => {
            return Err(ExecError::BadArgs(format!(
                "the arguments are not JSON: {err}"
            )));
        }
    };
    let done = runtime.exec_from(module, method, args, claim, via).await?;
    Ok(Response::Value {
        value: Json::from_value(&done.value),
        executed_by: done.executed_by,
    })
}

fn system_action(
    runtime: Runtime,
    system: String,
    action: SystemAction,
    via: Origin,
    responder: Responder,
) {
    tokio::spawn(async move {
        let answer = runtime
            .system_action(&system, action, &via)
            .await
            .map(|side| Response::DoneBy { side });
        responder.respond(answer.map_err(to_remote)).await;
    });
}

async fn stream_status(runtime: Runtime, module: ModuleRef, via: Origin, responder: Responder) {
    // Opening the watch may wait on another link; the peer may give up meanwhile.
    let watch = tokio::select! {
        _ = responder.cancelled() => return,
        watch = runtime.watch_status(&module, &via) => watch,
    };
    let mut events = match watch {
        Ok(events) => events,
        Err(err) => return responder.end(Err(to_remote(err))).await,
    };
    loop {
        let event = tokio::select! {
            _ = responder.cancelled() => return,
            event = events.recv() => event,
        };
        let item = match event {
            Some(StatusEvent::Map(map)) => StreamItem::StatusMap {
                entries: map
                    .into_iter()
                    .map(|(key, value)| (key, Json::from_value(&value)))
                    .collect(),
            },
            Some(StatusEvent::Value(key, value)) => StreamItem::StatusValue {
                key,
                value: Json::from_value(&value),
            },
            // The module stopped running here: the binding looks for it again.
            None => return responder.end(Ok(())).await,
        };
        if responder.item(item).await.is_err() {
            return;
        }
    }
}

async fn stream_debug(runtime: Runtime, module: ModuleRef, via: Origin, responder: Responder) {
    let watch = tokio::select! {
        _ = responder.cancelled() => return,
        watch = runtime.watch_debug(&module, &via) => watch,
    };
    let mut lines = match watch {
        Ok(lines) => lines,
        Err(err) => return responder.end(Err(to_remote(err))).await,
    };
    loop {
        let line = tokio::select! {
            _ = responder.cancelled() => return,
            line = lines.recv() => line,
        };
        let Some(line) = line else {
            return responder.end(Ok(())).await;
        };
        let item = StreamItem::Debug {
            time_ms: line.time_ms,
            line: line.line,
        };
        if responder.item(item).await.is_err() {
            return;
        }
    }
}
