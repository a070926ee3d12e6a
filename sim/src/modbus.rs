//! The Modbus TCP energy meter.

use std::future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio_modbus::prelude::*;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};

use crate::events::emit;

/// Holding registers and coils 0..=9.
const SIZE: usize = 10;

#[derive(Debug)]
struct Meter {
    holding: [u16; SIZE],
    coils: [bool; SIZE],
    /// 0.1 V.
    voltage: u16,
    /// 0.01 A.
    current: u16,
    /// Wh.
    energy: u32,
}

impl Meter {
    fn input_registers(&self) -> [u16; 4] {
        [
            self.voltage,
            self.current,
            (self.energy >> 16) as u16,
            self.energy as u16,
        ]
    }
}

fn range(address: u16, quantity: u16, len: usize) -> Result<std::ops::Range<usize>, ExceptionCode> {
    let start = address as usize;
    let end = start + quantity as usize;
    if quantity == 0 || end > len {
        Err(ExceptionCode::IllegalDataAddress)
    } else {
        Ok(start..end)
    }
}

/// Writes `values` into `slots` from `address`; returns how many were written.
fn write<T: Copy>(slots: &mut [T], address: u16, values: &[T]) -> Result<u16, ExceptionCode> {
    let quantity = u16::try_from(values.len()).map_err(|_| ExceptionCode::IllegalDataValue)?;
    let len = slots.len();
    slots[range(address, quantity, len)?].copy_from_slice(values);
    Ok(quantity)
}

/// One client's session; dropping it is the disconnect.
struct Session {
    meter: Arc<Mutex<Meter>>,
    peer: SocketAddr,
}

impl Drop for Session {
    fn drop(&mut self) {
        emit("disconnect", Some(self.peer), json!({}));
    }
}

impl Session {
    fn handle(&self, request: Request<'static>) -> Result<Response, ExceptionCode> {
        let mut meter = self
            .meter
            .lock()
            .map_err(|_| ExceptionCode::ServerDeviceFailure)?;
        let command = |name: &str, address: u16, value: serde_json::Value| {
            emit(
                "command",
                Some(self.peer),
                json!({ "command": name, "address": address, "value": value }),
            );
        };
        // Every read is logged with its peer: who polls the device, and when (a
        // collector array's turns).
        let read = |name: &str, address: u16, quantity: u16| {
            emit(
                "read",
                Some(self.peer),
                json!({ "function": name, "address": address, "quantity": quantity }),
            );
        };
        match &request {
            Request::ReadHoldingRegisters(address, quantity) => {
                read("read_holding", *address, *quantity)
            }
            Request::ReadInputRegisters(address, quantity) => {
                read("read_input", *address, *quantity)
            }
            Request::ReadCoils(address, quantity) => read("read_coils", *address, *quantity),
            _ => {}
        }
        Ok(match request {
            Request::ReadHoldingRegisters(address, quantity) => Response::ReadHoldingRegisters(
                meter.holding[range(address, quantity, SIZE)?].to_vec(),
            ),
            Request::ReadInputRegisters(address, quantity) => {
                let inputs = meter.input_registers();
                Response::ReadInputRegisters(
                    inputs[range(address, quantity, inputs.len())?].to_vec(),
                )
            }
            Request::ReadCoils(address, quantity) => {
                Response::ReadCoils(meter.coils[range(address, quantity, SIZE)?].to_vec())
            }
            Request::WriteSingleRegister(address, value) => {
                write(&mut meter.holding, address, &[value])?;
                command("write_register", address, json!(value));
                Response::WriteSingleRegister(address, value)
            }
            Request::WriteMultipleRegisters(address, values) => {
                let quantity = write(&mut meter.holding, address, &values)?;
                command("write_registers", address, json!(values.to_vec()));
                Response::WriteMultipleRegisters(address, quantity)
            }
            Request::WriteSingleCoil(address, value) => {
                write(&mut meter.coils, address, &[value])?;
                command("write_coil", address, json!(value));
                Response::WriteSingleCoil(address, value)
            }
            Request::WriteMultipleCoils(address, values) => {
                let quantity = write(&mut meter.coils, address, &values)?;
                command("write_coils", address, json!(values.to_vec()));
                Response::WriteMultipleCoils(address, quantity)
            }
            _ => return Err(ExceptionCode::IllegalFunction),
        })
    }
}

impl tokio_modbus::server::Service for Session {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        future::ready(self.handle(request))
    }
}

pub(crate) async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = crate::events::listen(listen, "modbus").await?;
    let meter = Arc::new(Mutex::new(Meter {
        holding: [0; SIZE],
        coils: [false; SIZE],
        voltage: 2300,
        current: 512,
        energy: 0,
    }));
    // The energy counter grows as a real meter's does: 1 Wh a second.
    let ticking = meter.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Ok(mut meter) = ticking.lock() {
                meter.energy = meter.energy.wrapping_add(1);
            }
        }
    });
    let server = Server::new(listener);
    let on_connected = |stream, peer: SocketAddr| {
        let meter = meter.clone();
        async move {
            accept_tcp_connection(stream, peer, |peer| {
                emit("connect", Some(peer), json!({}));
                Ok(Some(Session {
                    meter: meter.clone(),
                    peer,
                }))
            })
        }
    };
    server
        .serve(&on_connected, |err| {
            eprintln!("tether-sim: modbus session: {err}")
        })
        .await
        .context("modbus server stopped")
}
