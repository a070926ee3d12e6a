//! What a module instance is built from: its record, its driver's record and script, the
//! settings that result. Two equal specs mean the running instance can stay; specs that
//! differ in the script alone mean a reload in place; any other difference (new host,
//! port, settings) means a restart.

use std::sync::Arc;

use serde_json::Value;

use crate::code::Code;
use crate::model::{DriverRecord, Model, ModuleRecord, Settings, Transport};

/// Everything a module instance depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSpec {
    /// Module id.
    pub id: String,
    /// Driver id.
    pub driver_id: String,
    /// The script.
    pub source: Arc<str>,
    /// Transport.
    pub transport: Transport,
    /// Device host and port (`None` when the module names no host).
    pub address: Option<(String, u16)>,
    /// `tcp` framing: delimiter.
    pub delimiter: Option<Vec<u8>>,
    /// `tcp` framing: fixed length.
    pub frame_length: Option<usize>,
    /// The driver's defaults overlaid by the module's settings.
    pub settings: Settings,
    /// Requests run at once.
    pub concurrency: usize,
    /// How long a request may run.
    pub timeout_ms: u64,
    /// The systems listing this module, by id (`system(...)` looks in the first).
    pub systems: Vec<String>,
    /// A collector array's driver: its `schedule_every` polls take turns with the other
    /// live nodes of its site pair.
    pub shared_polling: bool,
}

impl ModuleSpec {
    /// The spec of `module`, with its driver's script from `code`; an error says why
    /// there is none (no such driver, or its code is not here).
    pub fn new(model: &Model, code: &Code, module: &ModuleRecord) -> Result<ModuleSpec, String> {
        let driver: &DriverRecord = model
            .drivers
            .get(&module.driver)
            .ok_or_else(|| format!("there is no driver {}", module.driver))?;
        let source = code
            .source(&driver.repository, &driver.file)
            .map_err(|err| format!("driver {}: {err}", driver.id))?;
        let mut settings = driver.default_settings.clone();
        for (key, value) in &module.settings {
            settings.insert(key.clone(), value.clone());
        }
        let port = module.port.or(driver.default_port);
        let address = match (&module.host, port) {
            (Some(host), Some(port)) => Some((host.clone(), port)),
            _ => None,
        };
        Ok(ModuleSpec {
            id: module.id.clone(),
            driver_id: driver.id.clone(),
            source,
            transport: driver.transport,
            address,
            delimiter: driver.delimiter.as_ref().map(|d| d.as_bytes().to_vec()),
            frame_length: driver.frame_length.map(|n| n as usize),
            settings,
            concurrency: driver.concurrency.max(1) as usize,
            timeout_ms: driver.timeout_ms,
            systems: model.systems_of(&module.id).map(|s| s.id.clone()).collect(),
            shared_polling: driver.shared_polling,
        })
    }

    /// Whether `other` is this spec with (at most) another script: a reload in place
    /// brings a running module from one to the other.
    pub fn same_but_source(&self, other: &ModuleSpec) -> bool {
        let mut with_other_source = self.clone();
        with_other_source.source = other.source.clone();
        with_other_source == *other
    }

    /// A setting, or `Null`.
    pub fn setting(&self, key: &str) -> Value {
        self.settings.get(key).cloned().unwrap_or(Value::Null)
    }
}
