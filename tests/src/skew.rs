//! A server whose wall clock is off: libfaketime (Debian's `faketime` package;
//! `TETHER_FAKETIME` names another library) preloaded into its process with a fixed
//! offset. Only the wall clock moves: the monotonic clock is left alone, as it is on a
//! machine whose clock was set wrong or drifted without NTP.

use std::path::PathBuf;

/// Where Debian and others put the library (its thread-safe build).
const CANDIDATES: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
];

/// The library: `TETHER_FAKETIME`, else the package's; panics naming the package.
pub fn library() -> PathBuf {
    if let Some(path) = std::env::var_os("TETHER_FAKETIME") {
        return PathBuf::from(path);
    }
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .expect(
            "libfaketime is missing: install Debian's faketime package (bash .ci/run does), \
             or name the library in TETHER_FAKETIME",
        )
}

/// The environment that sets a process's wall clock `offset_s` seconds off (none for 0).
pub fn wall_clock_off_by(offset_s: i64) -> Vec<(String, String)> {
    if offset_s == 0 {
        return Vec::new();
    }
    vec![
        ("LD_PRELOAD".into(), library().display().to_string()),
        ("FAKETIME".into(), format!("{offset_s:+}s")),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}
