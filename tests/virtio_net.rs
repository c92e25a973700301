//! virtio-net over a tap, under KVM: the kit's `virtio-net` guest ARPs for and pings the host
//! through a tap in a network namespace the test creates (and deletes, even on failure), and the
//! run report shows frames both ways. Skipped (with the reason printed) where /dev/kvm, tun or
//! network namespaces are not usable (not root). Also: a bad tap name is a one-line start-up
//! error.

mod common;

use common::netns::Netns;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const HOST_IP: &str = "192.168.127.1";
const TAP: &str = "exitless-tap0";

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("exitless-net-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn show(out: &Output) {
    eprintln!(
        "--- stdout:\n{}\n--- stderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kit_virtio_net_arps_and_pings_the_host_through_a_tap() {
    if !common::kvm_available("virtio-net") {
        return;
    }
    let ns = match Netns::with_tap("test", TAP, HOST_IP) {
        Ok(ns) => ns,
        Err(why) => {
            common::skip("kit_virtio_net_arps_and_pings_the_host_through_a_tap", &why);
            return;
        }
    };
    let d = scratch("ping");
    let json = d.join("stats.json");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(env!("CARGO_BIN_EXE_exitless"))
        .args(["run", "--guest", "virtio-net", "--timeout", "120"])
        .args(["--net", &format!("tap={TAP},mac=02:00:00:00:00:2a")])
        .arg("--stats-json")
        .arg(&json)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    show(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit status {:?}", out.status);
    assert!(stdout.contains("kit: PASS virtio-net"));
    assert!(stdout.contains("mac=02:00:00:00:00:2a host-mac="));
    assert!(stdout.contains("arp-reply ok ping-reply bytes=74"));

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let f = v["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["device"] == "virtio-net0")
        .map(|d| d["facts"].clone())
        .unwrap_or_else(|| panic!("no virtio-net0 facts in {v}"));
    let n = |k: &str| f[k].as_u64().unwrap_or_else(|| panic!("no {k} in {f}"));
    assert_eq!(n("driver_ok"), 1);
    // ARP request + echo request (+ an ARP reply if the host asked).
    assert!(n("tx_frames") >= 2, "{f}");
    // ARP reply + echo reply (+ whatever else the host sent).
    assert!(n("rx_frames") >= 2, "{f}");
    assert!(n("tx_bytes") >= 60 + 74 && n("rx_bytes") >= 42 + 74, "{f}");
    assert_eq!(n("rx_dropped"), 0);
    assert_eq!(n("tx_dropped"), 0);
    assert_eq!(n("bad_chains"), 0);
    assert_eq!(n("needs_reset"), 0);
    assert_eq!(n("mrg_rxbuf"), 1);
    // The guest took no offloads, so the tap was set to none.
    assert_eq!(n("offload_features"), 0);
    assert_eq!(n("tap_offloads"), 0);
    let report = std::fs::read_to_string(&json).unwrap();
    drop(ns);
    let _ = std::fs::remove_dir_all(&d);
    // Queue notifications went through ioeventfds: no exit on the notify page.
    assert!(
        !report.contains("0xc0003000"),
        "notify writes exited: {report}"
    );
}

#[test]
fn bad_tap_names_are_one_line_startup_errors() {
    for (arg, wants) in [
        ("tap=this-name-is-far-too-long", "this-name-is-far-too-long"),
        ("tap=", "--net needs tap=NAME"),
        ("tap=a/b", "a/b"),
    ] {
        // A name the parser takes but the kernel would not is refused when the VM is built.
        if arg == "tap=a/b" && !common::kvm_available("virtio-net tap=a/b") {
            continue;
        }
        let out = Command::new(env!("CARGO_BIN_EXE_exitless"))
            .args(["run", "--guest", "virtio-net", "--net", arg])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        show(&out);
        assert!(!out.status.success(), "{arg}: exit status {:?}", out.status);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{arg}: {stderr}");
        assert!(errors[0].contains(wants), "{arg}: {stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).is_empty());
    }
}
