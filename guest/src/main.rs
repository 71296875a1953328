//! `cargo run -p guest -- NAME OUT.bin`: write a scripted guest program as a
//! flat image, and print the `vmm run` line that runs it.
//! `cargo run -p guest -- list`: name and describe every program.

use std::io::Write;
use std::process::ExitCode;

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
            let _ = writeln!(
                std::io::stdout(),
                "vmm run {} {out}",
                p.vmm_args().join(" ")
            );
            let _ = writeln!(
                std::io::stdout(),
                "expect: exit status {}, serial containing {:?}",
                p.expect.status,
                p.expect.serial
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: guest NAME OUT.bin | guest list");
            ExitCode::from(2)
        }
    }
}
