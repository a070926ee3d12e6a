//! A `tether-sim` device as a real process, and the JSON events it prints: a test reads
//! them to see who connected to a device, what it was told, and when.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::bin;

#[derive(Default)]
struct Events {
    lines: Mutex<Vec<Value>>,
    arrived: Condvar,
}

/// A simulator process; SIGKILLed on drop.
pub struct Sim {
    child: Child,
    events: Arc<Events>,
    /// How far [`next`](Self::next) has read.
    cursor: Mutex<usize>,
    /// The address it listens on.
    pub addr: String,
}

impl Sim {
    /// Starts `tether-sim ARGS` and waits for its `listening` event.
    pub fn start(args: &[&str]) -> Sim {
        let mut child = Command::new(bin("tether-sim"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start tether-sim");
        let stdout = child.stdout.take().expect("piped stdout");
        let events = Arc::new(Events::default());
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let event: Value = serde_json::from_str(&line).expect("every line is JSON");
                sink.lines.lock().unwrap().push(event);
                sink.arrived.notify_all();
            }
        });
        let mut sim = Sim {
            child,
            events,
            cursor: Mutex::new(0),
            addr: String::new(),
        };
        let listening = sim.next("listening");
        sim.addr = listening["addr"]
            .as_str()
            .expect("listening addr")
            .to_string();
        sim
    }

    /// A projector on a free port.
    pub fn projector() -> Sim {
        Sim::start(&["projector", "--listen", "127.0.0.1:0"])
    }

    /// A Modbus meter on a free port.
    pub fn modbus() -> Sim {
        Sim::start(&["modbus", "--listen", "127.0.0.1:0"])
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port in the listening address")
    }

    /// The next event of `kind` after the last one read, skipping others; panics after 5 s.
    pub fn next(&self, kind: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut cursor = self.cursor.lock().unwrap();
        let mut lines = self.events.lines.lock().unwrap();
        loop {
            while *cursor < lines.len() {
                let event = lines[*cursor].clone();
                *cursor += 1;
                assert!(event["time"].is_string(), "{event}");
                if event["event"] == kind {
                    return event;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("no {kind} event within 5 s");
            }
            lines = self.events.arrived.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// The next event of `kind` for which `wanted` holds, skipping others; panics after
    /// 5 s, listing the events seen.
    pub fn next_where(&self, kind: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let event = self.next(kind);
            if wanted(&event) {
                return event;
            }
        }
        panic!(
            "no matching {kind} event within 5 s; events: {:?}",
            self.events()
        );
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lines.lock().unwrap().clone()
    }

    /// The events of `kind` so far.
    pub fn events_of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
    }

    /// How many device sessions are open now (connects minus disconnects).
    pub fn open_sessions(&self) -> usize {
        self.events_of("connect")
            .len()
            .saturating_sub(self.events_of("disconnect").len())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
