//! `guest NAME OUT.bin`: write a scripted guest program as a flat image (and
//! the file it expects as `--initrd`, if any, as `OUT.bin.initrd`), and print
//! the `vmm run` line that runs it, quoted so it works when pasted into a
//! shell from the workspace root. `guest list`: name and describe every
//! program.
//!
//! `cargo build --release` builds this tool with the VMM; run it as
//! `./target/release/guest`.

use guest::shell_quote;
use std::io::Write;
use std::process::ExitCode;

/// The binary the printed command line runs: the one the Quick start's
/// `cargo build --release` made.
const VMM: &str = "./target/release/vmm";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd] if cmd == "list" => {
            for p in guest::all() {
                println!("{:<24} {:<9} {}", p.name, p.mode.flag(), p.description);
            }
            ExitCode::SUCCESS
        }
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
            eprintln!("usage: guest NAME OUT.bin | guest list");
            ExitCode::from(2)
        }
    }
}
