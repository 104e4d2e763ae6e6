//! The one mapping from engine errors to gRPC statuses.

use engine::EngineError;
use tonic::{Code, Status};

/// What the server knows beyond the error itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EngineState {
    /// The engine serves (or the server is draining on purpose).
    Up,
    /// Not shutting down, yet the engine cannot generate: its step loop died.
    Dead,
}

/// The proto name of a field the engine names after its own types (`prompt.text` is the
/// request's `text`).
pub(crate) fn proto_field(field: &str) -> &str {
    match field {
        "prompt.text" => "text",
        "prompt.token_ids" => "token_ids",
        "prompt.messages" => "messages",
        "prompt.messages.role" => "messages.role",
        other => other,
    }
}

/// The status a client gets for `err`.
///
/// | engine error | code |
/// | --- | --- |
/// | `InvalidArgument` | `INVALID_ARGUMENT`, the message names the field as the proto does |
/// | `Overloaded` | `UNAVAILABLE` (retry later) |
/// | `Unavailable` | `UNAVAILABLE` while shutting down; `INTERNAL` when the step loop died |
/// | `DuplicateId` | `ALREADY_EXISTS` |
/// | `Internal`, `Startup` | `INTERNAL` |
/// | `DeadlineExceeded` | `DEADLINE_EXCEEDED` |
pub(crate) fn to_status(err: &EngineError, state: EngineState) -> Status {
    let code = match err {
        EngineError::InvalidArgument { .. } => Code::InvalidArgument,
        EngineError::Overloaded(_) => Code::Unavailable,
        EngineError::Unavailable(_) => match state {
            EngineState::Up => Code::Unavailable,
            EngineState::Dead => Code::Internal,
        },
        EngineError::DuplicateId(_) => Code::AlreadyExists,
        EngineError::Startup(_) | EngineError::Internal(_) => Code::Internal,
        EngineError::DeadlineExceeded => Code::DeadlineExceeded,
    };
    let message = match err {
        EngineError::InvalidArgument { field, reason } => {
            format!("invalid {}: {reason}", proto_field(field))
        }
        other => other.to_string(),
    };
    Status::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_engine_error_has_its_code() {
        let cases = [
            (
                EngineError::InvalidArgument {
                    field: "sampling.top_p",
                    reason: "must be in (0, 1]".into(),
                },
                Code::InvalidArgument,
            ),
            (EngineError::Overloaded(3), Code::Unavailable),
            (EngineError::Unavailable("x".into()), Code::Unavailable),
            (EngineError::DuplicateId("a".into()), Code::AlreadyExists),
            (EngineError::Startup("x".into()), Code::Internal),
            (EngineError::Internal("x".into()), Code::Internal),
            (EngineError::DeadlineExceeded, Code::DeadlineExceeded),
        ];
        for (err, code) in cases {
            assert_eq!(to_status(&err, EngineState::Up).code(), code, "{err:?}");
        }
        let s = to_status(
            &EngineError::InvalidArgument {
                field: "sampling.top_p",
                reason: "must be in (0, 1]".into(),
            },
            EngineState::Up,
        );
        assert!(s.message().contains("sampling.top_p"), "{}", s.message());
        let s = to_status(
            &EngineError::InvalidArgument {
                field: "prompt.messages.role",
                reason: "message 0 has role \"x\"".into(),
            },
            EngineState::Up,
        );
        assert!(
            s.message().starts_with("invalid messages.role: "),
            "{}",
            s.message()
        );
        let dead = to_status(&EngineError::Unavailable("x".into()), EngineState::Dead);
        assert_eq!(dead.code(), Code::Internal);
    }
}
