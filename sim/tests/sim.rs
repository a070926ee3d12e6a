//! The simulators as real processes over real TCP: their protocols, their session limit,
//! and the JSON events a test reads to see who controlled a device.

use std::time::Duration;

use tether_tests::sim::Sim;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn ask(reader: &mut tokio::io::BufReader<TcpStream>, command: &str) -> String {
    reader
        .get_mut()
        .write_all(format!("{command}\r").as_bytes())
        .await
        .unwrap();
    let mut reply = Vec::new();
    reader.read_until(b'\r', &mut reply).await.unwrap();
    String::from_utf8(reply)
        .unwrap()
        .trim_end_matches('\r')
        .to_string()
}

#[tokio::test]
async fn the_projector_speaks_its_protocol_and_reports_who_commanded_it() {
    let sim = Sim::start(&["projector", "--listen", "127.0.0.1:0"]);
    let stream = TcpStream::connect(&sim.addr).await.unwrap();
    let local = stream.local_addr().unwrap().to_string();
    let mut conn = tokio::io::BufReader::new(stream);
    assert_eq!(sim.next("connect")["peer"], local);

    assert_eq!(ask(&mut conn, "PWR?").await, "PWR=OFF");
    assert_eq!(ask(&mut conn, "PWR ON").await, "PWR=ON");
    let event = sim.next("command");
    assert_eq!(event["command"], "PWR?");
    let event = sim.next("command");
    assert_eq!(
        (
            event["command"].as_str(),
            event["power"].as_bool(),
            event["peer"].as_str()
        ),
        (Some("PWR ON"), Some(true), Some(local.as_str()))
    );
    assert_eq!(ask(&mut conn, "INPUT 2").await, "INPUT=2");
    assert_eq!(ask(&mut conn, "INPUT?").await, "INPUT=2");
    assert_eq!(ask(&mut conn, "SELF DESTRUCT").await, "ERR");
    assert_eq!(ask(&mut conn, &"X".repeat(1000)).await, "ERR");
    assert_eq!(
        ask(&mut conn, "PWR?").await,
        "PWR=ON",
        "an overlong line did not break the session"
    );

    // One session at once by default: a second controller is refused and sees the close.
    let mut second = TcpStream::connect(&sim.addr).await.unwrap();
    assert!(sim.next("refused")["peer"].is_string());
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut second, &mut buf),
    )
    .await
    .unwrap();
    assert!(matches!(read, Ok(0) | Err(_)));

    // When the first leaves, the state stays and the next controller gets in.
    drop(conn);
    assert_eq!(sim.next("disconnect")["peer"], local);
    let mut third = tokio::io::BufReader::new(TcpStream::connect(&sim.addr).await.unwrap());
    sim.next("connect");
    assert_eq!(ask(&mut third, "PWR?").await, "PWR=ON");
}

#[tokio::test]
async fn max_sessions_allows_that_many_controllers() {
    let sim = Sim::start(&[
        "projector",
        "--listen",
        "127.0.0.1:0",
        "--max-sessions",
        "2",
    ]);
    let _a = TcpStream::connect(&sim.addr).await.unwrap();
    let _b = TcpStream::connect(&sim.addr).await.unwrap();
    sim.next("connect");
    sim.next("connect");
    let _c = TcpStream::connect(&sim.addr).await.unwrap();
    sim.next("refused");
}

#[tokio::test]
async fn the_meter_serves_registers_and_coils_and_its_energy_grows() {
    use tokio_modbus::prelude::*;
    let sim = Sim::start(&["modbus", "--listen", "127.0.0.1:0"]);
    let mut ctx = tokio_modbus::client::tcp::connect(sim.addr.parse().unwrap())
        .await
        .unwrap();
    sim.next("connect");

    let inputs = ctx.read_input_registers(0, 4).await.unwrap().unwrap();
    assert_eq!(inputs[0], 2300, "230.0 V");
    assert_eq!(inputs[1], 512, "5.12 A");
    let energy = |r: &[u16]| (u32::from(r[2]) << 16) | u32::from(r[3]);
    let first = energy(&inputs);

    ctx.write_single_register(3, 777).await.unwrap().unwrap();
    assert_eq!(sim.next("command")["value"], 777);
    ctx.write_multiple_registers(8, &[1, 2])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ctx.read_holding_registers(0, 10).await.unwrap().unwrap(),
        vec![0, 0, 0, 777, 0, 0, 0, 0, 1, 2]
    );
    ctx.write_single_coil(9, true).await.unwrap().unwrap();
    assert_eq!(ctx.read_coils(9, 1).await.unwrap().unwrap(), vec![true]);

    // Out of range: an exception, and the session carries on.
    assert_eq!(
        ctx.read_holding_registers(9, 2).await.unwrap(),
        Err(ExceptionCode::IllegalDataAddress)
    );

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let later = ctx.read_input_registers(0, 4).await.unwrap().unwrap();
    assert!(
        energy(&later) >= first + 2,
        "energy {first} -> {}",
        energy(&later)
    );
    drop(ctx);
    sim.next("disconnect");
}
