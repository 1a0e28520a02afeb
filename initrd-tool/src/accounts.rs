//! Account merge between the old system and the new root.
//!
//! The new OS's system accounts win. The appliance's people (UID range of the plan)
//! and listed service accounts are carried with their password hashes and group
//! memberships. When a carried name already exists in the new OS, the new UID/GID is
//! kept and carried files are re-owned *by name* through the returned maps. A carried
//! person whose name is a system account in the new OS cannot be resolved: that stops
//! the migration before the point of no return.
//!
//! Files are read and written here; dualroot never asks NSS (static binary).

use crate::plan::Accounts;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub name: String,
    pub passwd: String,
    pub uid: u32,
    pub gid: u32,
    pub gecos: String,
    pub home: String,
    pub shell: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub name: String,
    pub passwd: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// The four account databases, as text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccountFiles {
    pub passwd: String,
    pub shadow: String,
    pub group: String,
    pub gshadow: String,
}

pub fn parse_passwd(text: &str) -> Result<Vec<User>> {
    let mut v = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() || l.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = l.split(':').collect();
        if f.len() != 7 {
            bail!(
                "passwd line {} has {} fields, expected 7: {l:?}",
                i + 1,
                f.len()
            );
        }
        v.push(User {
            name: f[0].into(),
            passwd: f[1].into(),
            uid: f[2]
                .parse()
                .with_context(|| format!("passwd line {}: bad UID {:?}", i + 1, f[2]))?,
            gid: f[3]
                .parse()
                .with_context(|| format!("passwd line {}: bad GID {:?}", i + 1, f[3]))?,
            gecos: f[4].into(),
            home: f[5].into(),
            shell: f[6].into(),
        });
    }
    Ok(v)
}

pub fn parse_group(text: &str) -> Result<Vec<Group>> {
    let mut v = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() || l.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = l.split(':').collect();
        if f.len() != 4 {
            bail!(
                "group line {} has {} fields, expected 4: {l:?}",
                i + 1,
                f.len()
            );
        }
        v.push(Group {
            name: f[0].into(),
            passwd: f[1].into(),
            gid: f[2]
                .parse()
                .with_context(|| format!("group line {}: bad GID {:?}", i + 1, f[2]))?,
            members: f[3]
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        });
    }
    Ok(v)
}

/// `name -> whole line` for shadow/gshadow style files.
fn lines_by_name(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            l.split_once(':')
                .map(|(n, _)| (n.to_string(), l.to_string()))
        })
        .collect()
}

/// Result of a merge: the new databases and how carried owners map.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub files: AccountFiles,
    /// Old UID -> UID in the new root, for every carried account (by name).
    pub uid_map: BTreeMap<u32, u32>,
    /// Old GID -> GID in the new root, for every carried group (by name).
    pub gid_map: BTreeMap<u32, u32>,
    /// One line per decision, for the journal.
    pub notes: Vec<String>,
}

fn free_id(used: &BTreeSet<u32>, wanted: u32, lo: u32, hi: u32, descending: bool) -> Option<u32> {
    if (lo..=hi).contains(&wanted) && !used.contains(&wanted) {
        return Some(wanted);
    }
    if descending {
        (lo..=hi).rev().find(|i| !used.contains(i))
    } else {
        (lo..=hi).find(|i| !used.contains(i))
    }
}

pub fn merge(old: &AccountFiles, new: &AccountFiles, policy: &Accounts) -> Result<Merged> {
    let old_users = parse_passwd(&old.passwd).context("old /etc/passwd")?;
    let old_groups = parse_group(&old.group).context("old /etc/group")?;
    let mut users = parse_passwd(&new.passwd).context("new /etc/passwd")?;
    let mut groups = parse_group(&new.group).context("new /etc/group")?;
    let old_shadow = lines_by_name(&old.shadow);
    let old_gshadow = lines_by_name(&old.gshadow);
    let mut shadow = lines_by_name(&new.shadow);
    let mut gshadow = lines_by_name(&new.gshadow);
    let mut notes = Vec::new();
    let mut uid_map = BTreeMap::new();
    let mut gid_map = BTreeMap::new();
    let people = policy.people_min_uid..=policy.people_max_uid;

    let carried: Vec<&User> = old_users
        .iter()
        .filter(|u| people.contains(&u.uid) || policy.services.contains(&u.name))
        .collect();
    for s in &policy.services {
        if !old_users.iter().any(|u| &u.name == s) {
            bail!("service account {s:?} listed in the plan does not exist on this system");
        }
    }

    // Groups first: every group a carried account is in (primary or member).
    let old_gid_name: BTreeMap<u32, &str> = old_groups
        .iter()
        .map(|g| (g.gid, g.name.as_str()))
        .collect();
    let carried_names: BTreeSet<&str> = carried.iter().map(|u| u.name.as_str()).collect();
    for og in &old_groups {
        let is_primary = carried.iter().any(|u| u.gid == og.gid);
        let carried_members: Vec<&String> = og
            .members
            .iter()
            .filter(|m| carried_names.contains(m.as_str()))
            .collect();
        if !is_primary && carried_members.is_empty() {
            continue;
        }
        if let Some(ng) = groups.iter_mut().find(|g| g.name == og.name) {
            for m in carried_members {
                if !ng.members.contains(m) {
                    ng.members.push(m.clone());
                }
            }
            if let Some(line) = gshadow.get_mut(&og.name) {
                *line = set_gshadow_members(line, &ng.members);
            }
            if ng.gid != og.gid {
                notes.push(format!(
                    "group {}: GID {} on the old system, {} on the new; files re-owned by name",
                    og.name, og.gid, ng.gid
                ));
            }
            gid_map.insert(og.gid, ng.gid);
        } else if is_primary || og.gid >= policy.people_min_uid {
            let used: BTreeSet<u32> = groups.iter().map(|g| g.gid).collect();
            let (lo, hi, desc) = if og.gid >= policy.people_min_uid {
                (policy.people_min_uid, policy.people_max_uid, false)
            } else {
                (100, 999, true)
            };
            let gid = free_id(&used, og.gid, lo, hi, desc)
                .with_context(|| format!("no free GID for group {} in {lo}..{hi}", og.name))?;
            if gid != og.gid {
                notes.push(format!(
                    "group {}: GID {} is taken on the new system, now {gid}",
                    og.name, og.gid
                ));
            }
            let members = og
                .members
                .iter()
                .filter(|m| carried_names.contains(m.as_str()))
                .cloned()
                .collect();
            groups.push(Group {
                name: og.name.clone(),
                passwd: og.passwd.clone(),
                gid,
                members,
            });
            let gs = old_gshadow
                .get(&og.name)
                .cloned()
                .unwrap_or_else(|| format!("{}:!::", og.name));
            gshadow.insert(og.name.clone(), gs);
            gid_map.insert(og.gid, gid);
        }
        // A supplementary group that exists only on the old system and is a system
        // group is dropped: its purpose belonged to the old OS.
    }
    for (name, line) in gshadow.iter_mut() {
        if let Some(g) = groups.iter().find(|g| &g.name == name) {
            *line = set_gshadow_members(line, &g.members);
        }
    }

    for ou in &carried {
        let is_person = people.contains(&ou.uid);
        let pgid = old_gid_name
            .get(&ou.gid)
            .and_then(|n| groups.iter().find(|g| g.name == *n))
            .map(|g| g.gid)
            .unwrap_or(ou.gid);
        if let Some(nu) = users.iter_mut().find(|u| u.name == ou.name) {
            if is_person && nu.uid < policy.people_min_uid {
                bail!(
                    "account {:?} (UID {}) is a person on the old system but a system account (UID {}) on the new one; it cannot be carried without breaking the new OS",
                    ou.name, ou.uid, nu.uid
                );
            }
            if nu.uid != ou.uid {
                notes.push(format!(
                    "account {}: UID {} on the old system, {} on the new; files re-owned by name",
                    ou.name, ou.uid, nu.uid
                ));
            }
            uid_map.insert(ou.uid, nu.uid);
            nu.gecos = ou.gecos.clone();
            nu.home = ou.home.clone();
            nu.shell = ou.shell.clone();
            nu.gid = pgid;
        } else {
            let used: BTreeSet<u32> = users.iter().map(|u| u.uid).collect();
            let (lo, hi, desc) = if is_person {
                (policy.people_min_uid, policy.people_max_uid, false)
            } else {
                (100, 999, true)
            };
            let uid = free_id(&used, ou.uid, lo, hi, desc)
                .with_context(|| format!("no free UID for account {} in {lo}..{hi}", ou.name))?;
            if uid != ou.uid {
                notes.push(format!(
                    "account {}: UID {} is taken on the new system, now {uid}",
                    ou.name, ou.uid
                ));
            }
            uid_map.insert(ou.uid, uid);
            users.push(User {
                uid,
                gid: pgid,
                ..(*ou).clone()
            });
        }
        match old_shadow.get(&ou.name) {
            Some(line) => {
                shadow.insert(ou.name.clone(), line.clone());
            }
            None => {
                shadow
                    .entry(ou.name.clone())
                    .or_insert_with(|| format!("{}:!:19000:0:99999:7:::", ou.name));
            }
        }
        notes.push(format!(
            "account {} carried with its password hash",
            ou.name
        ));
    }
    if policy.root_password {
        if let (Some(old_root), Some(new_root)) = (old_shadow.get("root"), shadow.get_mut("root")) {
            *new_root = old_root.clone();
            notes.push("root's password hash carried".into());
        }
    }

    users.sort_by_key(|u| (u.uid >= 65534, u.uid));
    let order: BTreeMap<&str, usize> = users
        .iter()
        .enumerate()
        .map(|(i, u)| (u.name.as_str(), i))
        .collect();
    let mut shadow_lines: Vec<(usize, String)> = shadow
        .into_iter()
        .map(|(n, l)| (order.get(n.as_str()).copied().unwrap_or(usize::MAX), l))
        .collect();
    shadow_lines.sort();
    let gorder: BTreeMap<&str, u32> = groups.iter().map(|g| (g.name.as_str(), g.gid)).collect();
    let mut gshadow_lines: Vec<(u32, String, String)> = gshadow
        .into_iter()
        .map(|(n, l)| (gorder.get(n.as_str()).copied().unwrap_or(u32::MAX), n, l))
        .collect();
    gshadow_lines.sort();
    groups.sort_by_key(|g| (g.gid >= 65534, g.gid));

    let files = AccountFiles {
        passwd: users
            .iter()
            .map(|u| {
                format!(
                    "{}:{}:{}:{}:{}:{}:{}\n",
                    u.name, u.passwd, u.uid, u.gid, u.gecos, u.home, u.shell
                )
            })
            .collect(),
        shadow: shadow_lines.into_iter().map(|(_, l)| l + "\n").collect(),
        group: groups
            .iter()
            .map(|g| {
                format!(
                    "{}:{}:{}:{}\n",
                    g.name,
                    g.passwd,
                    g.gid,
                    g.members.join(",")
                )
            })
            .collect(),
        gshadow: gshadow_lines
            .into_iter()
            .map(|(_, _, l)| l + "\n")
            .collect(),
    };
    Ok(Merged {
        files,
        uid_map,
        gid_map,
        notes,
    })
}

fn set_gshadow_members(line: &str, members: &[String]) -> String {
    let mut f: Vec<String> = line.split(':').map(str::to_string).collect();
    f.resize(4, String::new());
    f[3] = members.join(",");
    f.join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn old() -> AccountFiles {
        AccountFiles {
            passwd: "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\nsvcapp:x:998:998:App service:/var/lib/app:/usr/sbin/nologin\nadmin:x:1000:1000:Admin,,,:/home/admin:/bin/bash\nops:x:1001:1001::/home/ops:/bin/sh\n".into(),
            shadow: "root:$6$oldroot$hash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nsvcapp:!:19000::::::\nadmin:$6$salt$adminhash:19000:0:99999:7:::\nops:$6$s2$opshash:19000:0:99999:7:::\n".into(),
            group: "root:x:0:\nsudo:x:27:admin\nsvcapp:x:998:\nadmin:x:1000:\nops:x:1001:\nappusers:x:1500:admin,ops\nlegacysys:x:500:admin\n".into(),
            gshadow: "root:*::\nsudo:*::admin\nsvcapp:!::\nadmin:!::\nops:!::\nappusers:!::admin,ops\nlegacysys:!::admin\n".into(),
        }
    }

    fn new() -> AccountFiles {
        AccountFiles {
            // New OS: 998 is taken by a system account, admin exists with UID 1001
            // (another group layout), 1000 belongs to someone else.
            passwd: "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\nsystemd-network:x:998:998:systemd Network Management:/:/usr/sbin/nologin\ndebian:x:1000:1000::/home/debian:/bin/bash\nadmin:x:1001:1001::/home/admin:/bin/bash\n".into(),
            shadow: "root:*:20000:0:99999:7:::\ndaemon:*:20000:0:99999:7:::\nsystemd-network:!*:20000::::::\ndebian:!:20000:::::\nadmin:!:20000:::::\n".into(),
            group: "root:x:0:\nsudo:x:27:\nsystemd-network:x:998:\ndebian:x:1000:\nadmin:x:1001:\nwheel:x:10:\n".into(),
            gshadow: "root:*::\nsudo:*::\nsystemd-network:!*::\ndebian:!::\nadmin:!::\nwheel:!::\n".into(),
        }
    }

    fn policy() -> Accounts {
        Accounts {
            services: vec!["svcapp".into()],
            ..Default::default()
        }
    }

    fn user(m: &Merged, name: &str) -> User {
        parse_passwd(&m.files.passwd)
            .unwrap()
            .into_iter()
            .find(|u| u.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    }

    #[test]
    fn admin_with_other_uid_keeps_new_uid_and_old_hash() {
        let m = merge(&old(), &new(), &policy()).unwrap();
        let admin = user(&m, "admin");
        assert_eq!(admin.uid, 1001);
        assert_eq!(admin.gecos, "Admin,,,");
        assert_eq!(m.uid_map[&1000], 1001);
        assert_eq!(m.gid_map[&1000], 1001);
        assert!(m.files.shadow.contains("admin:$6$salt$adminhash:"));
        assert!(m
            .notes
            .iter()
            .any(|n| n.contains("UID 1000 on the old system, 1001 on the new")));
    }

    #[test]
    fn uid_clash_gets_a_free_uid() {
        // ops had 1001, which the new OS gave to admin.
        let m = merge(&old(), &new(), &policy()).unwrap();
        let ops = user(&m, "ops");
        assert_eq!(ops.uid, 1002);
        assert_eq!(m.uid_map[&1001], 1002);
        // ops's primary group 1001 clashes with new admin group 1001 -> re-numbered.
        let groups = parse_group(&m.files.group).unwrap();
        let g = groups.iter().find(|g| g.name == "ops").unwrap();
        assert_ne!(g.gid, 1001);
        assert_eq!(ops.gid, g.gid);
        assert!(m.files.shadow.contains("ops:$6$s2$opshash:"));
    }

    #[test]
    fn system_accounts_of_new_os_win_and_service_is_renumbered() {
        let m = merge(&old(), &new(), &policy()).unwrap();
        assert_eq!(user(&m, "systemd-network").uid, 998);
        let svc = user(&m, "svcapp");
        assert!(svc.uid < 1000 && svc.uid != 998, "{}", svc.uid);
        assert_eq!(m.uid_map[&998], svc.uid);
        assert_eq!(user(&m, "debian").uid, 1000);
        assert!(m.files.shadow.contains("root:$6$oldroot$hash:"));
    }

    #[test]
    fn memberships_carried_and_old_only_system_groups_dropped() {
        let m = merge(&old(), &new(), &policy()).unwrap();
        let groups = parse_group(&m.files.group).unwrap();
        let sudo = groups.iter().find(|g| g.name == "sudo").unwrap();
        assert_eq!(sudo.members, vec!["admin"]);
        assert!(m.files.gshadow.contains("sudo:*::admin"));
        let app = groups.iter().find(|g| g.name == "appusers").unwrap();
        assert_eq!(
            (app.gid, app.members.clone()),
            (1500, vec!["admin".to_string(), "ops".to_string()])
        );
        assert!(!groups.iter().any(|g| g.name == "legacysys"));
        // Every group has a gshadow line and every user a shadow line.
        for g in &groups {
            assert!(
                m.files
                    .gshadow
                    .lines()
                    .any(|l| l.starts_with(&format!("{}:", g.name))),
                "{}",
                g.name
            );
        }
        for u in parse_passwd(&m.files.passwd).unwrap() {
            assert!(
                m.files
                    .shadow
                    .lines()
                    .any(|l| l.starts_with(&format!("{}:", u.name))),
                "{}",
                u.name
            );
        }
    }

    #[test]
    fn person_that_is_a_system_account_on_new_os_stops() {
        let mut n = new();
        n.passwd
            .push_str("ops:x:990:990::/nonexistent:/usr/sbin/nologin\n");
        let e = merge(&old(), &n, &policy()).unwrap_err();
        assert!(
            format!("{e:#}").contains(
                "\"ops\" (UID 1001) is a person on the old system but a system account (UID 990)"
            ),
            "{e:#}"
        );
    }

    #[test]
    fn unknown_service_account_is_named() {
        let p = Accounts {
            services: vec!["ghost".into()],
            ..Default::default()
        };
        let e = merge(&old(), &new(), &p).unwrap_err();
        assert!(format!("{e:#}").contains("\"ghost\""));
    }

    #[test]
    fn malformed_lines_are_named() {
        let mut o = old();
        o.passwd.push_str("broken:x:12\n");
        let e = merge(&o, &new(), &policy()).unwrap_err();
        assert!(format!("{e:#}").contains("old /etc/passwd"), "{e:#}");
    }
}
