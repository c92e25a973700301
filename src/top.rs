//! `exitless top --socket PATH [--json] [--interval S] [--count N]`: a live view of a running VM
//! with the rows of ELI's Table 3.1 (see `rates`), per vCPU and in all.
//!
//! Owns the client side only: it asks the VM's control socket (`api`) for `stats` every interval,
//! turns two consecutive replies into rates (`rates`), and either redraws a table in place in
//! the terminal (ratatui over crossterm; `q`, Esc or Ctrl-C leave) or prints one JSON object per
//! line (`--json`, for scripts). It ends when the VM does (the socket goes away) or after
//! `--count` lines/refreshes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::rates::{self, Rates, VcpuSample};

/// `exitless top`'s options.
#[derive(clap::Args, Debug, Clone)]
pub struct TopArgs {
    /// The VM's control socket (`exitless run --api-socket PATH`).
    #[arg(long)]
    pub socket: PathBuf,
    /// One JSON object per interval on stdout instead of the live table.
    #[arg(long)]
    pub json: bool,
    /// Seconds between samples (0.1 to 3600).
    #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
    pub interval: f64,
    /// Stop after this many intervals (default: until the VM ends, or `q`).
    #[arg(long)]
    pub count: Option<u64>,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if (0.1..=3600.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "the interval must be between 0.1 and 3600 seconds, not {s}"
        ))
    }
}

/// One `stats` reply, reduced to what top shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The VM's uptime at the reply.
    pub uptime_s: f64,
    pub vcpus: Vec<VcpuSample>,
    /// Where the in-kernel exit reasons come from ("kvm:kvm_exit tracepoint", or why only
    /// aggregates).
    pub kernel_reasons: String,
}

fn counters(v: &Value) -> std::collections::BTreeMap<String, u64> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads a `stats` reply; an error names what is missing (an older exitless, or not a VM).
pub fn parse_stats(v: &Value) -> Result<Snapshot, String> {
    let uptime_s = v["uptime_s"]
        .as_f64()
        .ok_or("the stats reply has no uptime_s")?;
    let vcpus = v["vcpus"]
        .as_array()
        .ok_or("the stats reply has no per-vCPU counters (an exitless without `top` support?)")?
        .iter()
        .map(|c| VcpuSample {
            user_exits: counters(&c["exits"]),
            kvm: counters(&c["kvm"]),
            run_ns: c["run_ns"].as_u64().unwrap_or(0),
        })
        .collect();
    let kernel_reasons = v["kernel_exit_reasons"]
        .as_str()
        .unwrap_or("KVM's aggregate statistics only (no per-reason in-kernel counts)")
        .to_string();
    Ok(Snapshot {
        uptime_s,
        vcpus,
        kernel_reasons,
    })
}

/// The rates between two snapshots: all vCPUs, and each.
pub fn between(prev: &Snapshot, cur: &Snapshot) -> (Rates, Vec<Rates>) {
    let dt = cur.uptime_s - prev.uptime_s;
    let per: Vec<Rates> = cur
        .vcpus
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let p = prev.vcpus.get(i).cloned().unwrap_or_default();
            rates::vcpu_rates(&p, c, dt)
        })
        .collect();
    (rates::total(&per), per)
}

/// The `--json` line: the totals at the top level, each vCPU under `vcpus`.
pub fn json_line(snap: &Snapshot, all: &Rates, per: &[Rates]) -> Value {
    let mut v = serde_json::to_value(all).unwrap_or_else(|_| json!({}));
    v["uptime_s"] = json!(snap.uptime_s);
    v["exits_per_interrupt"] = json!(rates::exits_per_interrupt(all));
    v["kernel_exit_reasons"] = json!(snap.kernel_reasons);
    v["vcpus"] = json!(per
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut o = serde_json::to_value(r).unwrap_or_else(|_| json!({}));
            o["id"] = json!(i);
            o
        })
        .collect::<Vec<_>>());
    v
}

fn sample(socket: &Path) -> Result<Snapshot, String> {
    let reply = crate::api::request(socket, &crate::api::Call::Stats)?;
    if reply["ok"] != true {
        return Err(format!("the VM refused stats: {}", reply["error"]));
    }
    parse_stats(&reply)
}

/// Runs `exitless top`.
pub fn main(args: &TopArgs) -> Result<(), String> {
    let mut prev = sample(&args.socket)?;
    if args.json {
        run_json(args, &mut prev)
    } else {
        tui::run(args, prev)
    }
}

/// The next sample; `None` when the VM has ended (its socket is gone). A failure while the
/// socket is still there is retried at the next interval, three times at most.
fn next_sample(args: &TopArgs) -> Result<Option<Snapshot>, String> {
    let mut tries = 0;
    loop {
        match sample(&args.socket) {
            Ok(s) => return Ok(Some(s)),
            Err(_) if !args.socket.exists() => return Ok(None),
            Err(e) if tries >= 3 => return Err(e),
            Err(e) => {
                eprintln!("exitless top: {e} (retrying)");
                tries += 1;
                std::thread::sleep(Duration::from_secs_f64(args.interval));
            }
        }
    }
}

fn run_json(args: &TopArgs, prev: &mut Snapshot) -> Result<(), String> {
    use std::io::Write;
    let mut n = 0;
    while args.count.is_none_or(|c| n < c) {
        std::thread::sleep(Duration::from_secs_f64(args.interval));
        let Some(cur) = next_sample(args)? else {
            eprintln!("exitless top: the VM has ended");
            return Ok(());
        };
        let (all, per) = between(prev, &cur);
        let line = json_line(&cur, &all, &per);
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            return Ok(()); // the reader went away
        }
        *prev = cur;
        n += 1;
    }
    Ok(())
}

/// The rows of the table: label, value of all vCPUs, values of each.
pub fn table_rows(all: &Rates, per: &[Rates]) -> Vec<(String, Vec<String>)> {
    let rate = |v: f64| format!("{v:.0}");
    type Get = fn(&Rates) -> f64;
    let fixed: [(&str, Get); 6] = [
        ("exits/s (all, KVM)", |r| r.exits_per_s),
        ("  to userspace/s", |r| r.userspace_exits_per_s),
        ("interrupts injected/s", |r| r.interrupts_per_s),
        ("IRQ-window exits/s", |r| r.irq_window_exits_per_s),
        ("halt exits/s", |r| r.halt_exits_per_s),
        ("exits per interrupt", rates::exits_per_interrupt),
    ];
    let cols = |f: &dyn Fn(&Rates) -> String| -> Vec<String> {
        std::iter::once(all).chain(per).map(f).collect()
    };
    let mut rows: Vec<(String, Vec<String>)> = fixed
        .iter()
        .map(|(label, get)| {
            let fmt = if label.starts_with("exits per") {
                |v: f64| format!("{v:.2}")
            } else {
                rate
            };
            (label.to_string(), cols(&|r| fmt(get(r))))
        })
        .collect();
    rows.push((
        "time in guest".into(),
        cols(&|r| format!("{:.1}%", 100.0 * r.time_in_guest)),
    ));
    type Pick = fn(&Rates) -> &std::collections::BTreeMap<String, f64>;
    let picks: [(&str, Pick); 2] = [
        ("userspace ", |r| &r.userspace_by_reason),
        ("in-kernel ", |r| &r.kernel_by_reason),
    ];
    for (prefix, pick) in picks {
        for reason in pick(all).keys() {
            rows.push((
                format!("{prefix}{reason}/s"),
                cols(&|r| rate(pick(r).get(reason).copied().unwrap_or(0.0))),
            ));
        }
    }
    rows
}

mod tui {
    use super::*;
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    use ratatui::crossterm::terminal;
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Modifier, Style};
    use ratatui::widgets::{Block, Paragraph, Row, Table};

    /// Leaves the alternate screen and raw mode however top ends.
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            ratatui::restore();
        }
    }

    pub fn run(args: &TopArgs, mut prev: Snapshot) -> Result<(), String> {
        let mut term = ratatui::try_init().map_err(|e| format!("terminal: {e}"))?;
        let _restore = Restore;
        let _ = terminal::enable_raw_mode();
        let mut shown: Option<(Rates, Vec<Rates>)> = None;
        let mut status = String::from("waiting for the first interval...");
        let mut n = 0;
        let mut next = std::time::Instant::now() + Duration::from_secs_f64(args.interval);
        loop {
            let snap = &prev;
            term.draw(|f| {
                let [head, body] =
                    Layout::vertical([Constraint::Length(3), Constraint::Min(0)]).areas(f.area());
                let title = format!(
                    " exitless top: {} (every {} s; q quits) ",
                    args.socket.display(),
                    args.interval
                );
                f.render_widget(
                    Paragraph::new(format!(
                        "uptime {:.1} s, {} vCPU(s); in-kernel reasons: {}\n{status}",
                        snap.uptime_s,
                        snap.vcpus.len(),
                        snap.kernel_reasons
                    ))
                    .block(Block::bordered().title(title)),
                    head,
                );
                if let Some((all, per)) = &shown {
                    let mut header = vec!["".to_string(), "all".to_string()];
                    header.extend((0..per.len()).map(|i| format!("vcpu{i}")));
                    let rows = table_rows(all, per).into_iter().map(|(label, vals)| {
                        Row::new(std::iter::once(label).chain(vals).collect::<Vec<_>>())
                    });
                    let mut widths = vec![Constraint::Length(34)];
                    widths.extend((0..=per.len()).map(|_| Constraint::Length(12)));
                    f.render_widget(
                        Table::new(rows, widths)
                            .header(
                                Row::new(header)
                                    .style(Style::default().add_modifier(Modifier::BOLD)),
                            )
                            .block(Block::bordered()),
                        body,
                    );
                }
            })
            .map_err(|e| format!("terminal: {e}"))?;
            if args.count.is_some_and(|c| n >= c) {
                return Ok(());
            }
            let wait = next.saturating_duration_since(std::time::Instant::now());
            if event::poll(wait).map_err(|e| format!("terminal: {e}"))? {
                if let Ok(Event::Key(k)) = event::read() {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                continue;
            }
            next += Duration::from_secs_f64(args.interval);
            match next_sample(args) {
                Ok(Some(cur)) => {
                    shown = Some(between(&prev, &cur));
                    status = String::new();
                    prev = cur;
                    n += 1;
                }
                other => {
                    drop(term);
                    drop(_restore);
                    return other.map(|_| eprintln!("exitless top: the VM has ended"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(uptime: f64, exits: u64, injections: u64, run_ns: u64) -> Value {
        json!({
            "ok": true,
            "uptime_s": uptime,
            "exits": {"io_out": exits / 2},
            "kvm": {"exits": exits},
            "vcpus": [
                {"id": 0, "exits": {"io_out": exits / 2}, "run_ns": run_ns,
                 "kvm": {"exits": exits, "irq_injections": injections, "io_exits": 3}},
                {"id": 1, "exits": {}, "run_ns": run_ns / 2,
                 "kvm": {"exits": 0, "irq_injections": 0}},
            ],
        })
    }

    #[test]
    fn json_lines_from_two_replies() {
        let a = parse_stats(&reply(1.0, 100, 10, 0)).unwrap();
        let b = parse_stats(&reply(3.0, 500, 210, 1_000_000_000)).unwrap();
        let (all, per) = between(&a, &b);
        let line = json_line(&b, &all, &per);
        assert_eq!(line["exits_per_s"], 200.0);
        assert_eq!(line["interrupts_per_s"], 100.0);
        assert_eq!(line["irq_window_exits_per_s"], 0.0);
        assert_eq!(line["exits_per_interrupt"], 2.0);
        // vCPU 0: 1 s of 2 in KVM_RUN; vCPU 1: 0.5 s of 2; mean 0.375.
        assert_eq!(line["time_in_guest"], 0.375);
        assert_eq!(line["vcpus"][0]["time_in_guest"], 0.5);
        assert_eq!(line["vcpus"][1]["id"], 1);
        assert_eq!(line["userspace_by_reason"]["io_out"], 100.0);
        assert!(line["kernel_exit_reasons"]
            .as_str()
            .unwrap()
            .contains("aggregate"));
        let rows = table_rows(&all, &per);
        assert_eq!(rows[0].1, ["200", "200", "0"]);
        assert!(rows.iter().any(|(l, _)| l == "in-kernel io_exits/s"));
        assert!(rows.iter().any(|(l, _)| l == "userspace io_out/s"));
    }

    #[test]
    fn replies_without_what_top_needs_are_errors() {
        assert!(parse_stats(&json!({"ok": true})).is_err());
        let e = parse_stats(&json!({"ok": true, "uptime_s": 1.0})).unwrap_err();
        assert!(e.contains("per-vCPU"), "{e}");
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("0.5").unwrap(), 0.5);
        for bad in ["0", "-1", "x", "1e9", "NaN"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
