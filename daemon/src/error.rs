//! The daemon's error type for requests and build phases: a stable wire code and a short,
//! lowercase message that names what failed ("mounting /dev/loop3 on …: no such device").

use amidala::proto::{ErrorCode, ErrorReply, ValidationError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
    /// The provisioner's exit status, when that is what failed.
    pub exit_status: Option<i32>,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            exit_status: None,
        }
    }

    /// An I/O failure while doing `what`.
    pub fn io(what: impl std::fmt::Display, err: impl std::fmt::Display) -> Failure {
        Failure::new(ErrorCode::Io, format!("{what}: {err}"))
    }

    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(ErrorCode::InvalidArgument, message)
    }

    pub fn reply(&self) -> ErrorReply {
        ErrorReply {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

impl From<ValidationError> for Failure {
    fn from(e: ValidationError) -> Failure {
        Failure::invalid(e.0)
    }
}

/// Runs blocking work off the async runtime; a panic in it becomes an internal error.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(Failure::new(
            ErrorCode::Internal,
            format!("worker task failed: {e}"),
        ))
    })
}
