use clap::Parser;
use std::process::ExitCode;
use vmm::cli::{Cli, Command};
use vmm::status;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    ExitCode::from(run(cli) as u8)
}

fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Selftest => vmm::selftest::print_and_check(),
        Command::Bench(args) => match vmm::bench::run_and_report(&args.to_options(cli.its)) {
            Ok(_) => status::GUEST_DONE,
            Err(e) => {
                eprintln!("vmm: bench: {e}");
                status::SETUP_ERROR
            }
        },
        Command::Run(args) => {
            if let Err(e) = vmm::signals::install_stop() {
                eprintln!("vmm: cannot install SIGINT/SIGTERM handlers: {e}");
                return status::SETUP_ERROR;
            }
            let cfg = match args.to_config(cli.its) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("vmm: {e}");
                    return status::SETUP_ERROR;
                }
            };
            match vmm::vm::run(&cfg, Box::new(std::io::stdout())) {
                Ok(out) => {
                    if let Some(s) = &out.stats {
                        eprint!("{}", s.report());
                        if !out.emulated.is_empty() {
                            eprintln!("{:<16} {:>10}", "emulated", "count");
                            for (m, n) in &out.emulated {
                                eprintln!("{:<16} {:>10}", format!("{m:?}").to_lowercase(), n);
                            }
                        }
                        let i = out.ioctls;
                        eprintln!(
                            "state ioctls: KVM_GET_REGS {} KVM_GET_SREGS {} KVM_GET_VCPU_EVENTS {} KVM_GET_XSAVE {} KVM_SET_XSAVE {} KVM_GET_XCRS {}; SREGS synced on {} exits",
                            i.get_regs, i.get_sregs, i.get_events, i.get_xsave, i.set_xsave, i.get_xcrs, out.sregs_copies
                        );
                    }
                    eprintln!("vmm: {}", out.message);
                    out.status
                }
                Err(e) => {
                    eprintln!("vmm: {e}");
                    e.status()
                }
            }
        }
    }
}
