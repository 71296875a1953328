//! Which register classes KVM copies into the run page on each exit
//! (KVM_CAP_SYNC_REGS), and fetching them by ioctl when a guess was wrong.
//!
//! - GPRs (~50 ns) and SREGS (~170 ns) enter the sync set when the guest
//!   emulates and leave it after [`SYNC_IDLE_EXITS`] exits without
//!   emulation; the first emulation after that fetches both by ioctl.
//! - While GPRs are synced, SREGS are asked for only where the next exit
//!   may be an emulation failure, the one exit that reads them. The guess
//!   is made per exit site (RIP, port or address, and kind): a site whose
//!   last [`QUIET_AFTER`] successors were all PIO or MMIO exits drops SREGS
//!   for the exit after it. That is what an instruction KVM gives up on
//!   after its own MMIO accesses looks like (`lock cmpxchg16b [mmio]`: two
//!   8-byte reads at its RIP, then the failure): its MMIO exits pay nothing
//!   for SREGS, the failure gets them. A wrong guess costs one
//!   KVM_GET_SREGS (~5 us on PVM hosts, ~30 unneeded copies) and resets the
//!   site, so a site with any emulation failure among its last
//!   [`QUIET_AFTER`] successors keeps paying the copy instead.

use super::IoctlCounts;
use crate::kvm::run_page::Exit;
use kvm_ioctls::{SyncReg, VcpuFd};

/// Exits without an emulation failure after which GPRs and SREGS leave the
/// sync set. Keeping them costs ~220 ns per exit, missing them a
/// KVM_GET_REGS and a KVM_GET_SREGS (~4-5 us each on PVM hosts): after
/// about that many exits' worth of copies, stop paying (so a guest pays at
/// most about twice the better choice).
pub const SYNC_IDLE_EXITS: u32 = 32;

/// Successors of an exit site that must all have been PIO or MMIO exits
/// before the exit after it goes without SREGS: about the number of SREGS
/// copies one wrong guess costs, so a guest pays at most about twice the
/// better choice here too.
pub const QUIET_AFTER: u8 = 32;

/// Exit sites remembered (direct-mapped by a hash; a collision only makes
/// a guess wrong, which resets the slot).
const SITES: usize = 64;

/// The run page's sync set and what it holds for the exit being served.
pub(super) struct RegSync {
    /// GPRs (and SREGS unless dropped for this exit) are in the sync set.
    pub synced: bool,
    /// SREGS are asked for on the coming KVM_RUN; while an exit is served,
    /// the run page holds its SREGS (synced for it, or fetched since).
    sregs_on: bool,
    idle_exits: u32,
    /// `--trace` records RIP and the mode of every exit: never drop them.
    keep: bool,
    guess: SregsGuess,
    /// KVM_RUNs that asked for SREGS (`VmOutcome::sregs_copies`).
    pub sregs_copies: u64,
}

/// Whether the exit after the one being served may be an emulation
/// failure, learnt per exit site.
struct SregsGuess {
    /// Per site, how many successors in a row were not emulation failures
    /// (saturating at [`QUIET_AFTER`]).
    quiet: [u8; SITES],
    /// The slot of the exit being served (`None` when GPRs were not synced).
    site: Option<usize>,
}

impl SregsGuess {
    const fn new() -> Self {
        SregsGuess {
            quiet: [0; SITES],
            site: None,
        }
    }

    /// An exit at `site` (`None`: unknown) follows the one being served.
    fn learn(&mut self, emulation: bool, site: Option<usize>) {
        if let Some(prev) = self.site {
            let q = &mut self.quiet[prev];
            *q = if emulation {
                0
            } else {
                (*q + 1).min(QUIET_AFTER)
            };
        }
        self.site = site;
    }

    /// Whether the next exit may need SREGS: unless the site being served
    /// has been followed only by other exits [`QUIET_AFTER`] times in a row.
    fn wants_sregs(&self) -> bool {
        self.site.is_none_or(|s| self.quiet[s] < QUIET_AFTER)
    }

    fn forget_site(&mut self) {
        self.site = None;
    }
}

/// The predictor slot of an exit at `rip`.
pub(super) fn site(rip: u64, exit: &Exit) -> usize {
    let key = match *exit {
        Exit::Io { port, out, .. } => u64::from(port) << 1 | u64::from(out),
        Exit::Mmio { addr, write, .. } => addr.rotate_left(20) ^ u64::from(write) << 2 ^ 0x5a5a,
        Exit::EmulationFailure { .. } => 0xe3,
        _ => 0x77,
    };
    // Fibonacci hashing: the top bits of the product index the table.
    ((rip ^ key.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        >> (64 - SITES.trailing_zeros())) as usize
}

impl RegSync {
    /// GPRs and SREGS start in the sync set, so a guest that emulates from
    /// the start never fetches them.
    pub fn new(fd: &mut VcpuFd, keep: bool) -> Self {
        fd.set_sync_valid_reg(SyncReg::Register);
        fd.set_sync_valid_reg(SyncReg::SystemRegister);
        RegSync {
            synced: true,
            sregs_on: true,
            idle_exits: 0,
            keep,
            guess: SregsGuess::new(),
            sregs_copies: 0,
        }
    }

    /// Nothing synced (the bench's bare loop).
    pub fn drop_all(&mut self, fd: &mut VcpuFd) {
        fd.clear_sync_valid_reg(SyncReg::Register);
        fd.clear_sync_valid_reg(SyncReg::SystemRegister);
        self.synced = false;
        self.sregs_on = false;
        self.guess.forget_site();
    }

    /// After an exit at `site` (when GPRs were synced): learns whether the
    /// previous site's successor was an emulation failure, and drops GPRs
    /// and SREGS after a stretch without emulation.
    #[inline]
    pub fn after_exit(&mut self, fd: &mut VcpuFd, emulation: bool, site: Option<usize>) {
        if !self.synced {
            return;
        }
        self.guess.learn(emulation, site);
        if self.keep {
            return;
        }
        if emulation {
            self.idle_exits = 0;
            return;
        }
        self.idle_exits += 1;
        if self.idle_exits >= SYNC_IDLE_EXITS {
            self.drop_all(fd);
        }
    }

    /// Before KVM_RUN: SREGS in the sync set unless this exit's site has
    /// only been followed by PIO and MMIO exits lately.
    #[inline]
    pub fn before_run(&mut self, fd: &mut VcpuFd) {
        if !self.synced {
            return;
        }
        let want = self.keep || self.guess.wants_sregs();
        if want != self.sregs_on {
            if want {
                fd.set_sync_valid_reg(SyncReg::SystemRegister);
            } else {
                fd.clear_sync_valid_reg(SyncReg::SystemRegister);
            }
            self.sregs_on = want;
        }
        self.sregs_copies += u64::from(want);
    }

    /// Makes the run page's GPRs and SREGS current for this exit: synced
    /// by KVM, or fetched (and synced from the next exit on).
    pub fn ensure(
        &mut self,
        fd: &mut VcpuFd,
        ioctls: &mut IoctlCounts,
    ) -> Result<(), (&'static str, kvm_ioctls::Error)> {
        if self.synced && self.sregs_on {
            return Ok(());
        }
        if !self.synced {
            let regs = fd.get_regs().map_err(|e| ("KVM_GET_REGS", e))?;
            ioctls.get_regs += 1;
            fd.sync_regs_mut().regs = regs;
            fd.set_sync_valid_reg(SyncReg::Register);
            self.synced = true;
            self.idle_exits = 0;
        }
        let sregs = fd.get_sregs().map_err(|e| ("KVM_GET_SREGS", e))?;
        ioctls.get_sregs += 1;
        fd.sync_regs_mut().sregs = sregs;
        fd.set_sync_valid_reg(SyncReg::SystemRegister);
        self.sregs_on = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mmio(addr: u64) -> Exit<'static> {
        Exit::Mmio {
            addr,
            write: false,
            data: &mut [],
        }
    }

    /// `lock cmpxchg16b [mmio]` in a loop: two MMIO reads at its RIP, then
    /// the failure. Once each site has had QUIET_AFTER quiet successors,
    /// only the second read asks for SREGS (for the failure after it).
    #[test]
    fn an_instructions_mmio_exits_learn_to_go_without_sregs() {
        let (rip, a) = (0x10_0040, 0xd000_0000);
        let fail = site(
            rip,
            &Exit::EmulationFailure {
                bytes: [0; 15],
                len: 0,
            },
        );
        let (read1, read2) = (site(rip, &mmio(a)), site(rip, &mmio(a + 8)));
        let mut g = SregsGuess::new();
        let mut asked = Vec::new();
        for i in 0..=u32::from(QUIET_AFTER) + 2 {
            for (emulation, s) in [(false, read1), (false, read2), (true, fail)] {
                g.learn(emulation, Some(s));
                if i > u32::from(QUIET_AFTER) {
                    asked.push(g.wants_sregs());
                }
            }
        }
        // After: the first read, the second read, the failure.
        assert_eq!(asked, [false, true, false, false, true, false]);
    }

    /// A failure after a quiet site resets it: the guess was wrong once and
    /// the site asks for SREGS again until it has been quiet long enough.
    #[test]
    fn a_wrong_guess_resets_the_site() {
        let port = |p| {
            site(
                0x2000,
                &Exit::Io {
                    port: p,
                    size: 1,
                    out: true,
                    data: &mut [],
                },
            )
        };
        let (s, other) = (port(0x80), port(0x81));
        let mut g = SregsGuess::new();
        for _ in 0..QUIET_AFTER {
            g.learn(false, Some(s));
            g.learn(false, Some(other));
        }
        g.learn(false, Some(s));
        assert!(!g.wants_sregs(), "quiet long enough: no SREGS");
        g.learn(true, Some(other));
        g.learn(false, Some(s));
        assert!(g.wants_sregs(), "after the miss the site asks again");
        // An exit whose site is unknown (GPRs not synced) always asks.
        g.learn(false, None);
        assert!(g.wants_sregs());
    }

    /// Sites differ by RIP, address and kind, and land in the table.
    #[test]
    fn sites_tell_exits_apart() {
        let a = site(0x1000, &mmio(0xd000_0000));
        let b = site(0x1000, &mmio(0xd000_0008));
        let c = site(0x1004, &mmio(0xd000_0000));
        let f = site(
            0x1000,
            &Exit::EmulationFailure {
                bytes: [0; 15],
                len: 0,
            },
        );
        assert!(a != b && a != c && a != f && b != f, "{a} {b} {c} {f}");
        assert!([a, b, c, f].iter().all(|&s| s < SITES));
    }
}
