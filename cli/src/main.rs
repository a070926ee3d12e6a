//! `tether`: the client API from a shell (see the library's documentation).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    tether_cli::main_from(std::env::args_os())
}
