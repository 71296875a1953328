//! Decoding the `kvm_run` page after KVM_RUN returns.
//!
//! kvm-ioctls' `VcpuExit` hides fields the VMM needs (the size and count of
//! string I/O, the emulation-failure bytes), so the run loop reads the page
//! itself. This module holds the `unsafe` union reads, each justified by the
//! exit reason the kernel wrote.

use kvm_bindings::{
    kvm_run, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_HLT, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_INTR,
    KVM_EXIT_IO, KVM_EXIT_IO_OUT, KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN, KVM_EXIT_SYSTEM_EVENT,
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};

/// One exit, borrowed from the run page.
pub enum Exit<'a> {
    /// Port I/O: `count` items of `size` bytes in `data` (string I/O has
    /// count > 1).
    Io {
        port: u16,
        size: usize,
        out: bool,
        data: &'a mut [u8],
    },
    Mmio {
        addr: u64,
        write: bool,
        data: &'a mut [u8],
    },
    Hlt,
    Shutdown,
    /// KVM's emulator gave up; `bytes[..len]` are what KVM fetched at RIP
    /// (`len` 0 when it supplied none). `len` is not the instruction length.
    EmulationFailure {
        bytes: [u8; 15],
        len: usize,
    },
    InternalError {
        suberror: u32,
    },
    FailEntry {
        reason: u64,
    },
    SystemEvent {
        kind: u32,
    },
    /// A signal interrupted KVM_RUN (or `immediate_exit` was set).
    Intr,
    Other(u32),
}

impl Exit<'_> {
    /// A short name per exit reason (trace and stats keys).
    pub fn reason(&self) -> ExitReason {
        match self {
            Exit::Io { out: true, .. } => ExitReason::IoOut,
            Exit::Io { out: false, .. } => ExitReason::IoIn,
            Exit::Mmio { write: true, .. } => ExitReason::MmioWrite,
            Exit::Mmio { write: false, .. } => ExitReason::MmioRead,
            Exit::Hlt => ExitReason::Hlt,
            Exit::Shutdown => ExitReason::Shutdown,
            Exit::EmulationFailure { .. } => ExitReason::Emulation,
            Exit::InternalError { .. } => ExitReason::InternalError,
            Exit::FailEntry { .. } => ExitReason::FailEntry,
            Exit::SystemEvent { .. } => ExitReason::SystemEvent,
            Exit::Intr => ExitReason::Intr,
            Exit::Other(_) => ExitReason::Other,
        }
    }
}

/// Exit reasons as counted by `--stats` and named by `--trace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExitReason {
    IoOut,
    IoIn,
    MmioWrite,
    MmioRead,
    Emulation,
    Hlt,
    Shutdown,
    InternalError,
    FailEntry,
    SystemEvent,
    Intr,
    Other,
}

impl ExitReason {
    pub const ALL: [ExitReason; 12] = [
        ExitReason::IoOut,
        ExitReason::IoIn,
        ExitReason::MmioWrite,
        ExitReason::MmioRead,
        ExitReason::Emulation,
        ExitReason::Hlt,
        ExitReason::Shutdown,
        ExitReason::InternalError,
        ExitReason::FailEntry,
        ExitReason::SystemEvent,
        ExitReason::Intr,
        ExitReason::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitReason::IoOut => "io-out",
            ExitReason::IoIn => "io-in",
            ExitReason::MmioWrite => "mmio-write",
            ExitReason::MmioRead => "mmio-read",
            ExitReason::Emulation => "emulation",
            ExitReason::Hlt => "hlt",
            ExitReason::Shutdown => "shutdown",
            ExitReason::InternalError => "internal-error",
            ExitReason::FailEntry => "fail-entry",
            ExitReason::SystemEvent => "system-event",
            ExitReason::Intr => "intr",
            ExitReason::Other => "other",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Decodes the exit KVM just reported in `run`.
pub fn decode(run: &mut kvm_run) -> Exit<'_> {
    match run.exit_reason {
        KVM_EXIT_IO => {
            // SAFETY: exit_reason says the kernel filled the `io` member.
            let io = unsafe { run.__bindgen_anon_1.io };
            let size = usize::from(io.size);
            let len = size * io.count as usize;
            let page = run as *mut kvm_run as *mut u8;
            // SAFETY: the kernel places the I/O data at `data_offset` inside
            // the mmap'd run page (one page, `len` <= page size), which lives
            // as long as the vCPU and is borrowed mutably through `run`.
            let data =
                unsafe { std::slice::from_raw_parts_mut(page.add(io.data_offset as usize), len) };
            Exit::Io {
                port: io.port,
                size,
                out: u32::from(io.direction) == KVM_EXIT_IO_OUT,
                data,
            }
        }
        KVM_EXIT_MMIO => {
            // SAFETY: exit_reason says the kernel filled the `mmio` member.
            let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
            let len = (mmio.len as usize).min(mmio.data.len());
            Exit::Mmio {
                addr: mmio.phys_addr,
                write: mmio.is_write != 0,
                data: &mut mmio.data[..len],
            }
        }
        KVM_EXIT_HLT => Exit::Hlt,
        KVM_EXIT_SHUTDOWN => Exit::Shutdown,
        KVM_EXIT_INTR => Exit::Intr,
        KVM_EXIT_INTERNAL_ERROR => {
            // SAFETY: exit_reason says the kernel filled `internal`, whose
            // leading `suberror` is shared with `emulation_failure`.
            let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
            if suberror != KVM_INTERNAL_ERROR_EMULATION {
                return Exit::InternalError { suberror };
            }
            // SAFETY: suberror EMULATION means the kernel used the
            // `emulation_failure` layout.
            let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
            let mut bytes = [0u8; 15];
            let mut len = 0;
            // `ndata` counts the u64 words after suberror/ndata: flags and
            // then the 16-byte insn_size/insn_bytes block.
            if ef.ndata >= 3
                && ef.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
            {
                // SAFETY: the flag says the instruction bytes are present.
                let insn = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
                len = usize::from(insn.insn_size).min(15);
                bytes = insn.insn_bytes;
            }
            Exit::EmulationFailure { bytes, len }
        }
        KVM_EXIT_FAIL_ENTRY => {
            // SAFETY: exit_reason says the kernel filled `fail_entry`.
            let reason = unsafe {
                run.__bindgen_anon_1
                    .fail_entry
                    .hardware_entry_failure_reason
            };
            Exit::FailEntry { reason }
        }
        KVM_EXIT_SYSTEM_EVENT => {
            // SAFETY: exit_reason says the kernel filled `system_event`.
            let kind = unsafe { run.__bindgen_anon_1.system_event.type_ };
            Exit::SystemEvent { kind }
        }
        other => Exit::Other(other),
    }
}
