//! The field's size (issue 25): a bundle of about 1.8 GB compressed and 3.3 GB
//! unpacked (`bundle.sh scale`: the reference OS padded with random data, text
//! and 40000 small files) migrated in QEMU. The appliance's disk is grown to
//! 16 GiB (the slots are sized `auto` for the payload). First on a guest with
//! too little RAM: `stage` refuses with the sizes and the old system stays;
//! then on one with the memory that refusal asked for (+ what the old system
//! itself uses): the migration completes and the journal gives each step's
//! time, the window figures and the peak memory (dualroot RSS + staging tmpfs
//! at one moment).
//!
//! `qemu-tests/run-scenarios.sh scale`

mod common;

use common::*;
use qemu_tests::images;
use qemu_tests::scenario;
use qemu_tests::Context;
use std::process::Command;
use std::time::{Duration, Instant};

/// The old system's own use beyond what `stage` counts (kernel, services,
/// page cache it keeps), added to the budget's figure for the second boot.
const OLD_SYSTEM_MIB: u32 = 640;
/// Staging, scanning and unpacking 3.3 GB under TCG take tens of minutes.
const LONG: Duration = Duration::from_secs(3600);

#[test]
#[ignore = "boots VMs (about 45 minutes under TCG)"]
fn scale_migration_of_a_field_size_bundle() {
    scenario::run("scale-migration", |sc| {
        let big = images::bundle_scale()?;
        let plan = images::workspace_dir().join("fixtures/plans/lifecycle.toml");
        let size = std::fs::metadata(&big.path)?.len();
        println!("[{}] bundle {} MiB", sc.name, size >> 20);
        let cfg = appliance_with_bundle_and_plan(sc, &big.path, &plan, 2048)?;
        qemu_tests::cmd::run(
            Command::new("qemu-img")
                .args(["resize", "-q"])
                .arg(&cfg.disks[0].path)
                .arg("16G"),
        )
        .context("growing the appliance's disk to 16 GiB")?;
        let mut vm = sc.vm("appliance", cfg)?;
        boot_old(sc, &mut vm)?;
        // Too little RAM: refused by stage, with the sizes, nothing armed.
        let out = vm.ssh_timeout(
            &format!("sh /mnt/payload/install.sh >/dev/null && dualroot stage --plan {PLAN} 2>&1"),
            LONG,
        )?;
        let msg = out.stdout.trim().to_string();
        println!("[{}] stage with 2048 MiB:\n{msg}", sc.name);
        let needed: Option<u32> = msg
            .lines()
            .find_map(|l| {
                l.split(" MiB of RAM are needed")
                    .next()
                    .filter(|_| l.contains("of RAM are needed"))
            })
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse().ok());
        sc.check(
            "with 2048 MiB stage refuses, naming the RAM needed and its terms",
            !out.success()
                && needed.is_some()
                && msg.contains("bundle")
                && msg.contains("nothing was changed"),
            msg.lines().rev().find(|l| l.contains("RAM")).unwrap_or(""),
        )?;
        let env = vm.ssh_ok("grub-editenv /boot/grub/grubenv list")?;
        sc.check(
            "no one-shot entry is armed",
            !env.contains("next_entry"),
            &env.replace('\n', " "),
        )?;
        vm.shutdown(Duration::from_secs(120))?;

        // The memory the budget asked for.
        let memory = needed.unwrap_or(0) + OLD_SYSTEM_MIB;
        vm.config_mut().memory_mib = memory;
        println!("[{}] restarting with {memory} MiB", sc.name);
        vm.restart()?;
        boot_old(sc, &mut vm)?;
        let staged = vm.ssh_timeout(
            &format!("sh /mnt/payload/install.sh >/dev/null && dualroot stage --plan {PLAN} 2>&1"),
            LONG,
        )?;
        println!("[{}] stage:\n{}", sc.name, staged.stdout.trim());
        sc.check(
            "stage accepts it with the memory the budget asked for",
            staged.success(),
            staged
                .stdout
                .lines()
                .rev()
                .find(|l| l.contains("memory"))
                .unwrap_or(""),
        )?;
        vm.mark_console();
        let t0 = Instant::now();
        let _ = vm.ssh("systemctl reboot");
        vm.wait_for_console_any(
            &[DONE],
            &[REFUSED, RETRY, GAVE_UP],
            Duration::from_secs(4 * 3600),
        )?;
        let migrate_s = t0.elapsed().as_secs_f64();
        vm.wait_for_console(BOOTED, Duration::from_secs(900))?;
        vm.wait_for_ssh(Duration::from_secs(300))?;
        let v = vm.ssh_ok("cat /etc/dualroot-test-version; du -sm /opt/pad | cut -f1")?;
        sc.check(
            "slot a runs the field-size OS with its padding",
            v.lines().next().unwrap_or("").ends_with(".5")
                && v.lines()
                    .nth(1)
                    .and_then(|n| n.trim().parse::<u32>().ok())
                    .unwrap_or(0)
                    > 2500,
            &v.replace('\n', " "),
        )?;
        let j = common::reference::journal_done(sc, &vm)?;
        let mib = |v: &serde_json::Value| v.as_u64().unwrap_or(0) >> 20;
        let steps: Vec<String> = j["steps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        format!(
                            "{} {:.1} s",
                            s["step"].as_str().or(s["name"].as_str()).unwrap_or("?"),
                            s["seconds"].as_f64().unwrap_or(0.0)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let ponr = j["point_of_no_return_unix"].as_f64().unwrap_or(0.0);
        let window = j["recovery_ready_unix"].as_f64().unwrap_or(0.0) - ponr;
        let stashed = j["stash_done_unix"].as_f64().unwrap_or(0.0) - ponr;
        let p = &j["peak_memory"];
        println!(
            "[{}] SCALE: reboot -> DONE {migrate_s:.0} s; steps: {}; window {window:.1} s, GPT -> stashed {stashed:.1} s; peak {} MiB during {} (RSS {} + tmpfs {}); staged {} MiB (bundle {}), undo record {} MiB; highest RSS {} MiB",
            sc.name,
            steps.join(", "),
            mib(&p["bytes"]),
            p["step"].as_str().unwrap_or("?"),
            mib(&p["rss_bytes"]),
            mib(&p["tmpfs_bytes"]),
            mib(&j["staged_bytes"]),
            mib(&j["bundle_bytes"]),
            mib(&j["undo_bytes"]),
            mib(&j["peak_rss_bytes"]),
        );
        sc.check(
            "peak memory <= staged + undo record + 64 MiB, dualroot's RSS <= 64 MiB",
            mib(&j["staged_bytes"]) > 0
                && mib(&p["bytes"]) <= mib(&j["staged_bytes"]) + mib(&j["undo_bytes"]) + 64
                && mib(&j["peak_rss_bytes"]) <= 64,
            &format!(
                "peak {} MiB, staged {} MiB",
                mib(&p["bytes"]),
                mib(&j["staged_bytes"])
            ),
        )?;
        let st = slot_status(&vm)?;
        sc.check(
            "slot a booted",
            st["booted"] == "a",
            &st["slots"].to_string(),
        )?;
        // The A/B upgrade at the same size: `slot install` of the field-size
        // bundle into slot b, its time and its RSS (sampled every second). The
        // payload disk holds the staged files under stage/stage/ (install.sh
        // copies stage/ into /var/lib/dualroot).
        mount_payload(&vm)?;
        let out = vm.ssh_timeout(
            "/usr/local/sbin/dualroot slot install /mnt/payload/stage/stage/os.bundle --json >/root/install.json 2>/root/install.log & p=$!; m=0; \
             while kill -0 $p 2>/dev/null; do r=$(awk '/VmRSS/ {print $2}' /proc/$p/status 2>/dev/null); [ -n \"$r\" ] && [ \"$r\" -gt $m ] && m=$r; sleep 1; done; \
             wait $p; echo \"rc=$? rss_kib=$m\"; cat /root/install.json",
            LONG,
        )?
        .stdout;
        let mut lines = out.lines();
        let head = lines.next().unwrap_or("").to_string();
        let report: serde_json::Value =
            serde_json::from_str(&lines.collect::<Vec<_>>().join("\n")).unwrap_or_default();
        let rss_mib = head
            .split("rss_kib=")
            .nth(1)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(u64::MAX)
            >> 10;
        println!(
            "[{}] SCALE slot install: {head}; {:.0} s in all, unpack {:.0} s, {} entries; highest sampled RSS {rss_mib} MiB",
            sc.name,
            report["seconds"].as_f64().unwrap_or(0.0),
            report["unpack_seconds"].as_f64().unwrap_or(0.0),
            report["entries"]
        );
        sc.check(
            "slot install of the field-size bundle into slot b, RSS <= 64 MiB",
            head.starts_with("rc=0") && report["state"] == "installed" && rss_mib <= 64,
            &format!("{head}; {}", report["version"]),
        )?;
        vm.shutdown(Duration::from_secs(120))?;
        sc.discard_disks();
        Ok(())
    });
}
