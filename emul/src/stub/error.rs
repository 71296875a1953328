//! Errors of the stub machinery.

use std::io;

use thiserror::Error;

use super::fault::StubFault;

/// Why a stub could not be set up or built.
#[derive(Debug, Error)]
pub enum StubError {
    /// A stub (or a helper) would run past the end of the space reserved
    /// for it; nothing is executed.
    #[error("stub code needs more than the {limit} bytes reserved for it")]
    TooLong {
        /// Bytes reserved.
        limit: usize,
    },
    /// The instruction is empty or longer than the architectural 15 bytes.
    #[error("instruction length {0} is not 1..=15 bytes")]
    BadInsnLength(usize),
    /// The requested start offset leaves no room for any stub.
    #[error("stub start offset {0} is outside the stub's half of the buffer")]
    BadStartOffset(usize),
    /// A rel32 branch or RIP-relative operand cannot reach its target.
    #[error("target {target:#x} is out of rel32 range from {from:#x}")]
    OutOfRange {
        /// Address of the end of the branch or operand.
        from: u64,
        /// Address it must reach.
        target: u64,
    },
    /// A vector run was asked for on a host without XSAVE enabled.
    #[error("the host has no XSAVE support for vector stubs")]
    NoXsave,
    /// The guest XSAVE image would make XRSTOR fault (bits outside XCR0,
    /// compacted or reserved header, reserved MXCSR bits).
    #[error("guest XSAVE image is not a valid standard-format image")]
    BadXsaveImage,
    /// memfd_create, mmap or sigaction failed.
    #[error("{what} failed: {source}")]
    Os {
        /// The call that failed.
        what: &'static str,
        /// Its error.
        #[source]
        source: io::Error,
    },
}

impl StubError {
    pub(crate) fn last_os(what: &'static str) -> Self {
        StubError::Os {
            what,
            source: io::Error::last_os_error(),
        }
    }
}

/// Why [`StubBuf::run`](super::StubBuf::run) did not complete the instruction.
#[derive(Debug, Error)]
pub enum StubRunError {
    /// The stub was refused before running.
    #[error("stub not built: {0}")]
    Build(#[from] StubError),
    /// The instruction raised an exception; the guest should see it.
    #[error("instruction faulted: {0}")]
    Fault(#[from] StubFault),
}
