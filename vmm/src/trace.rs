//! `--trace FILE`: one JSON object per exit. Formatting happens only when a
//! trace file was asked for; the writer is buffered and allocation-free per
//! line.

use crate::kvm::run_page::{Exit, ExitReason};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Shared by every vCPU thread; one line is written under the lock.
#[derive(Clone)]
pub struct Tracer(Arc<Mutex<BufWriter<File>>>);

/// What the trace line says about an exit, copied out of the run page before
/// the exit is served (for an `in`, `data` is filled in after).
#[derive(Clone, Copy)]
pub struct TraceRecord {
    pub reason: ExitReason,
    pub addr: u64,
    pub size: usize,
    pub count: usize,
    pub data: [u8; 8],
}

impl TraceRecord {
    pub fn of(exit: &Exit<'_>) -> Self {
        let mut r = TraceRecord {
            reason: exit.reason(),
            addr: 0,
            size: 0,
            count: 0,
            data: [0; 8],
        };
        match exit {
            Exit::Io {
                port, size, data, ..
            } => {
                r.addr = u64::from(*port);
                r.size = *size;
                r.count = data.len().checked_div(*size).unwrap_or(0);
                r.set_data(data);
            }
            Exit::Mmio { addr, data, .. } => {
                r.addr = *addr;
                r.size = data.len();
                r.count = 1;
                r.set_data(data);
            }
            _ => {}
        }
        r
    }

    pub fn set_data(&mut self, data: &[u8]) {
        let n = data.len().min(8);
        self.data = [0; 8];
        self.data[..n].copy_from_slice(&data[..n]);
    }
}

impl Tracer {
    pub fn create(path: &Path) -> std::io::Result<Tracer> {
        Ok(Tracer(Arc::new(Mutex::new(BufWriter::new(File::create(
            path,
        )?)))))
    }

    pub fn write(&self, vcpu: u8, rec: &TraceRecord, ns: u64) {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let value = u64::from_le_bytes(rec.data);
        let (addr_key, dir) = match rec.reason {
            ExitReason::IoIn => ("port", "in"),
            ExitReason::IoOut => ("port", "out"),
            ExitReason::MmioRead => ("addr", "read"),
            ExitReason::MmioWrite => ("addr", "write"),
            _ => {
                let _ = writeln!(
                    w,
                    r#"{{"vcpu":{vcpu},"reason":"{}","ns":{ns}}}"#,
                    rec.reason.name()
                );
                return;
            }
        };
        let _ = writeln!(
            w,
            r#"{{"vcpu":{vcpu},"reason":"{}","{addr_key}":{},"size":{},"count":{},"direction":"{dir}","data":{value},"ns":{ns}}}"#,
            rec.reason.name(),
            rec.addr,
            rec.size,
            rec.count,
        );
    }

    pub fn flush(&self) {
        let _ = self.0.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}
