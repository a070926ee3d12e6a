//! The `modbus` transport: a Modbus TCP client (tokio-modbus) that scripts use through
//! blocking calls (`read_holding`, `write_register` ...). The connection is kept up with
//! backoff; a failed request drops it, and the next attempt reconnects.

use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_util::sync::CancellationToken;

use super::transport::{Backoff, TransportEvent};

/// How long one Modbus request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// A request a script makes.
#[derive(Debug, Clone, Copy)]
pub(super) enum ModbusOp {
    /// Read holding registers (address, count).
    ReadHolding(u16, u16),
    /// Read input registers (address, count).
    ReadInput(u16, u16),
    /// Read coils (address, count).
    ReadCoils(u16, u16),
    /// Write one holding register.
    WriteRegister(u16, u16),
    /// Write one coil.
    WriteCoil(u16, bool),
}

/// What a request returns: register values, coil states, or nothing for a write.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ModbusReply {
    /// Registers.
    Words(Vec<u16>),
    /// Coils.
    Bits(Vec<bool>),
    /// A write succeeded.
    Done,
}

type Reply = std_mpsc::SyncSender<Result<ModbusReply, String>>;

/// The script's side of a Modbus transport.
#[derive(Debug, Clone)]
pub(super) struct ModbusHandle {
    ops: mpsc::Sender<(ModbusOp, Reply)>,
}

impl ModbusHandle {
    /// Runs one request, blocking the calling (script) thread until it answers.
    pub(super) fn call(&self, op: ModbusOp) -> Result<ModbusReply, String> {
        let (tx, rx) = std_mpsc::sync_channel(1);
        self.ops
            .try_send((op, tx))
            .map_err(|_| "the Modbus request queue is full".to_string())?;
        rx.recv_timeout(REQUEST_TIMEOUT + Duration::from_secs(1))
            .map_err(|_| "the Modbus request timed out".to_string())?
    }
}

/// Starts the transport; it runs until `cancel`.
pub(super) fn spawn(
    host: String,
    port: u16,
    events: mpsc::Sender<TransportEvent>,
    cancel: CancellationToken,
) -> (ModbusHandle, JoinHandle<()>) {
    let (ops_tx, ops_rx) = mpsc::channel(16);
    let task = tokio::spawn(run(host, port, events, ops_rx, cancel));
    (ModbusHandle { ops: ops_tx }, task)
}

async fn connect(host: &str, port: u16) -> Result<Context, String> {
    let addr: SocketAddr = tokio::net::lookup_host((host, port))
        .await
        .map_err(|err| format!("resolve {host}: {err}"))?
        .next()
        .ok_or_else(|| format!("resolve {host}: no address"))?;
    match tokio::time::timeout(REQUEST_TIMEOUT, tokio_modbus::client::tcp::connect(addr)).await {
        Ok(Ok(context)) => Ok(context),
        Ok(Err(err)) => Err(format!("connect to {addr}: {err}")),
        Err(_) => Err(format!("connect to {addr}: timed out")),
    }
}

async fn execute(context: &mut Context, op: ModbusOp) -> Result<ModbusReply, String> {
    let call = async {
        Ok::<_, tokio_modbus::Error>(match op {
            ModbusOp::ReadHolding(addr, n) => context
                .read_holding_registers(addr, n)
                .await?
                .map(ModbusReply::Words),
            ModbusOp::ReadInput(addr, n) => context
                .read_input_registers(addr, n)
                .await?
                .map(ModbusReply::Words),
            ModbusOp::ReadCoils(addr, n) => {
                context.read_coils(addr, n).await?.map(ModbusReply::Bits)
            }
            ModbusOp::WriteRegister(addr, value) => context
                .write_single_register(addr, value)
                .await?
                .map(|()| ModbusReply::Done),
            ModbusOp::WriteCoil(addr, value) => context
                .write_single_coil(addr, value)
                .await?
                .map(|()| ModbusReply::Done),
        })
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(Ok(Ok(reply))) => Ok(reply),
        Ok(Ok(Err(exception))) => Err(format!("the device refused: {exception}")),
        Ok(Err(err)) => Err(format!("Modbus request failed: {err}")),
        Err(_) => Err("the Modbus request timed out".into()),
    }
}

async fn run(
    host: String,
    port: u16,
    events: mpsc::Sender<TransportEvent>,
    mut ops: mpsc::Receiver<(ModbusOp, Reply)>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new();
    loop {
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            result = connect(&host, port) => result,
        };
        let mut context = match connected {
            Ok(context) => context,
            Err(err) => {
                let _ = events.send(TransportEvent::Failed(err)).await;
                // Requests made meanwhile fail at once rather than wait for a device
                // that is not there.
                while let Ok((_, reply)) = ops.try_recv() {
                    let _ = reply.send(Err("not connected to the device".into()));
                }
                if backoff.wait(&cancel).await.is_err() {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        let _ = events.send(TransportEvent::Connected).await;
        let reason = loop {
            let (op, reply) = tokio::select! {
                _ = cancel.cancelled() => return,
                next = ops.recv() => match next {
                    Some(next) => next,
                    None => return,
                },
            };
            let result = execute(&mut context, op).await;
            let failed = match &result {
                Err(err) if !err.starts_with("the device refused") => Some(err.clone()),
                _ => None,
            };
            let _ = reply.send(result);
            if let Some(err) = failed {
                break err;
            }
        };
        let _ = events.send(TransportEvent::Disconnected(reason)).await;
        if backoff.wait(&cancel).await.is_err() {
            return;
        }
    }
}
