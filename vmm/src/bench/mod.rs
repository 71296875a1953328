//! `vmm bench`: the round-trip cost of each exit path through the VMM,
//! against a floor that runs the same guest on a bare KVM_RUN loop.
//!
//! Floor and VMM runs alternate (A B A B ... `runs` times) so that drift of
//! the (shared, nested) machine hits both sides alike. The VMM side runs the
//! guest through [`crate::vm::run`] with `stats` on and takes its numbers
//! from the VMM's own [`ExitStats`](crate::stats::ExitStats); the floor
//! times each KVM_RUN the same way (an `Instant` before KVM_RUN, read once
//! the exit is served) into the same [`LatencyHistogram`] type.

mod floor;
mod host;
mod plot;
mod report;

use crate::bus::{BusAction, MmioDevice, PioDevice};
use crate::config::{ExtraMmio, ExtraPio, VmConfig};
use crate::kvm::run_page::ExitReason;
use crate::kvm::KvmError;
use crate::loader::ImageFormat;
use crate::stats::LatencyHistogram;
use floor::{FloorVm, Serve};
use guest::programs::bench as programs;
use guest::Program;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use report::{machine_description, BenchReport, PathResult};

/// Default iterations per run: with the default runs, a full bench takes
/// one to three minutes on the project's PVM machines.
pub const DEFAULT_ITERS: u32 = 20_000;
pub const DEFAULT_RUNS: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("set-up: {0}")]
    Setup(String),
    #[error("{0}")]
    Guest(String),
    #[error("cannot assemble a bench guest: {0}")]
    Assemble(#[from] iced_x86::IcedError),
    #[error("cannot write {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
    #[error("cannot draw the SVG: {0}")]
    Plot(String),
    #[error("no bench path named {0:?}; the paths are: {1}")]
    UnknownPath(String, String),
}

/// What `vmm bench` was asked for.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub iters: u32,
    pub runs: u32,
    pub json: Option<PathBuf>,
    pub svg: Option<PathBuf>,
    pub its: emul::stub::ItsMode,
    /// Path names to run (with their groups); empty: every path.
    pub only: Vec<String>,
}

/// Builds a bench guest for an iteration count.
type BuildGuest = fn(u32) -> Result<Program, iced_x86::IcedError>;

/// What a path's numbers time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// One exit of this reason: KVM_RUN entry to the end of serving it.
    Exit(ExitReason),
    /// One emulated instruction: its emulation exit plus the MMIO exits
    /// KVM made at its RIP before giving up (what the guest pays for it).
    Instruction,
}

/// One measured path's VMM side.
struct VmmPath {
    name: &'static str,
    build: BuildGuest,
    /// Throughput paths report emulated instructions per second.
    throughput: bool,
}

/// A floor and the VMM paths compared against it.
struct Group {
    floor: Option<(&'static str, BuildGuest, Serve)>,
    /// The same-image floor: the VMM's own set-up of the very same image,
    /// run by a bare KVM_RUN loop ([`crate::vcpu::Vcpu::run_bare`]).
    same_image: Option<&'static str>,
    measure: Measure,
    paths: Vec<VmmPath>,
}

fn groups() -> Vec<Group> {
    let p = |name, build| VmmPath {
        name,
        build,
        throughput: false,
    };
    let exit = Measure::Exit;
    vec![
        Group {
            floor: Some(("floor-pio", programs::pio, Serve::Bare)),
            same_image: Some("same-image-pio"),
            measure: exit(ExitReason::IoOut),
            paths: vec![p("pio", programs::pio)],
        },
        Group {
            floor: Some(("floor-mmio", programs::mmio, Serve::Bare)),
            same_image: Some("same-image-mmio"),
            measure: exit(ExitReason::MmioWrite),
            paths: vec![p("mmio", programs::mmio)],
        },
        // Per instruction: KVM exits three times for it (two 8-byte MMIO
        // reads of the operand, then the emulation failure).
        Group {
            floor: Some(("floor-emul", programs::cmpxchg16b, Serve::SkipRip)),
            same_image: None,
            measure: Measure::Instruction,
            paths: vec![p("emul-gpr", programs::cmpxchg16b)],
        },
        // The register-only instruction gets a floor running the same guest:
        // KVM's own work before giving up differs between the two guests.
        Group {
            floor: Some(("floor-emul-reg", programs::adcx, Serve::SkipRip)),
            same_image: None,
            measure: exit(ExitReason::Emulation),
            paths: vec![p("emul-reg", programs::adcx)],
        },
        Group {
            floor: Some(("floor-emulx", programs::vmovdqu, Serve::SkipRipXsave)),
            same_image: None,
            measure: exit(ExitReason::Emulation),
            paths: vec![
                p("emul-vec", programs::vmovdqu),
                p("emul-vec-nonzero", programs::vmovdqu_nonzero),
                // Whole-state instructions (issue: no dearer than two
                // vector emulations): 832 bytes through the bounce buffer.
                p("emul-xsave", programs::xsave),
                p("emul-xrstor", programs::xrstor),
            ],
        },
        Group {
            floor: Some(("floor-user-mmio", programs::user_mmio, Serve::Bare)),
            same_image: Some("same-image-user-mmio"),
            measure: exit(ExitReason::MmioWrite),
            paths: vec![p("user-mmio", programs::user_mmio)],
        },
        Group {
            floor: Some(("floor-user-emul", programs::user_vmovdqu, Serve::SkipRip)),
            same_image: None,
            measure: exit(ExitReason::Emulation),
            paths: vec![p("user-emul", programs::user_vmovdqu)],
        },
        Group {
            floor: None,
            same_image: None,
            measure: exit(ExitReason::Emulation),
            paths: vec![VmmPath {
                name: "simd-cpl0",
                build: programs::simd_cpl0,
                throughput: true,
            }],
        },
    ]
}

/// Every path name the report carries, in order.
pub fn path_names() -> Vec<&'static str> {
    let mut v = Vec::new();
    for g in groups() {
        if let Some((f, _, _)) = g.floor {
            v.push(f);
        }
        v.extend(g.same_image);
        v.extend(g.paths.iter().map(|p| p.name));
    }
    v.push("in-kernel");
    v.push("host-emul");
    v
}

/// Runs every path; failures of one path are reported in it, not returned.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let names = path_names();
    if let Some(bad) = opts.only.iter().find(|n| !names.contains(&n.as_str())) {
        return Err(BenchError::UnknownPath(bad.clone(), names.join(", ")));
    }
    let wanted = |name: &str| opts.only.is_empty() || opts.only.iter().any(|n| n == name);
    crate::kvm::open()?;
    let iters = opts.iters.max(1);
    let runs = opts.runs.max(1);
    let mut results = Vec::new();
    for g in groups() {
        let mut members = g
            .paths
            .iter()
            .map(|p| p.name)
            .chain(g.floor.map(|f| f.0))
            .chain(g.same_image);
        if members.any(wanted) {
            results.extend(run_group(&g, iters, runs, opts.its));
        }
    }
    if wanted("in-kernel") {
        results.push(in_kernel(iters, runs));
    }
    if wanted("host-emul") {
        results.push(host::host_emul(iters, runs, opts.its));
    }
    Ok(BenchReport {
        machine: machine_description(),
        iters,
        runs,
        paths: results,
    })
}

/// Accumulates one side of a comparison over the runs.
struct Side {
    hist: LatencyHistogram,
    error: Option<String>,
}

impl Side {
    fn new() -> Self {
        Side {
            hist: LatencyHistogram::default(),
            error: None,
        }
    }
}

fn run_group(g: &Group, iters: u32, runs: u32, its: emul::stub::ItsMode) -> Vec<PathResult> {
    let mut floor_side = Side::new();
    let mut same_side = Side::new();
    let mut sides: Vec<Side> = g.paths.iter().map(|_| Side::new()).collect();
    for _ in 0..runs {
        if let Some((name, build, serve)) = g.floor {
            if floor_side.error.is_none() {
                if let Err(e) = floor_once(build, iters, g.measure, serve, &mut floor_side.hist) {
                    floor_side.error = Some(format!("{name}: {e}"));
                }
            }
        }
        // The same-image floor runs the group's first guest.
        if let (Some(_), Some(first)) = (g.same_image, g.paths.first()) {
            if same_side.error.is_none() {
                let run = vmm_once(
                    first.build,
                    g.measure,
                    true,
                    iters,
                    its,
                    &mut same_side.hist,
                );
                same_side.error = run.err();
            }
        }
        for (p, side) in g.paths.iter().zip(sides.iter_mut()) {
            // A path the VMM cannot complete fails the same way every time.
            if side.error.is_some() {
                continue;
            }
            if let Err(e) = vmm_once(p.build, g.measure, false, iters, its, &mut side.hist) {
                side.error = Some(e);
            }
        }
    }
    let mut out = Vec::new();
    let floor_result = g
        .floor
        .map(|(name, _, _)| PathResult::from_side(name, None, &floor_side.hist, floor_side.error));
    let floor_median = floor_result.as_ref().and_then(|f| f.median_ns);
    let floor_name = g.floor.map(|(n, _, _)| n);
    if let Some(f) = floor_result {
        out.push(f);
    }
    let same_result = g
        .same_image
        .map(|name| PathResult::from_side(name, None, &same_side.hist, same_side.error));
    let same_median = same_result.as_ref().and_then(|f| f.median_ns);
    if let Some(f) = same_result {
        out.push(f);
    }
    for (p, side) in g.paths.iter().zip(sides) {
        let mut r = PathResult::from_side(p.name, floor_name, &side.hist, side.error);
        r.set_floor(floor_median);
        if let Some(name) = g.same_image {
            r.set_same_image(name, same_median);
        }
        if p.throughput {
            r.per_second = r.mean_ns.filter(|m| *m > 0.0).map(|m| 1e9 / m);
        }
        out.push(r);
    }
    out
}

fn floor_once(
    build: BuildGuest,
    iters: u32,
    measure: Measure,
    serve: Serve,
    hist: &mut LatencyHistogram,
) -> Result<(), BenchError> {
    let p = build(iters)?;
    let mut vm = FloorVm::new(&p)?;
    let n = vm.run_to_end(measure, serve, hist)?;
    if n < u64::from(iters) {
        return Err(BenchError::Guest(format!(
            "{} ended after {n} of {iters} exits",
            p.name
        )));
    }
    Ok(())
}

/// A device that accepts and drops every access: the VMM path's cost is
/// the run loop and the bus, not a device model.
struct NoOp;

impl PioDevice for NoOp {
    fn pio_read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn pio_write(&mut self, _offset: u16, _data: &[u8]) -> BusAction {
        BusAction::Continue
    }
}

impl MmioDevice for NoOp {
    fn mmio_read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn mmio_write(&mut self, _offset: u64, _data: &[u8]) -> BusAction {
        BusAction::Continue
    }
}

/// One run of the guest `build` makes through the normal VMM (or, with
/// `bare`, the same VM set-up run by a bare KVM_RUN loop); merges its
/// histogram for `measure` into `hist`. `Err` says why it did not complete.
fn vmm_once(
    build: BuildGuest,
    measure: Measure,
    bare: bool,
    iters: u32,
    its: emul::stub::ItsMode,
    hist: &mut LatencyHistogram,
) -> Result<(), String> {
    let prog = build(iters).map_err(|e| e.to_string())?;
    let mut cfg = VmConfig::new(prog.image.clone());
    cfg.image_name = prog.name.to_string();
    cfg.format = ImageFormat::Flat;
    cfg.load_addr = prog.load_addr;
    cfg.mmio_ram = prog.mmio_ram.clone();
    cfg.stats = true;
    cfg.its = its;
    cfg.bare_loop = bare;
    let noop = Arc::new(Mutex::new(NoOp));
    cfg.extra_pio.push(ExtraPio {
        base: programs::BENCH_PORT,
        len: 1,
        device: noop.clone(),
    });
    if prog.mmio_ram.is_empty() {
        cfg.extra_mmio.push(ExtraMmio {
            base: programs::BENCH_MMIO,
            len: programs::BENCH_MMIO_SIZE,
            device: noop,
        });
    }
    let out = crate::vm::run(&cfg, Box::new(std::io::sink())).map_err(|e| e.to_string())?;
    if out.status != programs::BENCH_DONE_STATUS {
        return Err(format!("VMM ended the guest early: {}", out.message));
    }
    let stats = out
        .stats
        .ok_or_else(|| "the VMM returned no exit statistics".to_string())?;
    let (h, what) = match measure {
        Measure::Exit(reason) => (
            stats
                .histogram(reason)
                .ok_or_else(|| format!("no {} histogram", reason.name()))?,
            reason.name(),
        ),
        Measure::Instruction => (stats.instructions(), "emulated instruction"),
    };
    if h.count() < u64::from(iters) {
        return Err(format!(
            "{} {what} samples recorded, {iters} expected",
            h.count()
        ));
    }
    hist.merge(h);
    Ok(())
}

/// `cpuid` never leaves the kernel: one KVM_RUN runs
/// [`programs::CPUID_PER_EXIT`] of them, then exits through an `out`.
fn in_kernel(iters: u32, runs: u32) -> PathResult {
    let per = u64::from(programs::CPUID_PER_EXIT);
    // The first KVM_RUN also faults in the guest's pages: dropped.
    let kvm_runs = (iters as usize / per as usize).clamp(3, 50) + 1;
    let mut hist = LatencyHistogram::default();
    let mut error = None;
    for _ in 0..runs {
        let r = programs::cpuid()
            .map_err(BenchError::from)
            .and_then(|p| FloorVm::new(&p))
            .and_then(|mut vm| vm.time_runs(kvm_runs));
        match r {
            Ok(times) => {
                for ns in times.into_iter().skip(1) {
                    hist.record(ns / per);
                }
            }
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    let mut r = PathResult::from_side("in-kernel", None, &hist, error);
    r.notes = Some(format!(
        "time of one KVM_RUN running {per} cpuids (unrolled by 10) then an out, divided by {per}"
    ));
    r
}

/// Writes the report where asked and prints the table.
pub fn run_and_report(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let rep = run(opts)?;
    print!("{}", rep.table());
    if let Some(path) = &opts.json {
        std::fs::write(path, rep.json().to_string() + "\n").map_err(|err| BenchError::Write {
            path: path.clone(),
            err,
        })?;
    }
    if let Some(path) = &opts.svg {
        plot::draw(&rep, path)?;
    }
    Ok(rep)
}
