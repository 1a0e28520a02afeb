//! `guestfwd-relay PORT`: what QEMU's user network runs for each guest
//! connection to a `guestfwd=...-cmd:` rule (`qemu::GuestFwd`). Its stdin,
//! stdout and stderr are the guest's connection; it joins them to
//! 127.0.0.1:PORT on the host, passes the guest's half-close on, and exits
//! when the host side closes. It never prints (stderr is the connection too).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};

fn copy(from: &mut impl Read, to: &mut impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn main() {
    let Some(port) = std::env::args().nth(1).and_then(|p| p.parse::<u16>().ok()) else {
        std::process::exit(2);
    };
    let Ok(host) = TcpStream::connect(("127.0.0.1", port)) else {
        std::process::exit(1);
    };
    let Ok(mut to_host) = host.try_clone() else {
        std::process::exit(1);
    };
    std::thread::spawn(move || {
        copy(&mut std::io::stdin().lock(), &mut to_host);
        let _ = to_host.shutdown(Shutdown::Write);
    });
    let mut from_host = host;
    copy(&mut from_host, &mut std::io::stdout().lock());
    // the host closed: closing our end closes the guest's connection
    std::process::exit(0);
}
