//! `exitless`: the command-line entry point. Errors become one line on stderr and a non-zero
//! status; nothing here panics on bad input.

use std::process::ExitCode;

use clap::Parser;
use exitless::cli::{Cli, Command, KitCommand};

fn main() -> ExitCode {
    exitless::startup::mark_process_start();
    // virtio-queue logs every bad used-ring index a guest makes at error level, unlimited; exitless
    // warns about the same events itself, under a rate limit (`ratelimit`).
    let filter = "warn,virtio_queue=off";
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(filter))
        .format_timestamp(None)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => restore(args),
        Command::Kit { command } => match command {
            KitCommand::List => {
                for n in exitless::kit::names() {
                    println!("{n}");
                }
                ExitCode::SUCCESS
            }
            KitCommand::Extract { dir } => match exitless::kit::extract(&dir) {
                Ok(files) => {
                    for f in files {
                        println!("{}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&format!("cannot write guests to {}: {e}", dir.display())),
            },
        },
        Command::Bench { command } => exitless::bench::main(command),
        Command::Ctl { socket, request } => {
            match exitless::api::request(&socket, &request.call()) {
                Ok(reply) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&reply).unwrap_or_else(|_| reply.to_string())
                    );
                    if reply["ok"] == true {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => fail(&e),
            }
        }
        Command::Top(args) => match exitless::top::main(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Host => match exitless::vmm::open_kvm() {
            Ok(kvm) => {
                let host = exitless::host::HostInfo::detect(&kvm);
                println!(
                    "{}",
                    host.banner()
                        .unwrap_or_else(|| "hardware-assisted KVM".into())
                );
                println!("{}", exitless::vmm::nested_line(&kvm, &host));
                println!("{}", exitless::vmm::irq_path_line(&kvm, &host));
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string()),
        },
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("exitless: error: {msg}");
    ExitCode::from(1)
}

fn restore(args: exitless::cli::RestoreArgs) -> ExitCode {
    let t0 = std::time::Instant::now();
    // As for `run`: no descriptor of the parent reaches a process with an untrusted guest.
    exitless::sandbox::close_inherited_fds();
    let loaded = match exitless::vmm::load_snapshot(&args.snapshot, args.verify_memory) {
        Ok(l) => l,
        Err(e) => return fail(&e.to_string()),
    };
    let cfg = match args.to_config(&loaded.state.machine) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    match exitless::vmm::restore(&cfg, loaded, args.paused, t0) {
        Ok(outcome) => finish(&cfg, outcome),
        Err(e) => fail(&e.to_string()),
    }
}

fn run(args: exitless::cli::RunArgs) -> ExitCode {
    let inherited = exitless::sandbox::close_inherited_fds();
    if inherited > 0 {
        log::debug!("closed {inherited} inherited descriptors");
    }
    // The host's command-line needs only matter for Linux kernels; detection is cheap.
    let host_cmdline = match (&args.kernel, exitless::vmm::open_kvm()) {
        (Some(_), Ok(kvm)) => exitless::host::HostInfo::detect(&kvm)
            .linux_cmdline_extras()
            .to_string(),
        _ => String::new(),
    };
    let cfg = match args.to_config(&host_cmdline) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    if args.print_cmdline {
        println!("{}", cfg.cmdline);
        return ExitCode::SUCCESS;
    }
    match exitless::vmm::run(&cfg) {
        Ok(outcome) => finish(&cfg, outcome),
        Err(e) => fail(&e.to_string()),
    }
}

/// The end of a run: the summary, the explanation of a failure, the report; the status.
fn finish(cfg: &exitless::config::VmConfig, outcome: exitless::vmm::RunOutcome) -> ExitCode {
    {
        {
            let r = &outcome.report;
            if cfg.summary {
                eprint!("{}", r.summary(&exitless::vmm::port_name));
            }
            if let Some(why) = &outcome.explanation {
                eprintln!("exitless: {why}");
            }
            if let Some(p) = &cfg.stats_json {
                let json = serde_json::to_string_pretty(r).expect("report serialises");
                if let Err(e) = std::fs::write(p, json) {
                    eprintln!("exitless: cannot write {}: {e}", p.display());
                }
            }
            if r.status != 0 && !cfg.summary {
                eprintln!("exitless: {}", r.end);
            }
            ExitCode::from(r.status.clamp(0, 255) as u8)
        }
    }
}
