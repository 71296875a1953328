//! Scripted guest programs, assembled with iced-x86's CodeAssembler.
//!
//! Each [`Program`] states the entry mode it needs, the devices it expects
//! and the outcome it must produce; the `guest` binary (`cargo build
//! --release`, then `target/x86_64-unknown-linux-gnu/release/guest NAME
//! OUT.bin`) writes one as a flat image for `vmm run`. The runtime in [`rt`] gives
//! every mode a way to print, report values and exit, and 64-bit programs a
//! mini kernel that runs their payload at CPL 3.

pub mod diff;
pub mod programs;
pub mod rt;

/// The CPU mode a program is entered in (`vmm run --mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Real,
    Protected,
    Long,
}

impl Mode {
    pub fn flag(self) -> &'static str {
        match self {
            Mode::Real => "real",
            Mode::Protected => "protected",
            Mode::Long => "long",
        }
    }

    pub fn bitness(self) -> u32 {
        match self {
            Mode::Real => 16,
            Mode::Protected => 32,
            Mode::Long => 64,
        }
    }
}

/// What running the program must produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// The `vmm` process exit status.
    pub status: i32,
    /// Text the serial output must contain.
    pub serial: &'static str,
    /// The values reported on the test-report port, in order (`None`: not
    /// checked).
    pub reports: Option<Vec<u64>>,
}

/// A guest program: a flat image and how to run it.
#[derive(Debug, Clone)]
pub struct Program {
    pub name: &'static str,
    pub description: &'static str,
    pub mode: Mode,
    pub load_addr: u64,
    /// `--mmio-ram` windows the program expects (address, size).
    pub mmio_ram: Vec<(u64, u64)>,
    /// Guest RAM it needs (`--mem`), when not the default.
    pub mem: Option<u64>,
    /// Further `vmm run` flags it needs (format, devices, CPUs...).
    pub extra_args: Vec<&'static str>,
    /// The file it expects as `--initrd` (Multiboot module 0), if any.
    pub initrd: Option<Vec<u8>>,
    pub image: Vec<u8>,
    pub expect: Expect,
    /// What the program produces where guest CPL 0 code runs natively
    /// (hardware KVM), when that differs from `expect`, which is what it
    /// produces where KVM interprets all CPL 0 code (PVM).
    pub native_cpl0: Option<Expect>,
}

impl Program {
    /// A program that needs no extra devices, RAM or flags.
    pub fn new(
        name: &'static str,
        description: &'static str,
        mode: Mode,
        load_addr: u64,
        image: Vec<u8>,
        expect: Expect,
    ) -> Self {
        Program {
            name,
            description,
            mode,
            load_addr,
            mmio_ram: Vec::new(),
            mem: None,
            extra_args: Vec::new(),
            initrd: None,
            image,
            expect,
            native_cpl0: None,
        }
    }

    /// States the outcome where guest CPL 0 code runs natively, when it
    /// differs from the interpreted one.
    pub fn with_native_cpl0(mut self, expect: Expect) -> Self {
        self.native_cpl0 = Some(expect);
        self
    }

    /// The outcome to expect: `cpl0_native` is true on hardware KVM, false
    /// where KVM interprets CPL 0 code (PVM).
    pub fn expect_for(&self, cpl0_native: bool) -> &Expect {
        match &self.native_cpl0 {
            Some(e) if cpl0_native => e,
            _ => &self.expect,
        }
    }

    /// Adds `--mmio-ram` windows (address, size).
    pub fn with_mmio_ram(mut self, windows: Vec<(u64, u64)>) -> Self {
        self.mmio_ram = windows;
        self
    }

    /// Asks for `mem` bytes of guest RAM.
    pub fn with_mem(mut self, mem: u64) -> Self {
        self.mem = Some(mem);
        self
    }

    /// Adds further `vmm run` flags.
    pub fn with_args(mut self, args: Vec<&'static str>) -> Self {
        self.extra_args = args;
        self
    }

    /// Asks for `data` as `--initrd`.
    pub fn with_initrd(mut self, data: Vec<u8>) -> Self {
        self.initrd = Some(data);
        self
    }

    /// The `vmm run` arguments (without the image path) this program needs.
    pub fn vmm_args(&self) -> Vec<String> {
        let mut v = vec![
            "--mode".to_string(),
            self.mode.flag().to_string(),
            "--load-addr".to_string(),
            format!("{:#x}", self.load_addr),
        ];
        if !self.extra_args.contains(&"--format") {
            v.push("--format".into());
            v.push("flat".into());
        }
        if let Some(m) = self.mem {
            v.push("--mem".into());
            v.push(format!("{m:#x}"));
        }
        for (a, s) in &self.mmio_ram {
            v.push("--mmio-ram".into());
            v.push(format!("{a:#x}:{s:#x}"));
        }
        v.extend(self.extra_args.iter().map(|s| s.to_string()));
        v
    }
}

/// `arg` quoted for a POSIX shell: as is when it holds only characters no
/// shell treats specially, else in single quotes.
pub fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-+=./:,@%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// Every program, by name.
pub fn all() -> Vec<Program> {
    programs::all()
}

/// The program called `name`.
pub fn by_name(name: &str) -> Option<Program> {
    programs::names()
        .contains(&name)
        .then(|| programs::build(name))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each quoted argument reaches a real shell's command as one word,
    /// unchanged.
    #[test]
    fn quoted_arguments_survive_a_shell() {
        let args = ["plain", "mbtest arg1", "it's", "", "$HOME", "a\\b", "*"];
        let line: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s\\n' {}", line.join(" ")))
            .output()
            .expect("run sh");
        let got = String::from_utf8(out.stdout).unwrap();
        assert_eq!(got.lines().collect::<Vec<_>>(), args);
        assert_eq!(shell_quote("--mem"), "--mem");
    }

    #[test]
    fn multiboot_info_names_its_initrd() {
        let p = by_name("multiboot-info").unwrap();
        assert_eq!(p.initrd.as_deref(), Some(&b"INITRD0123456789"[..]));
    }
}
