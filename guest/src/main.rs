//! `guest NAME OUT.bin`: write a scripted guest program as a flat image (and
//! the file it expects as `--initrd`, if any, as `OUT.bin.initrd`), and print
//! the `vmm run` line that runs it, quoted so it works when pasted into a
//! shell from the workspace root. `guest list`: name and describe every
//! program. `guest export DIR`: every program as `DIR/NAME.bin` with
//! `NAME.args` (its `vmm run` flags, one per line) and its expected outcome
//! (`NAME.status`, `NAME.serial`; `NAME.native-status`/`.native-serial`
//! where CPL 0 running natively changes it; `NAME.initrd`, named relative to
//! DIR in `NAME.args`), for runners without cargo (scripts/hwkvm).
//!
//! `cargo build --release` builds this tool with the VMM; run it as
//! `./target/x86_64-unknown-linux-gnu/release/guest`.

use guest::shell_quote;
use std::io::Write;
use std::process::ExitCode;

/// The binary the printed command line runs: the one the Quick start's
/// `cargo build --release` made.
const VMM: &str = "./target/x86_64-unknown-linux-gnu/release/vmm";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd] if cmd == "list" => {
            for p in guest::all() {
                println!("{:<24} {:<9} {}", p.name, p.mode.flag(), p.description);
            }
            ExitCode::SUCCESS
        }
        [cmd, dir] if cmd == "export" => match export(std::path::Path::new(dir)) {
            Ok(n) => {
                println!("guest: wrote {n} programs to {dir}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("guest: cannot export to {dir}: {e}");
                ExitCode::from(2)
            }
        },
        [name, out] => {
            let Some(p) = guest::by_name(name) else {
                eprintln!("guest: no program named '{name}' (try `list`)");
                return ExitCode::from(2);
            };
            if let Err(e) = std::fs::write(out, &p.image) {
                eprintln!("guest: cannot write {out}: {e}");
                return ExitCode::from(2);
            }
            let mut argv = vec![VMM.to_string(), "run".into()];
            argv.extend(p.vmm_args());
            if let Some(data) = &p.initrd {
                let initrd = format!("{out}.initrd");
                if let Err(e) = std::fs::write(&initrd, data) {
                    eprintln!("guest: cannot write {initrd}: {e}");
                    return ExitCode::from(2);
                }
                argv.push("--initrd".into());
                argv.push(initrd);
            }
            argv.push(out.clone());
            let line: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
            let mut o = std::io::stdout();
            let _ = writeln!(o, "{}", line.join(" "));
            let _ = writeln!(
                o,
                "expect: exit status {}, serial containing {:?}",
                p.expect.status, p.expect.serial
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: guest NAME OUT.bin | guest list | guest export DIR");
            ExitCode::from(2)
        }
    }
}

/// Writes every program and its expectations under `dir`; returns how many.
fn export(dir: &std::path::Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let programs = guest::all();
    for p in &programs {
        let file = |ext: &str| dir.join(format!("{}.{ext}", p.name));
        std::fs::write(file("bin"), &p.image)?;
        let mut args = p.vmm_args().join("\n");
        args.push('\n');
        if let Some(data) = &p.initrd {
            // Relative: the runner starts the VMM inside `dir`.
            std::fs::write(file("initrd"), data)?;
            args.push_str(&format!("--initrd\n{}.initrd\n", p.name));
        }
        std::fs::write(file("args"), args)?;
        std::fs::write(file("status"), format!("{}\n", p.expect.status))?;
        std::fs::write(file("serial"), p.expect.serial)?;
        if let Some(native) = &p.native_cpl0 {
            std::fs::write(file("native-status"), format!("{}\n", native.status))?;
            std::fs::write(file("native-serial"), native.serial)?;
        }
    }
    Ok(programs.len())
}
