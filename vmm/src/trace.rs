//! `--trace FILE`: one JSON object per exit. Formatting happens only when a
//! trace file was asked for; the writer is buffered and allocation-free per
//! line.
//!
//! A failed write (a full disk, `/dev/full`) is reported once, as an error
//! on stderr, and ends the trace: later lines are not attempted, so the file
//! holds a prefix of whole lines.

use crate::kvm::run_page::{Exit, ExitReason};
use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use kvm_bindings::{kvm_regs, kvm_sregs};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

struct TraceFile {
    out: BufWriter<File>,
    name: String,
    /// The first write error; nothing is written after it.
    failed: Option<String>,
}

impl TraceFile {
    fn note(&mut self, r: std::io::Result<()>) {
        if let Err(e) = r {
            let msg = format!(
                "--trace {}: write failed: {e}; the trace ends here",
                self.name
            );
            log::error!("{msg}");
            self.failed = Some(msg);
        }
    }
}

/// Shared by every vCPU thread; one line is written under the lock.
#[derive(Clone)]
pub struct Tracer(Arc<Mutex<TraceFile>>);

/// What the trace line says about an exit, copied out of the run page before
/// the exit is served (for an `in`, `data` is filled in after).
#[derive(Clone, Copy)]
pub struct TraceRecord {
    pub reason: ExitReason,
    pub addr: u64,
    pub size: usize,
    pub count: usize,
    pub data: [u8; 8],
    /// RIP when the exit happened.
    pub rip: u64,
    /// The code size the instruction bytes decode at (16, 32 or 64).
    pub bitness: u32,
    /// The instruction bytes KVM reported for an emulation exit.
    pub insn: [u8; 15],
    pub insn_len: usize,
}

impl TraceRecord {
    pub fn of(exit: &Exit<'_>) -> Self {
        let mut r = TraceRecord {
            reason: exit.reason(),
            addr: 0,
            size: 0,
            count: 0,
            data: [0; 8],
            rip: 0,
            bitness: 64,
            insn: [0; 15],
            insn_len: 0,
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
            Exit::EmulationFailure { bytes, len } => {
                r.insn = *bytes;
                r.insn_len = (*len).min(15);
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

    /// Records RIP and the code size from the registers at the exit.
    pub fn set_regs(&mut self, regs: &kvm_regs, sregs: &kvm_sregs) {
        const CR0_PE: u64 = 1;
        const EFER_LMA: u64 = 1 << 10;
        self.rip = regs.rip;
        self.bitness = if sregs.cr0 & CR0_PE == 0 {
            16
        } else if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
            64
        } else if sregs.cs.db != 0 {
            32
        } else {
            16
        };
    }

    /// The mnemonic of the reported instruction bytes and the instruction's
    /// length (`Invalid` and all the bytes when they do not decode, e.g. cut
    /// short).
    pub fn decode(&self) -> (Mnemonic, usize) {
        let bytes = &self.insn[..self.insn_len];
        let mut d = Decoder::with_ip(self.bitness, bytes, self.rip, DecoderOptions::NONE);
        let insn = d.decode();
        if insn.is_invalid() {
            (Mnemonic::INVALID, self.insn_len)
        } else {
            (insn.mnemonic(), insn.len())
        }
    }
}

/// A mnemonic in lower case, formatted without allocating.
struct LowerMnemonic(Mnemonic);

impl fmt::Display for LowerMnemonic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Lower<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl fmt::Write for Lower<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                s.chars()
                    .try_for_each(|c| fmt::Write::write_char(self.0, c.to_ascii_lowercase()))
            }
        }
        fmt::write(&mut Lower(f), format_args!("{:?}", self.0))
    }
}

/// Instruction bytes as hex pairs, formatted without allocating.
struct HexBytes<'a>(&'a [u8]);

impl fmt::Display for HexBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Tracer {
    pub fn create(path: &Path) -> std::io::Result<Tracer> {
        Ok(Tracer(Arc::new(Mutex::new(TraceFile {
            out: BufWriter::new(File::create(path)?),
            name: path.display().to_string(),
            failed: None,
        }))))
    }

    pub fn write(&self, vcpu: u8, rec: &TraceRecord, ns: u64) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if t.failed.is_some() {
            return;
        }
        let w = &mut t.out;
        let value = u64::from_le_bytes(rec.data);
        let rip = rec.rip;
        let reason = rec.reason.name();
        let (addr_key, dir) = match rec.reason {
            ExitReason::IoIn => ("port", "in"),
            ExitReason::IoOut => ("port", "out"),
            ExitReason::MmioRead => ("addr", "read"),
            ExitReason::MmioWrite => ("addr", "write"),
            ExitReason::Emulation => {
                let (mnemonic, len) = rec.decode();
                let r = writeln!(
                    w,
                    r#"{{"vcpu":{vcpu},"reason":"{reason}","rip":{rip},"mnemonic":"{}","bytes":"{}","ns":{ns}}}"#,
                    LowerMnemonic(mnemonic),
                    HexBytes(&rec.insn[..len]),
                );
                return t.note(r);
            }
            _ => {
                let r = writeln!(
                    w,
                    r#"{{"vcpu":{vcpu},"reason":"{reason}","rip":{rip},"ns":{ns}}}"#
                );
                return t.note(r);
            }
        };
        let r = writeln!(
            w,
            r#"{{"vcpu":{vcpu},"reason":"{reason}","{addr_key}":{},"size":{},"count":{},"direction":"{dir}","data":{value},"rip":{rip},"ns":{ns}}}"#,
            rec.addr, rec.size, rec.count,
        );
        t.note(r);
    }

    /// Flushes the file; `Err` names the first write that failed, if any.
    pub fn flush(&self) -> Result<(), String> {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if t.failed.is_none() {
            let r = t.out.flush();
            t.note(r);
        }
        match &t.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulation_record_names_rip_mnemonic_and_bytes() {
        let mut bytes = [0u8; 15];
        // vmovdqu ymm0, [rax]
        bytes[..4].copy_from_slice(&[0xc5, 0xfe, 0x6f, 0x00]);
        let mut rec = TraceRecord::of(&Exit::EmulationFailure { bytes, len: 15 });
        let mut regs = kvm_regs::default();
        let mut sregs = kvm_sregs::default();
        regs.rip = 0x10_0040;
        sregs.cr0 = 1;
        sregs.efer = 1 << 10;
        sregs.cs.l = 1;
        rec.set_regs(&regs, &sregs);
        assert_eq!(rec.decode(), (Mnemonic::Vmovdqu, 4));
        assert_eq!(LowerMnemonic(Mnemonic::Vmovdqu).to_string(), "vmovdqu");
        assert_eq!(HexBytes(&rec.insn[..4]).to_string(), "c5 fe 6f 00");
        let dir = std::env::temp_dir().join(format!("vmm-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        let t = Tracer::create(&path).unwrap();
        t.write(0, &rec, 5);
        t.flush().unwrap();
        let line = std::fs::read_to_string(&path).unwrap();
        assert!(
            line.contains(r#""rip":1048640,"mnemonic":"vmovdqu","bytes":"c5 fe 6f 00","#),
            "{line}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_write_is_reported_and_ends_the_trace() {
        let t = Tracer::create(Path::new("/dev/full")).unwrap();
        let rec = TraceRecord::of(&Exit::Hlt);
        // Enough lines to fill the buffer: the write fails, later ones are
        // not attempted, and the flush reports the first failure.
        for _ in 0..2000 {
            t.write(0, &rec, 1);
        }
        let e = t.flush().unwrap_err();
        assert!(e.contains("/dev/full") && e.contains("write failed"), "{e}");
    }
}
