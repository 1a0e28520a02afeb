//! A tiny HTTP/1.1 server on loopback for tests: static files with
//! Range/If-Range/ETag, JSON handlers, upload capture, and a switch that
//! cuts the connection after N body bytes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Close the connection after this many body bytes.
    pub cut_after: Option<usize>,
    /// With `cut_after`: send nothing for this long before closing (a stalled transfer).
    pub stall_ms: u64,
}

impl Resp {
    pub fn json(status: u16, v: &serde_json::Value) -> Resp {
        Resp {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: v.to_string().into_bytes(),
            cut_after: None,
            stall_ms: 0,
        }
    }
}

pub struct File {
    pub data: Vec<u8>,
    pub etag: String,
    /// Cut the next `cut_times` GET responses after `cut_at` body bytes.
    pub cut_at: usize,
    pub cut_times: u32,
    /// A cut response first stalls this long.
    pub stall_ms: u64,
}

type Handler = Box<dyn Fn(&Req) -> Option<Resp> + Send + Sync>;

pub struct Server {
    pub port: u16,
    pub tls: bool,
    pub requests: Arc<Mutex<Vec<Req>>>,
    pub files: Arc<Mutex<HashMap<String, File>>>,
    handler: Arc<Mutex<Option<Handler>>>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(None)
    }

    /// HTTPS with the given certificate chain and key (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Server {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .map(|c| c.unwrap())
                .collect();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Server::start_with(Some(Arc::new(cfg)))
    }

    fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let s = Server {
            port,
            tls: tls.is_some(),
            requests: Arc::new(Mutex::new(Vec::new())),
            files: Arc::new(Mutex::new(HashMap::new())),
            handler: Arc::new(Mutex::new(None)),
        };
        let (reqs, files, handler) = (s.requests.clone(), s.files.clone(), s.handler.clone());
        std::thread::spawn(move || {
            for stream in l.incoming() {
                let Ok(stream) = stream else { continue };
                let (reqs, files, handler) = (reqs.clone(), files.clone(), handler.clone());
                let tls = tls.clone();
                std::thread::spawn(move || {
                    let _ = match tls {
                        Some(cfg) => {
                            let conn = rustls::ServerConnection::new(cfg).unwrap();
                            serve(
                                rustls::StreamOwned::new(conn, stream),
                                &reqs,
                                &files,
                                &handler,
                            )
                        }
                        None => serve(stream, &reqs, &files, &handler),
                    };
                });
            }
        });
        s
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    pub fn add_file(&self, path: &str, data: Vec<u8>, etag: &str) {
        self.files.lock().unwrap().insert(
            path.into(),
            File {
                data,
                etag: etag.into(),
                cut_at: 0,
                cut_times: 0,
                stall_ms: 0,
            },
        );
    }

    pub fn cut(&self, path: &str, at: usize, times: u32) {
        let mut f = self.files.lock().unwrap();
        let f = f.get_mut(path).unwrap();
        f.cut_at = at;
        f.cut_times = times;
    }

    /// The next cut responses of `path` stall `ms` before closing.
    pub fn stall(&self, path: &str, ms: u64) {
        self.files.lock().unwrap().get_mut(path).unwrap().stall_ms = ms;
    }

    pub fn set_handler<F: Fn(&Req) -> Option<Resp> + Send + Sync + 'static>(&self, f: F) {
        *self.handler.lock().unwrap() = Some(Box::new(f));
    }

    pub fn requests_to(&self, path: &str) -> Vec<Req> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }
}

fn read_head<S: Read>(s: &mut S) -> std::io::Result<Option<String>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Ok(None);
        }
        head.push(b[0]);
    }
    Ok(Some(String::from_utf8_lossy(&head).into_owned()))
}

fn serve<S: Read + Write>(
    mut w: S,
    reqs: &Mutex<Vec<Req>>,
    files: &Mutex<HashMap<String, File>>,
    handler: &Mutex<Option<Handler>>,
) -> std::io::Result<()> {
    loop {
        let Some(head) = read_head(&mut w)? else {
            return Ok(());
        };
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap_or("");
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = HashMap::new();
        for h in lines {
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        w.read_exact(&mut body)?;
        let req = Req {
            method,
            path,
            headers,
            body,
        };
        reqs.lock().unwrap().push(req.clone());
        let resp = handler
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|h| h(&req))
            .or_else(|| file_response(&req, files))
            .unwrap_or(Resp {
                status: 404,
                headers: vec![],
                body: b"not found".to_vec(),
                cut_after: None,
                stall_ms: 0,
            });
        let mut head = format!(
            "HTTP/1.1 {} X\r\nContent-Length: {}\r\nDate: {}\r\n",
            resp.status,
            resp.body.len(),
            "Thu, 01 Jan 2026 00:00:00 GMT"
        );
        for (k, v) in &resp.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        w.write_all(head.as_bytes())?;
        match resp.cut_after {
            Some(n) => {
                w.write_all(&resp.body[..n.min(resp.body.len())])?;
                w.flush()?;
                std::thread::sleep(std::time::Duration::from_millis(resp.stall_ms));
                return Ok(()); // dropping the stream closes the connection
            }
            None => w.write_all(&resp.body)?,
        }
        w.flush()?;
    }
}

fn file_response(req: &Req, files: &Mutex<HashMap<String, File>>) -> Option<Resp> {
    let mut files = files.lock().unwrap();
    let f = files.get_mut(&req.path)?;
    let total = f.data.len();
    let mut start = 0usize;
    let mut status = 200;
    if let Some(range) = req.headers.get("range") {
        let if_range_ok = req.headers.get("if-range").is_none_or(|v| *v == f.etag);
        if if_range_ok {
            if let Some(s) = range
                .strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok())
            {
                if s >= total {
                    return Some(Resp {
                        status: 416,
                        headers: vec![("Content-Range".into(), format!("bytes */{total}"))],
                        body: vec![],
                        cut_after: None,
                        stall_ms: 0,
                    });
                }
                start = s;
                status = 206;
            }
        }
    }
    let mut headers = vec![
        ("ETag".into(), f.etag.clone()),
        ("Accept-Ranges".into(), "bytes".into()),
    ];
    if status == 206 {
        headers.push((
            "Content-Range".into(),
            format!("bytes {start}-{}/{total}", total - 1),
        ));
    }
    let stall_ms = f.stall_ms;
    let cut_after = if f.cut_times > 0 {
        f.cut_times -= 1;
        Some(f.cut_at)
    } else {
        None
    };
    Some(Resp {
        status,
        headers,
        body: f.data[start..].to_vec(),
        cut_after,
        stall_ms,
    })
}
