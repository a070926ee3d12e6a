//! What a running module shares: with its script's host functions (the context) and with
//! the API (status map, state, debug ring).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::modbus::{ModbusHandle, ModbusOp, ModbusReply};
use super::module::{Job, JobKind};
use super::spec::ModuleSpec;
use super::tcp::TcpHandle;
use super::{ExecError, Inner};

/// Lines a module's debug ring keeps.
const DEBUG_LINES: usize = 256;
/// Bytes a module's debug ring keeps (older lines go first).
const DEBUG_BYTES: usize = 256 * 1024;
/// The longest debug line a script may log; the server's own lines are cut to it.
pub const MAX_LOG_LINE: usize = 4096;
/// Status keys a module may hold.
pub const MAX_STATUS_KEYS: usize = 256;
/// The longest status key.
pub const MAX_STATUS_KEY: usize = 256;
/// The largest status value, as JSON.
pub const MAX_STATUS_VALUE: usize = 16 * 1024;
/// The most a module's status map may hold, keys and values as JSON together: what clients
/// bind to and what is synced over the link stays small.
pub const MAX_STATUS_BYTES: usize = 1024 * 1024;

/// A module's status map, within the caps, with its size kept as it changes: a check
/// costs the new value, not the whole map (a peer's flood of small changes to a full map
/// must not cost a megabyte each).
#[derive(Debug, Clone, Default)]
pub struct StatusMap {
    map: Map<String, Value>,
    /// Keys and values (as JSON) in bytes.
    bytes: usize,
}

pub(super) fn json_size(value: &Value) -> usize {
    value.to_string().len()
}

impl StatusMap {
    /// An empty map.
    pub fn new() -> Self {
        StatusMap::default()
    }

    /// The entries of `map` that fit the caps, in order.
    pub fn from_map(map: Map<String, Value>) -> Self {
        let mut status = StatusMap::new();
        for (key, value) in map {
            let _ = status.set(&key, value);
        }
        status
    }

    /// Sets `key` to `value` if the map stays within the caps (the error names the cap);
    /// answers the value it replaced.
    pub fn set(&mut self, key: &str, value: Value) -> Result<Option<Value>, String> {
        if key.len() > MAX_STATUS_KEY {
            return Err(format!(
                "status key of {} bytes: at most {MAX_STATUS_KEY}",
                key.len()
            ));
        }
        let new = json_size(&value);
        if new > MAX_STATUS_VALUE {
            return Err(format!(
                "status {key:?}: a value of {new} bytes (as JSON), at most {MAX_STATUS_VALUE}"
            ));
        }
        let old = self.map.get(key).map(|v| key.len() + json_size(v));
        if old.is_none() && self.map.len() >= MAX_STATUS_KEYS {
            return Err(format!(
                "status {key:?}: the module holds {MAX_STATUS_KEYS} status keys, its limit"
            ));
        }
        let total = self.bytes - old.unwrap_or(0) + key.len() + new;
        if total > MAX_STATUS_BYTES {
            return Err(format!(
                "status {key:?}: the module's status would hold {total} bytes, at most {MAX_STATUS_BYTES}"
            ));
        }
        self.bytes = total;
        Ok(self.map.insert(key.to_string(), value))
    }

    /// One value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    /// The whole map.
    pub fn map(&self) -> &Map<String, Value> {
        &self.map
    }

    /// The whole map, taken.
    pub fn into_map(self) -> Map<String, Value> {
        self.map
    }

    /// Its keys and values (as JSON) in bytes, as the caps count them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The shortest period `schedule_every` accepts.
const MIN_PERIOD_MS: i64 = 10;
/// Schedules a module may have pending at once (a script that schedules on every call
/// must not pile up timers).
const MAX_SCHEDULES: usize = 64;

/// One line of a module's debug log.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DebugLine {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// The text.
    pub line: String,
}

/// Where a module is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleState {
    /// Compiling and running `on_load`.
    Starting,
    /// Serving requests.
    Running,
    /// Its script failed to compile or to load; it serves nothing until its driver or
    /// settings change.
    Faulted,
    /// Stopped.
    Stopped,
}

/// A module's state as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModuleHealth {
    /// Life stage.
    pub state: ModuleState,
    /// Why it is faulted.
    pub error: Option<String>,
    /// The last error of a call or callback (the module carries on).
    pub last_error: Option<String>,
    /// Whether its device connection is up; absent for a logic module (no device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
}

/// The part of a module the API reads.
#[derive(Debug)]
pub(super) struct ModuleShared {
    status: Mutex<StatusMap>,
    debug: Mutex<DebugRing>,
    /// New debug lines, for clients watching the module's log.
    debug_live: tokio::sync::broadcast::Sender<DebugLine>,
    health: Mutex<ModuleHealth>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl ModuleShared {
    /// A module's shared part, starting from `status` (the last status synced from the
    /// other side, under warm standby; else empty).
    pub(super) fn new(status: StatusMap, has_device: bool) -> Self {
        ModuleShared {
            status: Mutex::new(status),
            debug: Mutex::default(),
            debug_live: tokio::sync::broadcast::channel(DEBUG_LINES).0,
            health: Mutex::new(ModuleHealth {
                state: ModuleState::Starting,
                error: None,
                last_error: None,
                connected: has_device.then_some(false),
            }),
        }
    }

    /// Sets one status value within the caps; answers whether it changed.
    pub(super) fn set_status(&self, key: &str, value: Value) -> Result<bool, String> {
        let previous = lock(&self.status).set(key, value.clone())?;
        Ok(previous.as_ref() != Some(&value))
    }

    /// The status map.
    pub(super) fn status(&self) -> Map<String, Value> {
        lock(&self.status).map().clone()
    }

    /// One status value.
    pub(super) fn status_value(&self, key: &str) -> Option<Value> {
        lock(&self.status).get(key).cloned()
    }

    /// The debug ring, oldest first.
    pub(super) fn debug_lines(&self) -> Vec<DebugLine> {
        lock(&self.debug).lines.iter().cloned().collect()
    }

    /// The debug ring and, from the same instant, every new line.
    pub(super) fn follow_debug(
        &self,
    ) -> (Vec<DebugLine>, tokio::sync::broadcast::Receiver<DebugLine>) {
        let ring = lock(&self.debug);
        (
            ring.lines.iter().cloned().collect(),
            self.debug_live.subscribe(),
        )
    }

    /// State and errors.
    pub(super) fn health(&self) -> ModuleHealth {
        lock(&self.health).clone()
    }

    pub(super) fn set_state(&self, state: ModuleState, error: Option<String>) {
        let mut health = lock(&self.health);
        health.state = state;
        health.error = error;
    }

    /// The device connection came up or went down.
    pub(super) fn set_connected(&self, connected: bool) {
        lock(&self.health).connected = Some(connected);
    }

    pub(super) fn record_error(&self, error: String) {
        self.log(format!("error: {error}"));
        lock(&self.health).last_error = Some(error);
    }

    /// Logs a line of the server's own, cut to [`MAX_LOG_LINE`].
    pub(super) fn log(&self, line: impl Into<String>) {
        let mut line = line.into();
        if line.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str("...");
        }
        let mut debug = lock(&self.debug);
        let line = DebugLine {
            time_ms: now_ms(),
            line,
        };
        // Sent under the ring's lock, so a follower sees each line once: in the ring it
        // read, or live. No follower is fine.
        let _ = self.debug_live.send(line.clone());
        debug.push(line);
    }
}

/// A module's recent debug lines, bounded in count and in bytes.
#[derive(Debug, Default)]
struct DebugRing {
    lines: VecDeque<DebugLine>,
    bytes: usize,
}

impl DebugRing {
    fn push(&mut self, line: DebugLine) {
        self.bytes += line.line.len();
        self.lines.push_back(line);
        while self.lines.len() > DEBUG_LINES || (self.bytes > DEBUG_BYTES && self.lines.len() > 1) {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.line.len();
            }
        }
    }
}

/// What a script's host functions reach.
pub(super) struct ModuleContext {
    pub(super) spec: ModuleSpec,
    pub(super) shared: Arc<ModuleShared>,
    pub(super) tcp: Option<TcpHandle>,
    pub(super) modbus: Option<ModbusHandle>,
    pub(super) jobs: mpsc::Sender<Job>,
    pub(super) cancel: CancellationToken,
    pub(super) runtime: Weak<Inner>,
    pub(super) handle: tokio::runtime::Handle,
    /// Schedules pending now.
    pub(super) schedules: Arc<std::sync::atomic::AtomicUsize>,
}

impl ModuleContext {
    /// A line the script logs; one longer than [`MAX_LOG_LINE`] is the script's error.
    pub(super) fn log(&self, text: &str) -> Result<(), String> {
        if text.len() > MAX_LOG_LINE {
            return Err(format!(
                "log: a line of {} bytes, at most {MAX_LOG_LINE}",
                text.len()
            ));
        }
        tracing::debug!(module = %self.spec.id, "{}", crate::report::printable(text, MAX_LOG_LINE));
        self.shared.log(text);
        Ok(())
    }

    pub(super) fn send(&self, data: Vec<u8>) -> Result<(), String> {
        match &self.tcp {
            Some(tcp) => tcp.send(data),
            None => {
                Err("send needs a driver with the tcp transport and a module with a host".into())
            }
        }
    }

    /// Sets a status value within the caps (the error names the cap); a change is
    /// announced to the runtime's subscribers (runtime-state sync to the master, and
    /// clients bound to the status).
    pub(super) fn set_status(&self, key: &str, value: Value) -> Result<(), String> {
        if self.shared.set_status(key, value)?
            && let Some(runtime) = self.runtime.upgrade()
        {
            // No subscriber is fine.
            let _ = runtime.status_changes.send(super::StatusChange {
                module_id: self.spec.id.clone(),
                key: key.to_string(),
            });
        }
        Ok(())
    }

    pub(super) fn status(&self, key: &str) -> Option<Value> {
        self.shared.status_value(key)
    }

    pub(super) fn modbus(&self, op: ModbusOp) -> Result<ModbusReply, String> {
        match &self.modbus {
            Some(modbus) => modbus.call(op),
            None => Err(
                "Modbus calls need a driver with the modbus transport and a module with a host"
                    .into(),
            ),
        }
    }

    /// Runs `function` after `ms`, once or every `ms`, through the module's queue, until
    /// the module stops.
    pub(super) fn schedule(&self, ms: i64, function: &str, repeat: bool) -> Result<(), String> {
        if ms < MIN_PERIOD_MS {
            return Err(format!(
                "a schedule needs at least {MIN_PERIOD_MS} ms, not {ms}"
            ));
        }
        use std::sync::atomic::Ordering;
        if self.schedules.fetch_add(1, Ordering::Relaxed) >= MAX_SCHEDULES {
            self.schedules.fetch_sub(1, Ordering::Relaxed);
            return Err(format!(
                "a module may have at most {MAX_SCHEDULES} schedules pending"
            ));
        }
        let period = Duration::from_millis(ms as u64);
        let jobs = self.jobs.clone();
        let cancel = self.cancel.clone();
        let schedules = self.schedules.clone();
        let function = function.to_string();
        // A collector array's poll takes its turn among the live nodes (none: alone).
        let mut array = match (repeat && self.spec.shared_polling, self.runtime.upgrade()) {
            (true, Some(runtime)) => Some(runtime.array_slot.subscribe()),
            _ => None,
        };
        self.handle.spawn(async move {
            loop {
                let wait = match &mut array {
                    Some(slot) => match *slot.borrow_and_update() {
                        Some(slot) => {
                            let now = crate::control::clock::wall_now_ms();
                            let at = crate::control::array::next_poll(slot, ms as u64, now + 1);
                            Duration::from_millis(at - now)
                        }
                        None => period,
                    },
                    None => period,
                };
                let turn_changed = async {
                    match &mut array {
                        Some(slot) => slot.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                    // Another turn: the next poll is computed again (within an interval).
                    true = turn_changed => continue,
                }
                let job = Job::callback(JobKind::Scheduled(function.clone()), Vec::new());
                // A full queue skips this tick rather than pile up work.
                let _ = jobs.try_send(job);
                if !repeat {
                    break;
                }
            }
            schedules.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(())
    }

    /// The control system `system(...)` looks in, and the runtime that reaches it.
    fn system_and_runtime(&self) -> Result<(String, super::Runtime), String> {
        let system = self
            .spec
            .systems
            .first()
            .cloned()
            .ok_or_else(|| format!("module {} is in no control system", self.spec.id))?;
        let runtime = self
            .runtime
            .upgrade()
            .ok_or("the runtime is shutting down")?;
        Ok((system, super::Runtime::from_inner(runtime)))
    }

    /// Calls a method of another module of this module's (first) control system.
    pub(super) fn exec_in_system(
        &self,
        name: &str,
        index: u32,
        method: &str,
        args: Vec<Value>,
    ) -> Result<Value, String> {
        let (system, runtime) = self.system_and_runtime()?;
        // Scripts run on blocking threads, where waiting for the runtime is allowed.
        self.handle
            .block_on(runtime.exec(&system, name, index, method, args))
            .map(|(value, _)| value)
            .map_err(|err: ExecError| format!("{name} {index}.{method}: {err}"))
    }

    /// A status value of another module of this module's control system.
    pub(super) fn status_in_system(
        &self,
        name: &str,
        index: u32,
        key: &str,
    ) -> Result<Value, String> {
        let (system, runtime) = self.system_and_runtime()?;
        // Scripts run on blocking threads, where waiting for the runtime is allowed.
        let status = self
            .handle
            .block_on(runtime.status_from(
                &crate::protocol::ModuleRef::new(system, name, index),
                &super::Origin::local(),
            ))
            .map_err(|err| format!("{name} {index}: {err}"))?;
        Ok(status.get(key).cloned().unwrap_or(Value::Null))
    }
}
