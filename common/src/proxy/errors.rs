//! Errors across a link: a runtime error travels as a wire error with the same kind and
//! message, and comes back as the same runtime error on the other side.

use crate::link::LinkError;
use crate::protocol::{ErrorCode, RemoteError};
use crate::runtime::ExecError;

/// A runtime error as the wire carries it.
pub fn to_remote(err: ExecError) -> RemoteError {
    let code = match &err {
        ExecError::NotFound(_) => ErrorCode::NotFound,
        ExecError::NotHere(_) => ErrorCode::NotHere,
        ExecError::Faulted(_) => ErrorCode::Faulted,
        ExecError::Busy(_) => ErrorCode::Busy,
        ExecError::Unavailable(_) => ErrorCode::Unavailable,
        ExecError::Timeout(_) => ErrorCode::Timeout,
        ExecError::BadArgs(_) => ErrorCode::BadRequest,
        ExecError::Script(_) => ErrorCode::Script,
        ExecError::StaleEpoch(_) => ErrorCode::StaleEpoch,
        ExecError::Forbidden(_) => ErrorCode::Forbidden,
        ExecError::Waiting(_) => ErrorCode::Waiting,
    };
    RemoteError::new(code, err.to_string())
}

/// A wire error as a runtime error.
pub fn from_remote(err: RemoteError) -> ExecError {
    let message = err.message;
    match err.code {
        ErrorCode::NotFound => ExecError::NotFound(message),
        ErrorCode::NotHere => ExecError::NotHere(message),
        ErrorCode::Faulted => ExecError::Faulted(message),
        ErrorCode::Busy => ExecError::Busy(message),
        ErrorCode::Timeout => ExecError::Timeout(message),
        ErrorCode::BadRequest => ExecError::BadArgs(message),
        ErrorCode::Script | ErrorCode::Internal => ExecError::Script(message),
        ErrorCode::StaleEpoch => ExecError::StaleEpoch(message),
        ErrorCode::Forbidden => ExecError::Forbidden(message),
        ErrorCode::Waiting => ExecError::Waiting(message),
        ErrorCode::Unavailable | ErrorCode::Unsupported | ErrorCode::TooLarge => {
            ExecError::Unavailable(message)
        }
    }
}

/// A failed request on the link to `peer` as a runtime error: the peer's own error as it
/// was, a closed link as unreachable (503), no answer in time as a timeout (504).
pub fn from_link(peer: &str, err: LinkError) -> ExecError {
    match err {
        LinkError::Remote(remote) => from_remote(remote),
        LinkError::Closed(reason) => {
            ExecError::Unavailable(format!("{peer} is unreachable: the link closed ({reason})"))
        }
        LinkError::Timeout(after) => ExecError::Timeout(format!(
            "{peer} did not answer within {} ms",
            after.as_millis()
        )),
        LinkError::Overflow => ExecError::Unavailable(format!(
            "the answer from {peer} came faster than it was read"
        )),
        LinkError::TooLarge(message) => ExecError::BadArgs(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_runtime_error_crosses_the_wire_unchanged() {
        let all = [
            ExecError::NotFound("a".into()),
            ExecError::NotHere("b".into()),
            ExecError::Faulted("c".into()),
            ExecError::Busy("d".into()),
            ExecError::Unavailable("e".into()),
            ExecError::Timeout("f".into()),
            ExecError::BadArgs("g".into()),
            ExecError::Script("h".into()),
            ExecError::StaleEpoch("i".into()),
            ExecError::Forbidden("j".into()),
            ExecError::Waiting("k".into()),
        ];
        for err in all {
            assert_eq!(from_remote(to_remote(err.clone())), err);
        }
    }

    #[test]
    fn a_closed_link_is_unreachable_and_a_late_one_a_timeout() {
        let closed = from_link("edge site-1", LinkError::Closed("reset".into()));
        assert!(
            matches!(&closed, ExecError::Unavailable(m) if m.contains("edge site-1 is unreachable"))
        );
        let late = from_link(
            "the master",
            LinkError::Timeout(std::time::Duration::from_millis(1500)),
        );
        assert!(matches!(&late, ExecError::Timeout(m) if m.contains("1500 ms")));
    }
}
