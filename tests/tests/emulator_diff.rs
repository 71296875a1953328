//! Differential coverage of the VMM's instruction completion (issues 4, 9
//! and 10): every instruction form with a memory operand that this host
//! runs, generated from iced-x86's tables whatever the emulator's
//! allow-list says, run natively at CPL 3 (the ground truth) and three ways
//! the VMM completes it (CPL 3 with an MMIO operand; CPL 0, interpreted by
//! PVM, with a RAM and with an MMIO operand). Results are compared field by
//! field; each form comes out bit-exact, a PVM quirk, KVM-owned (KVM's own
//! emulator produced the difference), refused by the VMM (with its reason:
//! the VM runs with `--on-unsupported ud`) or failed. Only `fail` fails the
//! test. See guest/src/diff/.

mod common;

use emul::stub::probe::Deviation;
use emul::stub::ItsMode;
use guest::diff::program::{self, Chunk, LOAD_ADDR};
use guest::diff::record::{self, Field, NO_EXCEPTION};
use guest::diff::{self, Form, Skip, Way};
use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter, Mnemonic};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use vmm::boot::EntryMode;
use vmm::config::VmConfig;
use vmm::kvm::cpuid::CpuModel;
use vmm::loader::ImageFormat;
use vmm::vcpu::OnUnsupported;

/// Forms per VM: small enough for the image to fit below the kernel's
/// stacks, large enough that VM start-up does not dominate.
const CHUNK: usize = 400;
/// VMs run side by side (each is one vCPU thread).
const THREADS: usize = 2;
/// Forms a chunk may lose to VM stops before the test gives up on it (a
/// form that breaks the harness shows up as a stop in the forms after it).
const MAX_STOPS: usize = 16;
/// Mismatches printed in full.
const SHOW: usize = 12;

/// Forms known to differ: (instruction text prefix, ways, reason). Each is
/// reported in the summary; none may be dropped silently.
const KNOWN_FAILURES: &[(&str, &[&str], &str)] = &[
    // KVM's in-kernel emulator runs these itself (register forms at CPL 0,
    // integer MMIO forms), so the VMM never sees them.
    (
        "lzcnt ",
        &["a", "b1", "b2"],
        "KVM's emulator runs F3 0F BD as BSR (ignores the F3 prefix)",
    ),
    (
        "tzcnt ",
        &["a", "b1", "b2"],
        "KVM's emulator runs F3 0F BC as BSF (ignores the F3 prefix)",
    ),
    (
        "cmpxchg ecx,edx",
        &["b1", "b2"],
        "KVM's emulator zero-extends the 32-bit destination of a failed CMPXCHG",
    ),
    // Misaligned FXSAVE/FXRSTOR on MMIO at CPL 3 come back as #UD without
    // reaching the VMM (no refusal logged; the VMM never completes them),
    // where natively FXRSTOR raises #GP(0) and FXSAVE completes (PVM).
    // Seen on the AMD EPYC host, 2026-11.
    (
        "fxsave [rbp+8]",
        &["a"],
        "KVM answers a misaligned FXSAVE/FXRSTOR on MMIO at CPL 3 with #UD, without an exit",
    ),
    (
        "fxsave64 [rbp+8]",
        &["a"],
        "KVM answers a misaligned FXSAVE/FXRSTOR on MMIO at CPL 3 with #UD, without an exit",
    ),
    (
        "fxrstor [rbp+8]",
        &["a"],
        "KVM answers a misaligned FXSAVE/FXRSTOR on MMIO at CPL 3 with #UD, without an exit",
    ),
    (
        "fxrstor64 [rbp+8]",
        &["a"],
        "KVM answers a misaligned FXSAVE/FXRSTOR on MMIO at CPL 3 with #UD, without an exit",
    ),
    (
        "movbe ",
        &["a", "b1", "b2"],
        "KVM's emulator injects #UD for MOVBE: PVM's KVM leaves MOVBE out of its supported CPUID, which masks the guest's",
    ),
];

/// Forms where PVM's native result departs from the SDM and the VMM
/// follows the SDM: (instruction text prefix, native vector, the VMM's
/// vector and error code). Misaligned aligned-only operands are matched by
/// `Form::misaligned` instead.
const PVM_QUIRKS: &[(&str, u64, u64, u64)] = &[
    // Reserved MXCSR bits: #GP(0) per the SDM, #UD natively under PVM.
    ("ldmxcsr ", 6, 13, 0),
    ("vldmxcsr ", 6, 13, 0),
];

/// Forms where QEMU's TCG (the CPU of the hardware-KVM lane,
/// scripts/hwkvm) departs from the SDM natively while KVM's emulator or the
/// VMM follow it: (instruction text prefix, the departure the start-up
/// probe must have found, reason). Only on TCG, and only with that finding.
const TCG_DEFECTS: &[(&str, Deviation, &str)] = &[
    (
        "fnstenv ",
        Deviation::StaleFip,
        "QEMU TCG's FNSTENV/FNSAVE store its own last FIP/FOP, not the state XRSTOR loaded",
    ),
    (
        "fnsave ",
        Deviation::StaleFip,
        "QEMU TCG's FNSTENV/FNSAVE store its own last FIP/FOP, not the state XRSTOR loaded",
    ),
    (
        "test ",
        Deviation::TestAliasUd,
        "QEMU TCG raises #UD for TEST's F6/F7 /1 alias natively; KVM's emulator runs it on MMIO",
    ),
    (
        "ldmxcsr ",
        Deviation::MxcsrReservedAccepted,
        "QEMU TCG's LDMXCSR accepts reserved bits in the stub, so the guest's MXCSR becomes one KVM_SET_XSAVE refuses (EINVAL) and the VM stops",
    ),
    (
        "vldmxcsr ",
        Deviation::MxcsrReservedAccepted,
        "QEMU TCG's LDMXCSR accepts reserved bits in the stub, so the guest's MXCSR becomes one KVM_SET_XSAVE refuses (EINVAL) and the VM stops",
    ),
];

fn host_cpu() -> &'static emul::stub::probe::HostCpu {
    static CPU: std::sync::OnceLock<emul::stub::probe::HostCpu> = std::sync::OnceLock::new();
    CPU.get_or_init(|| emul::stub::probe::probe().expect("CPU probes run"))
}

/// The TCG defect that explains a mismatch of `text`, if the host is TCG
/// and the probe found that departure.
fn tcg_defect(text: &str) -> Option<&'static str> {
    let cpu = host_cpu();
    if !cpu.is_tcg() {
        return None;
    }
    TCG_DEFECTS
        .iter()
        .find(|(prefix, d, _)| text.starts_with(prefix) && cpu.has(*d))
        .map(|(_, _, why)| *why)
}

fn allow(i: &iced_x86::Instruction) -> Result<bool, &'static str> {
    emul::classify::classify(i).map(|c| c.vector)
}

/// An instruction the VMM refused (and answered with #UD), from its log.
#[derive(Debug, Clone)]
struct Refusal {
    rip: u64,
    /// The instruction as the VMM formatted it.
    insn: String,
    /// The VMM's reason.
    reason: String,
}

/// Collects the VMM's "unsupported ... injecting #UD" warnings: with
/// `--on-unsupported ud` they are the only trace of a refusal (the guest
/// just sees #UD).
struct RefusalLog(Mutex<Vec<Refusal>>);

static REFUSALS: RefusalLog = RefusalLog(Mutex::new(Vec::new()));

impl log::Log for RefusalLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let msg = r.args().to_string();
        if let Some(refusal) = parse_refusal(&msg) {
            self.0.lock().unwrap().push(refusal);
        }
    }
    fn flush(&self) {}
}

/// Parses "vcpu N: unsupported `TEXT: REASON` at rip 0x...: injecting #UD".
fn parse_refusal(msg: &str) -> Option<Refusal> {
    let rest = msg.split_once("unsupported `")?.1;
    let (text, tail) = rest.rsplit_once("` at rip 0x")?;
    let rip = u64::from_str_radix(tail.split(|c: char| !c.is_ascii_hexdigit()).next()?, 16).ok()?;
    let (insn, reason) = text
        .rsplit_once(": ")
        .unwrap_or((text, "(no reason given)"));
    Some(Refusal {
        rip,
        insn: insn.to_string(),
        reason: reason.to_string(),
    })
}

/// The instruction text the VMM prints for `bytes` (its IntelFormatter).
fn intel_text(bytes: &[u8], rip: u64) -> String {
    let ins = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE).decode();
    let mut s = String::new();
    IntelFormatter::new().format(&ins, &mut s);
    s
}

/// One chunk's result tables, one per way.
struct ChunkRun {
    chunk: Chunk,
    tables: Vec<Vec<u8>>,
    /// Instructions the VMM completed in this VM, per mnemonic.
    emulated: Vec<(Mnemonic, u64)>,
}

/// `its`: whether the VMM's stubs use the ITS-safe return thunk; chunks
/// alternate so both stub shapes complete every kind of instruction.
fn run_chunk(forms: &[Form], its: ItsMode) -> Result<ChunkRun, (String, Option<usize>)> {
    let chunk: Chunk = program::build(forms).map_err(|e| (e, None))?;
    let mut cfg = VmConfig::new(chunk.image.clone());
    cfg.image_name = "emulator-diff".into();
    cfg.mem_size = chunk.mem_size;
    cfg.format = ImageFormat::Flat;
    cfg.load_addr = LOAD_ADDR;
    cfg.mode = EntryMode::Long;
    cfg.cpu = CpuModel::Host;
    cfg.its = its;
    // Refusals are measured: #UD and a logged reason instead of a stop.
    cfg.on_unsupported = OnUnsupported::InjectUd;
    // Per-mnemonic counts of what the VMM completed: a mismatch in a
    // mnemonic it never completed is KVM's own.
    cfg.stats = true;
    cfg.mmio_ram = vec![
        (record::MMIO_BASE, record::MMIO_SIZE),
        (record::GUEST_RAM, record::MMIO_SIZE),
    ];
    cfg.dump_ranges = (0..Way::ALL.len())
        .map(|w| {
            (
                record::table_addr(w, chunk.table_len),
                chunk.table_len as u64,
            )
        })
        .collect();
    let (out, serial) = common::run_config(&cfg);
    let pass = guest::rt::status_of(guest::rt::EXIT_PASS);
    if out.status != pass || out.dumps.len() != Way::ALL.len() {
        // Name the form the VM stopped in, so the caller can set it aside.
        let rip = out
            .message
            .split("rip ")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_hexdigit() && c != 'x').next())
            .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok());
        // Or the first form whose record was never written (the VM ended
        // in or right after it).
        let form = rip
            .and_then(|r| chunk.form_at(r))
            .or_else(|| unwritten_form(&chunk, &out.dumps));
        return Err((
            format!(
                "VM ended with status {} ({}); serial: {}",
                out.status,
                out.message,
                serial.trim()
            ),
            form,
        ));
    }
    Ok(ChunkRun {
        chunk,
        tables: out.dumps,
        emulated: out.emulated,
    })
}

/// The first form, in execution order, whose record the guest never wrote
/// (every written record has a non-zero exception field, NO_EXCEPTION or a
/// vector; #DE is vector 0, so the error-code and RAX fields count too).
fn unwritten_form(chunk: &Chunk, dumps: &[Vec<u8>]) -> Option<usize> {
    for way in [
        Way::KernelRam,
        Way::KernelMmio,
        Way::Truth,
        Way::UserMmio,
        Way::UserSplit,
    ] {
        let table = dumps.get(way.index())?;
        for (slot, &at) in chunk.record_offsets.iter().enumerate() {
            let head = table.get(at..at + record::RFLAGS)?;
            if head.iter().all(|b| *b == 0) {
                return Some(slot);
            }
        }
    }
    None
}

/// How one (form, way) pair came out, from best to worst.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Bit-exact to the native result.
    Exact,
    /// PVM's native result departs from the SDM and the VMM follows the
    /// SDM.
    PvmQuirk,
    /// A difference KVM's own emulator produces (listed in
    /// `KNOWN_FAILURES`, each with its reason).
    KvmOwned(String),
    /// The VMM refused the instruction (its reason).
    Refused(String),
    Fail(Vec<String>),
}

impl Outcome {
    fn rank(&self) -> usize {
        match self {
            Outcome::Exact => 0,
            Outcome::PvmQuirk => 1,
            Outcome::KvmOwned(_) => 2,
            Outcome::Refused(_) => 3,
            Outcome::Fail(_) => 4,
        }
    }
}

const OUTCOME_NAMES: [&str; 5] = ["exact", "quirk", "kvm", "refused", "fail"];

fn hex(b: &[u8]) -> String {
    b.iter().rev().map(|x| format!("{x:02x}")).collect()
}

/// EFLAGS bits the SDM leaves undefined after `bytes`' instruction: they
/// are not compared, because KVM's in-kernel emulator (which runs integer
/// forms at CPL 0 and on MMIO) computes them differently from the CPU, and
/// Intel and AMD CPUs differ among themselves.
fn undefined_flags(bytes: &[u8]) -> u64 {
    use iced_x86::RflagsBits as R;
    let ins = iced_x86::Decoder::new(64, bytes, iced_x86::DecoderOptions::NONE).decode();
    let u = ins.rflags_undefined();
    [
        (R::OF, 0x800),
        (R::SF, 0x80),
        (R::ZF, 0x40),
        (R::AF, 0x10),
        (R::CF, 0x1),
        (R::PF, 0x4),
    ]
    .iter()
    .filter(|(r, _)| u & r != 0)
    .fold(0, |acc, (_, b)| acc | b)
}

fn differences(
    fields: &[Field],
    undefined: u64,
    truth: &[u8],
    got: &[u8],
) -> Vec<(String, String, String)> {
    let mut d = Vec::new();
    for f in fields {
        let (t, g) = (
            &truth[f.offset..f.offset + f.len],
            &got[f.offset..f.offset + f.len],
        );
        let same = match f.mask {
            Some(m) => {
                let m = m & !undefined;
                record::read_u64(t, 0) & m == record::read_u64(g, 0) & m
            }
            None => t == g,
        };
        if !same {
            d.push((f.name.clone(), hex(t), hex(g)));
        }
    }
    d
}

/// Addresses inside the operand window differ between the RAM and the MMIO
/// buffer: FDP (the x87 last data pointer) and GPRs that an instruction
/// loaded with an address (string instructions, XLAT, LEA...) are compared
/// relative to the way's buffer, in a copy of the record.
fn normalize(record_bytes: &[u8], way: Way, form: &Form) -> Vec<u8> {
    let mem_len = form.mem_len;
    let mut r = record_bytes.to_vec();
    let base = program::buffer_of(way);
    // Data pointers stored in the window (FDP in state images and x87
    // environments), truncated to their field's width.
    for &(at, n) in &form.addr_fields {
        let Some(off) = window_offset(at) else {
            continue;
        };
        let mask = if n >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * n)) - 1
        };
        let v = record::read_u64(&r, off) & mask;
        let rel = v.wrapping_sub(base) & mask;
        if rel < mem_len as u64 {
            r[off..off + n].copy_from_slice(&rel.to_le_bytes()[..n]);
        }
    }
    for &(at, n) in &form.selector_fields {
        if let Some(off) = window_offset(at) {
            r[off..off + n].fill(0);
        }
    }
    let window = base.wrapping_sub(0x100)..base + mem_len as u64 + 0x100;
    let mut rebase = |at: usize| {
        let v = record::read_u64(&r, at);
        if window.contains(&v) {
            r[at..at + 8].copy_from_slice(&v.wrapping_sub(base).to_le_bytes());
        }
    };
    rebase(record::FXSAVE + 16);
    for i in 0..16 {
        rebase(record::GPRS + 8 * i);
    }
    r
}

/// Where byte `at` of the operand window lies in a record (fields up to 8
/// bytes that do not straddle the first 64 bytes and the rest).
fn window_offset(at: usize) -> Option<usize> {
    if at + 8 <= record::MEM_LEN {
        Some(record::MEM + at)
    } else if at >= record::MEM_LEN {
        Some(record::RECORD + at - record::MEM_LEN)
    } else {
        None
    }
}

/// Forms known to differ: (instruction text prefix, ways, reason). Each is
/// reported in the summary; none may be dropped silently.
fn known_failure(form: &Form, way: Way) -> Option<&'static str> {
    KNOWN_FAILURES
        .iter()
        .find(|(text, ways, _)| form.text.starts_with(text) && ways.contains(&way.label()))
        .map(|(_, _, why)| *why)
}

fn judge(
    form: &Form,
    way: Way,
    fields: &[Field],
    truth: &[u8],
    got: &[u8],
    emulated: &[(Mnemonic, u64)],
) -> Outcome {
    let truth = &normalize(truth, Way::Truth, form)[..];
    let got = &normalize(got, way, form)[..];
    let d = differences(fields, undefined_flags(&form.bytes), truth, got);
    if d.is_empty() {
        return Outcome::Exact;
    }
    let tv = record::read_u64(truth, record::EXC_VECTOR);
    let gv = record::read_u64(got, record::EXC_VECTOR);
    let ge = record::read_u64(got, record::EXC_ERROR);
    let only_exception = d.iter().all(|(n, _, _)| n.starts_with("exception"));
    if only_exception && form.misaligned && tv == 6 && gv == 13 && ge == 0 {
        return Outcome::PvmQuirk;
    }
    // PVM runs FXSAVE/FXSAVE64 with a misaligned operand natively without
    // the #GP(0) the SDM and APM require (seen on Intel and AMD EPYC hosts;
    // FXRSTOR and the XSAVE family do fault there); the VMM follows the
    // manuals.
    if form.misaligned
        && form.text.starts_with("fxsave")
        && tv == NO_EXCEPTION
        && gv == 13
        && ge == 0
    {
        return Outcome::PvmQuirk;
    }
    if only_exception
        && PVM_QUIRKS
            .iter()
            .any(|(text, t, v, e)| form.text.starts_with(text) && tv == *t && gv == *v && ge == *e)
    {
        return Outcome::PvmQuirk;
    }
    if let Some(why) = known_failure(form, way) {
        return Outcome::KvmOwned(why.to_string());
    }
    // QEMU TCG's near CALL through memory to a non-canonical target pushes
    // the return address before raising #GP(0) (seen in the hardware-KVM
    // lane: the truth's RSP moved by -8 with #GP; hardware and KVM's
    // emulator check the target first and leave RSP alone). Judged from
    // the truth record itself, so a real CPU never matches.
    if host_cpu().is_tcg()
        && form.text.starts_with("call ")
        && tv == 13
        && record::read_u64(truth, record::RSP_CHANGE) as i64 == -8
        && d.iter().all(|(n, _, _)| n == "rsp change")
    {
        return Outcome::KvmOwned(
            "QEMU TCG's near CALL to a non-canonical target pushes the return address before its #GP(0) (RSP moved by -8 natively)".to_string(),
        );
    }
    // Not the VMM's either: the lane's emulated CPU departs from the SDM.
    if let Some(why) = tcg_defect(&form.text) {
        return Outcome::KvmOwned(why.to_string());
    }
    // AMD CPUs leave FIP/FOP/FDP out of FXSAVE/XSAVE images unless an x87
    // exception is pending, while FNSTENV/FNSAVE store them (measured on
    // the AMD EPYC host, natively: after `fld1; fcom m64`, FXSAVE64 holds
    // FOP=FIP=FDP=0 and FNSTENV the real FIP and FDP). So KVM's XSAVE image
    // of a guest that ran x87 code natively carries no pointers, and an
    // environment store the VMM completes at CPL 3 can only write zeros
    // there. At CPL 0 the VMM completed the earlier x87 instruction itself
    // and knows them.
    if way == Way::UserMmio
        && (form.text.starts_with("fnstenv") || form.text.starts_with("fnsave"))
        && diff::host::vendor() == "AuthenticAMD"
        && d.iter().all(|(n, _, _)| n.starts_with("memory operand"))
    {
        return Outcome::KvmOwned(
            "AMD: KVM's XSAVE image has no FIP/FOP/FDP after native x87 code (FXSAVE/XSAVE leave them out unless an exception is pending), so FNSTENV/FNSAVE at CPL 3 store zeros there".to_string(),
        );
    }
    // The VMM's per-mnemonic counts only see instructions it completed
    // without an exception, so a mnemonic it never completed may still
    // have been faulted by it: a hint for the reader, not a verdict.
    let mnemonic = Decoder::new(64, &form.bytes, DecoderOptions::NONE)
        .decode()
        .mnemonic();
    let hint = (!emulated.iter().any(|(m, n)| *m == mnemonic && *n > 0)).then(|| {
        format!(
            "(hint: the VMM completed no {mnemonic:?} in this VM; if KVM's emulator produced this, list it in KNOWN_FAILURES with a reproducer)"
        )
    });
    // In the hardware-KVM lane, KVM's own emulator (nested, on QEMU TCG)
    // completes what the VMM never sees: far transfers, PUSH m, MONITOR
    // and the like on MMIO. Its departures from TCG's native behaviour are
    // KVM's (or TCG's), named as such; a mismatch in an instruction the
    // VMM completed stays a failure.
    if hint.is_some() && host_cpu().is_tcg() {
        return Outcome::KvmOwned(format!(
            "hardware KVM's own emulator under QEMU TCG (the VMM completed no {mnemonic:?} here)"
        ));
    }
    let vec_name = |v: u64| {
        if v == NO_EXCEPTION {
            "none".to_string()
        } else {
            format!("#{v}")
        }
    };
    Outcome::Fail(
        d.into_iter()
            .map(|(n, t, g)| {
                if n == "exception vector" {
                    format!(
                        "{n}: expected {} got {}",
                        vec_name(record::read_u64(truth, 0)),
                        vec_name(record::read_u64(got, 0))
                    )
                } else {
                    format!("{n}: expected {t} got {g}")
                }
            })
            .chain(hint)
            .collect(),
    )
}

/// Prints a form's record in every way (for EMULATOR_DIFF_TRACE).
fn print_records<'a>(f: &Form, vb: usize, rec: &dyn Fn(Way) -> &'a [u8]) {
    println!(
        "TRACE {} [{:02x?}] window {} bytes",
        f.text, f.bytes, f.mem_len
    );
    for way in Way::ALL {
        let r = normalize(rec(way), way, f);
        let mut mem = r[record::MEM..record::MEM + record::MEM_LEN].to_vec();
        mem.extend_from_slice(&r[record::RECORD..]);
        let nonzero_tail = mem.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
        println!(
            "  ({:>2}) exc {:#x}/{:#x} rax {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rflags {:#x} mxcsr {:#x} fsw {:#x}",
            way.label(),
            record::read_u64(&r, record::EXC_VECTOR),
            record::read_u64(&r, record::EXC_ERROR),
            record::read_u64(&r, record::GPRS),
            record::read_u64(&r, record::GPRS + 8),
            record::read_u64(&r, record::GPRS + 16),
            record::read_u64(&r, record::GPRS + 48),
            record::read_u64(&r, record::GPRS + 56),
            record::read_u64(&r, record::RFLAGS),
            record::read_u64(&r, record::FXSAVE + 24) & 0xffff_ffff,
            record::read_u64(&r, record::FXSAVE + 2) & 0xffff,
        );
        let hex = |b: &[u8]| {
            b.iter()
                .rev()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        if f.vector {
            // XMM1 as FXSAVE stored it, then the vector registers as the
            // epilogue's own moves stored them (high byte first).
            println!(
                "       fxsave xmm1 {}",
                hex(&r[record::FXSAVE + 176..record::FXSAVE + 192])
            );
            for v in 0..record::VREG_COUNT {
                let at = record::VREGS + v * vb;
                println!("       vreg{v} {}", hex(&r[at..at + vb]));
            }
        }
        for (i, chunk) in mem[..nonzero_tail.min(mem.len())].chunks(32).enumerate() {
            println!(
                "       +{:#05x}: {}",
                i * 32,
                chunk.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
        }
    }
}

/// Counts per outcome (indexed by `Outcome::rank`), plus the forms.
type Tally = [usize; 6];

#[test]
fn emulator_matches_native_cpl3() {
    common::require_kvm();
    // Refusals reach the test only through the VMM's log.
    if log::set_logger(&REFUSALS).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let t0 = Instant::now();
    let gen = diff::generate(
        &allow,
        &diff::Buffers {
            ram: record::RAM_BUF,
            mmio: record::MMIO_BASE,
        },
    );
    let mut forms = gen.forms;
    // EMULATOR_DIFF_ONLY=PREFIX[,PREFIX...] runs only the forms whose text
    // starts with one of the prefixes (for chasing one mismatch).
    if let Ok(only) = std::env::var("EMULATOR_DIFF_ONLY") {
        let prefixes: Vec<&str> = only.split(',').filter(|p| !p.is_empty()).collect();
        forms.retain(|f| prefixes.iter().any(|p| f.text.starts_with(p)));
    }
    assert!(!forms.is_empty(), "no forms generated");
    let t_gen = t0.elapsed();

    // Run the chunks, THREADS VMs at a time. A chunk whose VM stops in a
    // form is run again without that form, which is recorded as failing.
    let chunks: Vec<Vec<usize>> = (0..forms.len())
        .collect::<Vec<_>>()
        .chunks(CHUNK)
        .map(|c| c.to_vec())
        .collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(Vec<usize>, ChunkRun)>> = Mutex::new(Vec::new());
    let stopped: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| loop {
                let c = next.fetch_add(1, Ordering::SeqCst);
                let Some(idx) = chunks.get(c) else { break };
                let mut idx = idx.clone();
                loop {
                    let fs: Vec<Form> = idx.iter().map(|i| forms[*i].clone()).collect();
                    let its = if c.is_multiple_of(2) {
                        ItsMode::On
                    } else {
                        ItsMode::Off
                    };
                    match run_chunk(&fs, its) {
                        Ok(run) => {
                            results.lock().unwrap().push((idx, run));
                            break;
                        }
                        Err((msg, Some(bad))) if idx.len() + MAX_STOPS > chunks[c].len() => {
                            stopped.lock().unwrap().push((idx[bad], msg));
                            idx.remove(bad);
                        }
                        Err((msg, _)) => panic!(
                            "chunk {c} ({} forms, first {}) did not finish: {msg}",
                            idx.len(),
                            forms[idx[0]].text
                        ),
                    }
                }
            });
        }
    });
    let t_run = t0.elapsed() - t_gen;
    let results = results.into_inner().unwrap();
    let stopped = stopped.into_inner().unwrap();

    // Which form each refusal was in: the RIP inside a chunk's routine and
    // the same instruction text (chunks run side by side, so the RIP alone
    // does not name the VM).
    let mut refusals: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut unmatched = Vec::new();
    for r in REFUSALS.0.lock().unwrap().drain(..) {
        let found = results.iter().find_map(|(idx, run)| {
            let slot = run.chunk.form_at(r.rip)?;
            let f = &forms[idx[slot]];
            let matches = std::iter::once(&f.bytes)
                .chain(f.mmio_bytes.as_ref())
                .any(|b| intel_text(b, r.rip) == r.insn);
            matches.then_some(idx[slot])
        });
        match found {
            Some(fi) => refusals.entry(fi).or_default().push(r.reason),
            None => unmatched.push(r),
        }
    }

    // EMULATOR_DIFF_TRACE=PREFIX[,PREFIX...] prints the records of the
    // forms whose text starts with one of the prefixes.
    let trace = std::env::var("EMULATOR_DIFF_TRACE").ok();
    let traced = |text: &str| {
        trace
            .as_deref()
            .is_some_and(|t| t.split(',').any(|p| !p.is_empty() && text.starts_with(p)))
    };

    // Compare.
    let mut per_class: BTreeMap<String, Tally> = BTreeMap::new();
    let mut reg_only: Tally = [0; 6];
    let mut per_way: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut kvm_by_reason: BTreeMap<String, BTreeSet<(String, &str)>> = BTreeMap::new();
    let mut refused_by_reason: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut failed_forms = BTreeSet::new();
    for (i, msg) in &stopped {
        if let Some(why) = tcg_defect(&forms[*i].text) {
            kvm_by_reason
                .entry(why.to_string())
                .or_default()
                .insert((forms[*i].text.clone(), "stopped"));
            continue;
        }
        failed_forms.insert(*i);
        failures.push(format!(
            "{} [{:02x?}]: VM stopped in this form: {msg}",
            forms[*i].text, forms[*i].bytes
        ));
    }
    for (idx, run) in &results {
        let vreg_bytes = run.chunk.vreg_bytes;
        for (slot, &fi) in idx.iter().enumerate() {
            let f = &forms[fi];
            let fields = record::fields(f.vector || f.kregs, f.kregs, vreg_bytes, f.mem_len);
            let at = run.chunk.record_offsets[slot];
            let len = record::record_size(f.mem_len);
            let rec = |w: Way| &run.tables[w.index()][at..at + len];
            let truth = rec(Way::Truth);
            if traced(&f.text) {
                print_records(f, vreg_bytes, &rec);
            }
            if trace.as_deref() == Some("*") {
                let brief = |w: Way| {
                    let r = rec(w);
                    format!(
                        "{}:{:x}/{:x}/{:x}",
                        w.label(),
                        record::read_u64(r, record::EXC_VECTOR) as u8,
                        record::read_u64(r, record::GPRS + 8),
                        record::read_u64(r, record::RFLAGS)
                    )
                };
                println!(
                    "SUM {:#x} {slot} {} | {} {} {} {}",
                    run.chunk.case_rips[slot],
                    f.text,
                    brief(Way::Truth),
                    brief(Way::UserMmio),
                    brief(Way::KernelRam),
                    brief(Way::KernelMmio)
                );
            }
            let reasons = refusals.remove(&fi).unwrap_or_default();
            if traced(&f.text) {
                println!("  refusals logged: {reasons:?}");
            }
            let mut reasons = reasons.into_iter();
            let mut worst = 0usize;
            // Execution order, which is also the order of the refusals.
            // The split way only differs from the truth's buffer when the
            // window reaches past the end of RAM.
            let split = f.mem_len as u64 > record::SPLIT_AT;
            for way in [
                Way::KernelRam,
                Way::KernelMmio,
                Way::UserMmio,
                Way::UserSplit,
            ] {
                if way == Way::UserSplit && !split {
                    continue;
                }
                let got = rec(way);
                let ud = record::read_u64(got, record::EXC_VECTOR) == 6;
                let o = match ud.then(|| reasons.next()).flatten() {
                    Some(reason) => Outcome::Refused(reason),
                    None => judge(f, way, &fields, truth, got, &run.emulated),
                };
                per_way.entry(way.label()).or_default()[o.rank()] += 1;
                worst = worst.max(o.rank());
                match o {
                    Outcome::Exact | Outcome::PvmQuirk => {}
                    Outcome::KvmOwned(why) => {
                        kvm_by_reason
                            .entry(why)
                            .or_default()
                            .insert((f.text.clone(), way.label()));
                    }
                    Outcome::Refused(why) => {
                        refused_by_reason
                            .entry(why)
                            .or_default()
                            .insert(f.text.clone());
                    }
                    Outcome::Fail(d) => {
                        failed_forms.insert(fi);
                        failures.push(format!(
                            "{} [{:02x?}] way ({}):\n      {}",
                            f.text,
                            f.bytes,
                            way.label(),
                            d.join("\n      ")
                        ));
                    }
                }
            }
            let c = if f.has_memory {
                per_class.entry(f.class.clone()).or_default()
            } else {
                &mut reg_only
            };
            c[5] += 1;
            c[worst] += 1;
        }
    }
    for (i, _) in &stopped {
        let c = if forms[*i].has_memory {
            per_class.entry(forms[*i].class.clone()).or_default()
        } else {
            &mut reg_only
        };
        c[5] += 1;
        c[if tcg_defect(&forms[*i].text).is_some() {
            2
        } else {
            4
        }] += 1;
    }

    // Report.
    let mut skipped: BTreeMap<String, BTreeMap<Skip, usize>> = BTreeMap::new();
    let mut skip_totals: BTreeMap<String, usize> = BTreeMap::new();
    for ((class, why), n) in &gen.skipped {
        *skipped
            .entry(class.clone())
            .or_default()
            .entry(*why)
            .or_default() += n;
        *skip_totals.entry(why.label()).or_default() += n;
    }
    let sum = |k: usize| per_class.values().map(|c| c[k]).sum::<usize>();
    let mem_codes: usize = gen.memory_codes.values().sum();
    let no_truth: usize = gen
        .skipped
        .iter()
        .filter(|((_, w), _)| matches!(w, Skip::NoGroundTruth(_)))
        .map(|(_, n)| n)
        .sum();
    let not_built: usize = gen
        .skipped
        .iter()
        .filter(|((_, w), _)| matches!(w, Skip::NotBuilt(_)))
        .map(|(_, n)| n)
        .sum();
    println!(
        "emulator diff on {} ({}): {mem_codes} codes with a memory operand the host runs; {no_truth} without ground truth, {not_built} not built",
        diff::host::vendor(),
        if diff::host::avx512() { "AVX-512" } else if diff::host::avx() { "AVX2, no AVX-512" } else { "no AVX" },
    );
    println!(
        "  memory-operand forms: {} run | {} bit-exact | {} pvm-quirk | {} kvm-owned | {} refused | {} fail",
        sum(5),
        sum(0),
        sum(1),
        sum(2),
        sum(3),
        sum(4)
    );
    println!(
        "  register-only forms (allow-listed): {} run | {} bit-exact | {} pvm-quirk | {} kvm-owned | {} refused | {} fail",
        reg_only[5], reg_only[0], reg_only[1], reg_only[2], reg_only[3], reg_only[4]
    );
    println!(
        "  time: generate {:.1}s, run {:.1}s ({} VMs of <= {CHUNK} forms, {THREADS} at a time)",
        t_gen.as_secs_f64(),
        t_run.as_secs_f64(),
        chunks.len()
    );
    for (w, c) in &per_way {
        println!(
            "  way ({w}): {} exact, {} pvm-quirk, {} kvm-owned, {} refused, {} fail",
            c[0], c[1], c[2], c[3], c[4]
        );
    }
    println!(
        "  {:<20} {:>6} {:>6} {:>6} {:>6} {:>7} {:>6} | codes: {:>6} {:>8} {:>9}",
        "class (memory forms)",
        "forms",
        OUTCOME_NAMES[0],
        OUTCOME_NAMES[1],
        OUTCOME_NAMES[2],
        OUTCOME_NAMES[3],
        OUTCOME_NAMES[4],
        "host-",
        "no-truth",
        "not-built"
    );
    let mut classes: Vec<&String> = per_class.keys().chain(skipped.keys()).collect();
    classes.sort();
    classes.dedup();
    for cl in classes {
        let c = per_class.get(cl).copied().unwrap_or_default();
        let s = skipped.get(cl);
        let sk = |f: &dyn Fn(&Skip) -> bool| {
            s.map(|m| m.iter().filter(|(k, _)| f(k)).map(|(_, n)| n).sum())
                .unwrap_or(0usize)
        };
        let row = [
            sk(&|k| *k == Skip::HostLacks),
            sk(&|k| matches!(k, Skip::NoGroundTruth(_))),
            sk(&|k| matches!(k, Skip::NotBuilt(_))),
        ];
        if c[5] == 0 && row[1] == 0 && row[2] == 0 && row[0] == 0 {
            continue;
        }
        println!(
            "  {:<20} {:>6} {:>6} {:>6} {:>6} {:>7} {:>6} | {:>13} {:>8} {:>9}",
            cl, c[5], c[0], c[1], c[2], c[3], c[4], row[0], row[1], row[2]
        );
    }
    // The summary as the README shows it.
    println!("  | memory-operand forms run | bit-exact | PVM quirk | KVM-owned | refused | fail |");
    println!("  |---:|---:|---:|---:|---:|---:|");
    println!(
        "  | {} | {} | {} | {} | {} | {} |",
        sum(5),
        sum(0),
        sum(1),
        sum(2),
        sum(3),
        sum(4)
    );
    for (why, n) in &skip_totals {
        println!("  codes skipped, {why}: {n}");
    }
    // EMULATOR_DIFF_LIST=1 lists the codes behind every skip reason but
    // "host lacks feature".
    if std::env::var_os("EMULATOR_DIFF_LIST").is_some() {
        for (code, why) in &gen.skipped_codes {
            if *why != Skip::HostLacks {
                println!("    {code:?}: {}", why.label());
            }
        }
    }
    for (why, set) in &refused_by_reason {
        println!(
            "  refused: {why}: {} forms, e.g. {}",
            set.len(),
            set.iter().take(24).cloned().collect::<Vec<_>>().join("; ")
        );
    }
    for (why, set) in &kvm_by_reason {
        let mut fs: Vec<&str> = set.iter().map(|(t, _)| t.as_str()).collect();
        fs.dedup();
        println!(
            "  kvm-owned: {why}: {} forms, {} form-ways, e.g. {}",
            fs.len(),
            set.len(),
            fs.iter().take(4).copied().collect::<Vec<_>>().join("; ")
        );
    }
    for r in &unmatched {
        failures.push(format!(
            "refusal at rip {:#x} matches no form: `{}`: {}",
            r.rip, r.insn, r.reason
        ));
    }
    // EMULATOR_DIFF_SHOW=N prints more mismatches.
    let show = std::env::var("EMULATOR_DIFF_SHOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SHOW);
    for f in failures.iter().take(show) {
        println!("FAIL {f}");
    }
    assert!(
        failures.is_empty(),
        "{} mismatches in {} forms (first {show} above)",
        failures.len(),
        failed_forms.len()
    );
}
