//! The new OS tree boots on its own (before any migration depends on it):
//! the tree on a plain ext4 disk, booted with its own kernel and initramfs
//! via `-kernel/-initrd`. Opt-in: `cargo test -p qemu-tests -- --ignored`.

use qemu_tests::cmd;
use qemu_tests::images;
use qemu_tests::parse::id_output;
use qemu_tests::qemu::{Boot, VmConfig};
use qemu_tests::scenario;
use qemu_tests::{Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn only_file(dir: &Path, prefix: &str) -> Result<std::path::PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(prefix))
        {
            found.push(p);
        }
    }
    found.sort();
    found
        .pop()
        .with_context(|| format!("no {prefix}* in {}", dir.display()))
}

#[test]
#[ignore = "boots a VM (minutes under TCG)"]
fn newos_tree_boots_from_plain_disk() {
    scenario::run("newos-boot", |sc| {
        let os = images::newos()?;
        // a private copy of the tree, plus what a migration would bring:
        // SSH host keys and a hostname
        let tree = sc.path("tree");
        cmd::run(Command::new("cp").arg("-a").arg(&os.root).arg(&tree))?;
        cmd::run(Command::new("ssh-keygen").arg("-A").arg("-f").arg(&tree))?;
        std::fs::write(tree.join("etc/hostname"), "newos-test\n")?;
        std::fs::write(
            tree.join("etc/network/interfaces.d/eth0"),
            "allow-hotplug eth0\niface eth0 inet dhcp\n",
        )?;
        let disk = sc.path("root.img");
        std::fs::File::create(&disk)?.set_len(2 << 30)?;
        cmd::run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "root", "-d"])
                .arg(&tree)
                .arg(&disk),
        )?;
        std::fs::remove_dir_all(&tree)?;

        let boot = os.root.join("boot");
        let cfg = VmConfig {
            boot: Boot::Kernel {
                kernel: only_file(&boot, "vmlinuz-")?,
                initrd: only_file(&boot, "initrd.img-")?,
                append: "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=10".into(),
            },
            ..VmConfig::default()
        }
        .disk(&disk, "raw");
        let mut vm = sc.vm("newos", cfg)?;
        vm.wait_for_console("DUALROOT-BOOTED", Duration::from_secs(300))?;
        vm.wait_for_ssh(Duration::from_secs(120))?;
        let console = vm.console_text();
        sc.check(
            "marker carries the test version",
            console.contains("DUALROOT-BOOTED newos-test 13.0-test"),
            "DUALROOT-BOOTED line",
        )?;
        let rel = vm.ssh_ok(". /etc/os-release; echo $VERSION_ID")?;
        sc.check("os-release is Debian 13", rel.trim() == "13", rel.trim())?;
        let id_text = vm.ssh_ok("id admin")?;
        let id = id_output(&id_text).context("parsing `id admin`")?;
        sc.check(
            "admin is 1001:1001 and in operators (1000)",
            id.uid == 1001 && id.gid == 1001 && id.groups.contains(&(1000, "operators".into())),
            id_text.trim(),
        )?;
        let tools = vm.ssh_ok("lvm version | head -n1; grub-install --version")?;
        sc.check(
            "lvm and GRUB 2.12 present",
            tools.contains("LVM version") && tools.contains("2.12"),
            &tools.replace('\n', "; "),
        )?;
        let initrd_lvm =
            vm.ssh_ok("lsinitramfs /boot/initrd.img-$(uname -r) | grep -c 'sbin/lvm$' || true")?;
        sc.check(
            "initramfs can activate LVM",
            initrd_lvm.trim() != "0",
            &format!("{} lvm binaries", initrd_lvm.trim()),
        )?;
        vm.sample_guest_memory()?;
        vm.shutdown(Duration::from_secs(120))?;
        Ok(())
    });
}

/// The signed bundle of the new OS verifies against the test keyring only,
/// and requires x86-64-v2. Needs `target/release/dualroot` (or
/// `$DUALROOT_BIN`); building the bundle takes minutes the first time.
#[test]
#[ignore = "builds the new OS bundle (minutes)"]
fn newos_bundle_is_signed_and_requires_v2() {
    scenario::run("newos-bundle", |sc| {
        let b = images::bundle()?;
        let bin = std::env::var_os("DUALROOT_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| images::workspace_dir().join("target/release/dualroot"));
        let verify = cmd::run(
            Command::new(&bin)
                .args(["bundle", "verify"])
                .arg(&b.path)
                .arg("--keyring")
                .arg(&b.keyring),
        )?;
        sc.check(
            "bundle verifies with the test keyring",
            verify.status.success(),
            String::from_utf8_lossy(&verify.stdout).trim(),
        )?;
        let inspect = cmd::run(Command::new(&bin).args(["bundle", "inspect"]).arg(&b.path))?;
        let text = String::from_utf8_lossy(&inspect.stdout);
        sc.check(
            "manifest requires x86-64-v2",
            text.contains("x86-64-v2"),
            "x86-64-v2 in `bundle inspect`",
        )?;
        // a keyring holding only the wrong key must refuse it
        let wrong = sc.path("wrong-keyring");
        std::fs::create_dir_all(&wrong)?;
        std::fs::copy(
            b.wrong_key.with_extension("key.pub"),
            wrong.join("wrong.pub"),
        )?;
        let refused = Command::new(&bin)
            .args(["bundle", "verify"])
            .arg(&b.path)
            .arg("--keyring")
            .arg(&wrong)
            .output()?;
        sc.check(
            "bundle refused with another keyring",
            !refused.status.success(),
            String::from_utf8_lossy(&refused.stderr)
                .lines()
                .last()
                .unwrap_or(""),
        )?;
        Ok(())
    });
}
