//! The Rhai sandbox: an engine with resource limits and no file or network access, the
//! host functions of DESIGN.md ("Drivers and modules"), and JSON in and out.
//!
//! Scripts run on blocking threads. A per-thread deadline, checked by Rhai's progress
//! callback, ends a call that runs too long; the operation limit ends a runaway loop even
//! sooner, so one bad script never holds a thread for long.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use rhai::{AST, Array, Dynamic, Engine, EvalAltResult, FnAccess};
use serde_json::Value;

use super::context::ModuleContext;
use super::modbus::{ModbusOp, ModbusReply};

/// Sandbox limits for every driver script.
#[derive(Debug, Clone, Copy)]
pub struct ScriptLimits {
    /// Operations per call (a runaway loop ends here).
    pub max_operations: u64,
    /// Nested function calls.
    pub max_call_levels: usize,
    /// Longest string, in bytes.
    pub max_string_size: usize,
    /// Largest array or map.
    pub max_collection_size: usize,
}

impl Default for ScriptLimits {
    fn default() -> Self {
        ScriptLimits {
            max_operations: 2_000_000,
            max_call_levels: 32,
            max_string_size: 1 << 20,
            max_collection_size: 10_000,
        }
    }
}

/// The callbacks a script may define; not callable as methods.
pub(super) const CALLBACKS: [&str; 4] = ["on_load", "connected", "disconnected", "received"];

thread_local! {
    /// When the call running on this thread must stop.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` with a deadline for the scripts it calls on this thread.
pub(super) fn with_deadline<T>(deadline: Instant, f: impl FnOnce() -> T) -> T {
    let before = DEADLINE.with(|d| d.replace(Some(deadline)));
    let value = f();
    DEADLINE.with(|d| d.set(before));
    value
}

type HostResult<T> = Result<T, Box<EvalAltResult>>;

fn host_error(message: impl Into<String>) -> Box<EvalAltResult> {
    message.into().into()
}

/// JSON to a script value.
pub(super) fn to_dynamic(value: &Value) -> Dynamic {
    rhai::serde::to_dynamic(value).unwrap_or(Dynamic::UNIT)
}

/// A script value to JSON (`()` is `null`).
pub(super) fn to_json(value: &Dynamic) -> Result<Value, String> {
    if value.is_unit() {
        return Ok(Value::Null);
    }
    rhai::serde::from_dynamic(value).map_err(|err| format!("the result is not JSON: {err}"))
}

/// A compiled driver and the engine its host functions are bound to.
pub(super) struct Script {
    /// The engine, with this module's host functions.
    engine: Engine,
    /// The compiled script.
    ast: AST,
}

impl Script {
    /// Compiles `source` for a module; the error names the line.
    /// `compiled` is the same source compiled earlier (warm standby), to skip parsing.
    pub(super) fn compile(
        source: &str,
        compiled: Option<AST>,
        limits: ScriptLimits,
        context: Arc<ModuleContext>,
    ) -> Result<Script, String> {
        let engine = engine(limits, context);
        let ast = match compiled {
            Some(ast) => ast,
            None => engine
                .compile(source)
                .map_err(|err| format!("the script does not compile: {err}"))?,
        };
        Ok(Script { engine, ast })
    }

    /// The arity of a public function, if the script has one by that name.
    pub(super) fn method_arity(&self, name: &str) -> Vec<usize> {
        self.ast
            .iter_functions()
            .filter(|f| f.name == name && f.access != FnAccess::Private)
            .map(|f| f.params.len())
            .collect()
    }

    /// Whether the script defines a function.
    pub(super) fn has_function(&self, name: &str) -> bool {
        self.ast.iter_functions().any(|f| f.name == name)
    }

    /// Calls a function with JSON arguments.
    pub(super) fn call(&self, name: &str, args: &[Value]) -> Result<Value, CallError> {
        let args: Vec<Dynamic> = args.iter().map(to_dynamic).collect();
        let mut scope = rhai::Scope::new();
        let options = rhai::CallFnOptions::new().eval_ast(false);
        let result: Dynamic = self
            .engine
            .call_fn_with_options(options, &mut scope, &self.ast, name, args)
            .map_err(|err| match *err {
                EvalAltResult::ErrorTerminated(..) => CallError::TimedOut(describe(name, &err)),
                _ => CallError::Failed(describe(name, &err)),
            })?;
        to_json(&result).map_err(CallError::Failed)
    }
}

/// Why a script call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum CallError {
    /// It ran past its deadline.
    #[error("{0}")]
    TimedOut(String),
    /// It threw, broke a limit, or returned something that is not JSON.
    #[error("{0}")]
    Failed(String),
}

/// A script error as a user reads it.
fn describe(name: &str, err: &EvalAltResult) -> String {
    match err {
        EvalAltResult::ErrorTooManyOperations(_) => {
            format!("{name} ran past its operation limit (an endless loop?)")
        }
        EvalAltResult::ErrorTerminated(_, _) => format!("{name} ran past its time limit"),
        EvalAltResult::ErrorStackOverflow(_) | EvalAltResult::ErrorTooManyModules(_) => {
            format!("{name} nested too deeply")
        }
        EvalAltResult::ErrorRuntime(value, pos) => {
            format!("{name} threw {value} ({pos})")
        }
        other => format!("{name} failed: {other}"),
    }
}

/// An engine with the limits and this module's host functions.
/// Compiles a driver without a module (warm standby keeps drivers compiled ahead of a
/// takeover); the parse limits are those of [`Script::compile`].
pub(super) fn compile_only(source: &str, limits: ScriptLimits) -> Result<AST, String> {
    base_engine(limits)
        .compile(source)
        .map_err(|err| format!("the script does not compile: {err}"))
}

/// An engine with the sandbox and its limits, but no host functions.
fn base_engine(limits: ScriptLimits) -> Engine {
    let mut engine = Engine::new();
    // No `import` of files: a driver reaches nothing but what the host gives it.
    engine.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    engine.set_max_operations(limits.max_operations);
    engine.set_max_call_levels(limits.max_call_levels);
    engine.set_max_expr_depths(64, 32);
    engine.set_max_string_size(limits.max_string_size);
    engine.set_max_array_size(limits.max_collection_size);
    engine.set_max_map_size(limits.max_collection_size);
    engine.set_max_variables(1_000);
    engine.set_max_functions(1_000);
    engine.on_progress(|_| {
        let late = DEADLINE
            .with(|d| d.get())
            .is_some_and(|d| Instant::now() >= d);
        late.then(|| Dynamic::from("deadline"))
    });
    engine
}

fn engine(limits: ScriptLimits, context: Arc<ModuleContext>) -> Engine {
    let mut engine = base_engine(limits);
    // `print` and `debug` cannot fail: a line over the cap is cut.
    let ctx = context.clone();
    engine.on_print(move |text| ctx.shared.log(text));
    let ctx = context.clone();
    engine.on_debug(move |text, _, _| ctx.shared.log(text));

    let ctx = context.clone();
    engine.register_fn("log", move |text: &str| -> HostResult<()> {
        ctx.log(text).map_err(host_error)
    });
    let ctx = context.clone();
    engine.register_fn("send", move |data: &str| -> HostResult<()> {
        ctx.send(data.as_bytes().to_vec()).map_err(host_error)
    });
    let ctx = context.clone();
    engine.register_fn(
        "status",
        move |key: &str, value: Dynamic| -> HostResult<()> {
            let value = to_json(&value).map_err(host_error)?;
            ctx.set_status(key, value).map_err(host_error)
        },
    );
    let ctx = context.clone();
    engine.register_fn("status", move |key: &str| -> Dynamic {
        ctx.status(key)
            .map(|v| to_dynamic(&v))
            .unwrap_or(Dynamic::UNIT)
    });
    let ctx = context.clone();
    engine.register_fn("setting", move |key: &str| -> Dynamic {
        to_dynamic(&ctx.spec.setting(key))
    });
    let ctx = context.clone();
    engine.register_fn(
        "schedule_every",
        move |ms: i64, function: &str| -> HostResult<()> {
            ctx.schedule(ms, function, true).map_err(host_error)
        },
    );
    let ctx = context.clone();
    engine.register_fn(
        "schedule_in",
        move |ms: i64, function: &str| -> HostResult<()> {
            ctx.schedule(ms, function, false).map_err(host_error)
        },
    );
    register_modbus(&mut engine, &context);
    register_system(&mut engine, &context);
    engine
}

fn modbus_address(value: i64, what: &str) -> HostResult<u16> {
    u16::try_from(value).map_err(|_| host_error(format!("{what} must be 0..=65535, not {value}")))
}

fn register_modbus(engine: &mut Engine, context: &Arc<ModuleContext>) {
    fn words(reply: ModbusReply) -> Array {
        match reply {
            ModbusReply::Words(words) => {
                words.into_iter().map(|w| Dynamic::from(w as i64)).collect()
            }
            ModbusReply::Bits(bits) => bits.into_iter().map(Dynamic::from).collect(),
            ModbusReply::Done => Array::new(),
        }
    }
    type Read = fn(u16, u16) -> ModbusOp;
    let reads: [(&str, Read); 3] = [
        ("read_holding", ModbusOp::ReadHolding),
        ("read_input", ModbusOp::ReadInput),
        ("read_coils", ModbusOp::ReadCoils),
    ];
    for (name, op) in reads {
        let ctx = context.clone();
        engine.register_fn(name, move |addr: i64, count: i64| -> HostResult<Array> {
            let op = op(
                modbus_address(addr, "address")?,
                modbus_address(count, "count")?,
            );
            ctx.modbus(op).map(words).map_err(host_error)
        });
    }
    let ctx = context.clone();
    engine.register_fn(
        "write_register",
        move |addr: i64, value: i64| -> HostResult<()> {
            let op = ModbusOp::WriteRegister(
                modbus_address(addr, "address")?,
                modbus_address(value, "value")?,
            );
            ctx.modbus(op).map(|_| ()).map_err(host_error)
        },
    );
    let ctx = context.clone();
    engine.register_fn(
        "write_coil",
        move |addr: i64, value: bool| -> HostResult<()> {
            let op = ModbusOp::WriteCoil(modbus_address(addr, "address")?, value);
            ctx.modbus(op).map(|_| ()).map_err(host_error)
        },
    );
}

/// Another module of this module's control system, as `system(name, index)` returns it.
#[derive(Clone)]
pub(super) struct SystemModule {
    name: String,
    index: u32,
    context: Arc<ModuleContext>,
}

fn register_system(engine: &mut Engine, context: &Arc<ModuleContext>) {
    engine.register_type_with_name::<SystemModule>("SystemModule");
    let ctx = context.clone();
    engine.register_fn(
        "system",
        move |name: &str, index: i64| -> HostResult<SystemModule> {
            let index = u32::try_from(index)
                .ok()
                .filter(|i| *i >= 1)
                .ok_or_else(|| host_error(format!("a module index starts at 1, not {index}")))?;
            Ok(SystemModule {
                name: name.to_string(),
                index,
                context: ctx.clone(),
            })
        },
    );
    engine.register_fn(
        "exec",
        |target: &mut SystemModule, method: &str, args: Array| -> HostResult<Dynamic> {
            let args = args
                .iter()
                .map(to_json)
                .collect::<Result<Vec<_>, _>>()
                .map_err(host_error)?;
            let value = target
                .context
                .exec_in_system(&target.name, target.index, method, args)
                .map_err(host_error)?;
            Ok(to_dynamic(&value))
        },
    );
    engine.register_fn(
        "exec",
        |target: &mut SystemModule, method: &str| -> HostResult<Dynamic> {
            let value = target
                .context
                .exec_in_system(&target.name, target.index, method, Vec::new())
                .map_err(host_error)?;
            Ok(to_dynamic(&value))
        },
    );
    engine.register_fn(
        "status",
        |target: &mut SystemModule, key: &str| -> HostResult<Dynamic> {
            let value = target
                .context
                .status_in_system(&target.name, target.index, key)
                .map_err(host_error)?;
            Ok(to_dynamic(&value))
        },
    );
}
