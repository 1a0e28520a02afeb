//! passwd/shadow/group/gshadow parsing and the account merge. The input is eight
//! files (old passwd, shadow, group, gshadow, then the new OS's) separated by NUL.
#![no_main]
use dualroot::accounts::{merge, parse_group, parse_passwd, AccountFiles};
use dualroot::plan::Accounts;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data
        .split(|&b| b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let mut next = || parts.next().unwrap_or_default();
    let old = AccountFiles {
        passwd: next(),
        shadow: next(),
        group: next(),
        gshadow: next(),
    };
    let new = AccountFiles {
        passwd: next(),
        shadow: next(),
        group: next(),
        gshadow: next(),
    };
    let _ = parse_passwd(&old.passwd);
    let _ = parse_group(&old.group);
    let policy = Accounts {
        people_min_uid: 1000,
        people_max_uid: 60000,
        services: vec!["postgres".into(), "appsvc".into()],
        root_password: true,
    };
    let _ = merge(&old, &new, &policy);
});
