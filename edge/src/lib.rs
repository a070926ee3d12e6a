//! `tether-edge`: one per site; runs the site's modules and keeps a link to the master.
//! A library too, so that `tether-master demo` can start edges from its own binary.
#![forbid(unsafe_code)]

mod api;
mod code;
mod control;
mod pair;
mod proxy;
mod replica;
mod server;
mod sync;

pub use server::run;
