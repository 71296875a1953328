//! Differential coverage of the VMM's instruction completion (issue 4, item
//! 6): every instruction form the emulator's allow-list accepts and this
//! host runs, generated from iced-x86's tables, run natively at CPL 3 (the
//! ground truth) and three ways the VMM completes it (CPL 3 with an MMIO
//! operand; CPL 0, interpreted by PVM, with a RAM and with an MMIO operand).
//! Results are compared field by field. See guest/src/diff/.

mod common;

use emul::stub::probe::Deviation;
use emul::stub::ItsMode;
use guest::diff::program::{self, Chunk, LOAD_ADDR};
use guest::diff::record::{self, Field, NO_EXCEPTION, RECORD};
use guest::diff::{self, Form, Skip, Way};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use vmm::boot::EntryMode;
use vmm::config::VmConfig;
use vmm::kvm::cpuid::CpuModel;
use vmm::loader::ImageFormat;

/// Forms per VM: small enough for the image to fit below the kernel's
/// stacks, large enough that VM start-up does not dominate.
const CHUNK: usize = 400;
/// VMs run side by side (each is one vCPU thread).
const THREADS: usize = 2;
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

/// The TCG defect that explains a mismatch of `text`, if the host is TCG
/// and the probe found that departure.
fn tcg_defect(text: &str) -> Option<&'static str> {
    static CPU: std::sync::OnceLock<emul::stub::probe::HostCpu> = std::sync::OnceLock::new();
    let cpu = CPU.get_or_init(|| emul::stub::probe::probe().expect("CPU probes run"));
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

/// One chunk's result tables, one per way, or the VM's end when it did not
/// finish.
struct ChunkRun {
    tables: Vec<Vec<u8>>,
    vreg_bytes: usize,
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
    cfg.mmio_ram = vec![(record::MMIO_BASE, record::MMIO_SIZE)];
    let n = forms.len();
    cfg.dump_ranges = (0..4)
        .map(|w| (record::table_addr(w, n), record::table_size(n)))
        .collect();
    let (out, serial) = common::run_config(&cfg);
    let pass = guest::rt::status_of(guest::rt::EXIT_PASS);
    if out.status != pass || out.dumps.len() != 4 {
        // Name the form the VM stopped in, so the caller can set it aside.
        let rip = out
            .message
            .split("rip ")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_hexdigit() && c != 'x').next())
            .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok());
        let form = rip.and_then(|r| chunk.form_at(r));
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
        tables: out.dumps,
        vreg_bytes: chunk.vreg_bytes,
    })
}

/// How one (form, way) pair came out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Pass,
    /// Ground truth #UD, the VMM's #GP(0): PVM's native quirk for a
    /// misaligned aligned-only operand, where the VMM follows the SDM.
    PvmQuirk,
    Known(&'static str),
    Fail(Vec<String>),
}

fn hex(b: &[u8]) -> String {
    b.iter().rev().map(|x| format!("{x:02x}")).collect()
}

/// EFLAGS bits the SDM leaves undefined after `bytes`' instruction: they
/// are not compared, because KVM's in-kernel emulator (which runs integer
/// forms at CPL 0 and on MMIO) computes them differently from the CPU.
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

/// FDP (the x87 last data pointer) is the operand's address, which is the
/// RAM buffer in some ways and the MMIO window in others: compare it
/// relative to the way's buffer, in a copy of the record.
fn normalize_fdp(record_bytes: &[u8], way: Way) -> Vec<u8> {
    let mut r = record_bytes.to_vec();
    let at = record::FXSAVE + 16;
    let fdp = record::read_u64(&r, at);
    let base = guest::diff::program::buffer_of(way);
    if (base..base + 64).contains(&fdp) {
        r[at..at + 8].copy_from_slice(&(fdp - base).to_le_bytes());
    }
    r
}

fn judge(form: &Form, way: Way, fields: &[Field], truth: &[u8], got: &[u8]) -> Outcome {
    let truth = &normalize_fdp(truth, Way::Truth)[..];
    let got = &normalize_fdp(got, way)[..];
    let d = differences(fields, undefined_flags(&form.bytes), truth, got);
    if d.is_empty() {
        return Outcome::Pass;
    }
    let tv = record::read_u64(truth, record::EXC_VECTOR);
    let gv = record::read_u64(got, record::EXC_VECTOR);
    let ge = record::read_u64(got, record::EXC_ERROR);
    let only_exception = d.iter().all(|(n, _, _)| n.starts_with("exception"));
    if only_exception && form.misaligned && tv == 6 && gv == 13 && ge == 0 {
        return Outcome::PvmQuirk;
    }
    if only_exception
        && PVM_QUIRKS
            .iter()
            .any(|(text, t, v, e)| form.text.starts_with(text) && tv == *t && gv == *v && ge == *e)
    {
        return Outcome::PvmQuirk;
    }
    if let Some((_, _, why)) = KNOWN_FAILURES
        .iter()
        .find(|(text, ways, _)| form.text.starts_with(text) && ways.contains(&way.label()))
    {
        return Outcome::Known(why);
    }
    if let Some(why) = tcg_defect(&form.text) {
        return Outcome::Known(why);
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
            .collect(),
    )
}

#[test]
fn emulator_matches_native_cpl3() {
    common::require_kvm();
    let t0 = Instant::now();
    let gen = diff::generate(&allow);
    let forms = gen.forms;
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
                        Err((msg, Some(bad))) => {
                            stopped.lock().unwrap().push((idx[bad], msg));
                            idx.remove(bad);
                        }
                        Err((msg, None)) => panic!(
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

    // Compare.
    let mut per_class: BTreeMap<String, [usize; 5]> = BTreeMap::new(); // forms, pass, quirk, known, fail
    let mut per_way: BTreeMap<&str, [usize; 4]> = BTreeMap::new(); // pass, quirk, known, fail
    let mut failures: Vec<String> = Vec::new();
    let mut known_by_reason: BTreeMap<&str, std::collections::BTreeSet<(String, &str)>> =
        BTreeMap::new();
    let mut failed_forms = std::collections::BTreeSet::new();
    let mut stopped_known = std::collections::BTreeSet::new();
    for (i, msg) in stopped.lock().unwrap().iter() {
        if let Some(why) = tcg_defect(&forms[*i].text) {
            known_by_reason
                .entry(why)
                .or_default()
                .insert((forms[*i].text.clone(), "stopped"));
            stopped_known.insert(*i);
            continue;
        }
        failed_forms.insert(*i);
        failures.push(format!(
            "{} [{:02x?}]: VM stopped in this form: {msg}",
            forms[*i].text, forms[*i].bytes
        ));
    }
    for (idx, run) in results.lock().unwrap().iter() {
        for (slot, &fi) in idx.iter().enumerate() {
            let f = &forms[fi];
            let fields = record::fields(f.vector || f.kregs, f.kregs, run.vreg_bytes);
            let rec = |w: Way| &run.tables[w.index()][slot * RECORD..(slot + 1) * RECORD];
            let truth = rec(Way::Truth);
            let mut worst = 0usize;
            for way in [Way::UserMmio, Way::KernelRam, Way::KernelMmio] {
                let o = judge(f, way, &fields, truth, rec(way));
                let w = per_way.entry(way.label()).or_default();
                match &o {
                    Outcome::Pass => w[0] += 1,
                    Outcome::PvmQuirk => {
                        w[1] += 1;
                        worst = worst.max(1);
                    }
                    Outcome::Known(why) => {
                        known_by_reason
                            .entry(*why)
                            .or_default()
                            .insert((f.text.clone(), way.label()));
                        w[2] += 1;
                        worst = worst.max(2);
                    }
                    Outcome::Fail(d) => {
                        w[3] += 1;
                        worst = 3;
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
            let c = per_class.entry(f.class.clone()).or_default();
            c[0] += 1;
            c[1 + worst] += 1;
        }
    }
    for (i, _) in stopped.lock().unwrap().iter() {
        let c = per_class.entry(forms[*i].class.clone()).or_default();
        c[0] += 1;
        c[if stopped_known.contains(i) { 3 } else { 4 }] += 1;
    }

    // Report.
    let mut skipped: BTreeMap<String, BTreeMap<Skip, usize>> = BTreeMap::new();
    for ((class, why), n) in &gen.skipped {
        *skipped
            .entry(class.clone())
            .or_default()
            .entry(*why)
            .or_default() += n;
    }
    let total = forms.len();
    let passed = per_class.values().map(|c| c[1]).sum::<usize>();
    let quirks = per_class.values().map(|c| c[2]).sum::<usize>();
    let known = per_class.values().map(|c| c[3]).sum::<usize>();
    println!("emulator diff: {total} forms generated; {passed} pass, {quirks} pass as pvm-quirk, {known} known failures, {} fail", failed_forms.len());
    println!(
        "  time: generate {:.1}s, run {:.1}s ({} VMs of <= {CHUNK} forms, {THREADS} at a time)",
        t_gen.as_secs_f64(),
        t_run.as_secs_f64(),
        chunks.len()
    );
    for (w, c) in &per_way {
        println!(
            "  way ({w}): {} pass, {} pvm-quirk, {} known, {} fail",
            c[0], c[1], c[2], c[3]
        );
    }
    println!(
        "  {:<20} {:>6} {:>6} {:>6} {:>6} {:>6} | skipped: {:>6} {:>6} {:>6}",
        "class", "forms", "pass", "quirk", "known", "fail", "host", "allow", "ops"
    );
    let mut classes: Vec<&String> = per_class.keys().chain(skipped.keys()).collect();
    classes.sort();
    classes.dedup();
    for cl in classes {
        let c = per_class.get(cl).copied().unwrap_or_default();
        let s = skipped.get(cl);
        let sk = |k: Skip| s.and_then(|m| m.get(&k)).copied().unwrap_or(0);
        println!(
            "  {:<20} {:>6} {:>6} {:>6} {:>6} {:>6} | {:>15} {:>6} {:>6} {:>6}",
            cl,
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            "",
            sk(Skip::HostLacks),
            sk(Skip::NotAllowed),
            sk(Skip::Operands)
        );
    }
    for (why, set) in &known_by_reason {
        let mut forms: Vec<&str> = set.iter().map(|(t, _)| t.as_str()).collect();
        forms.dedup();
        println!(
            "  known: {why}: {} forms, {} form-ways, e.g. {}",
            forms.len(),
            set.len(),
            forms.iter().take(4).copied().collect::<Vec<_>>().join("; ")
        );
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
        "{} mismatches in {} forms (first {SHOW} above)",
        failures.len(),
        failed_forms.len()
    );
}
