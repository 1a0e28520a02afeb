//! The HTTP room: the agent's registration contract and the operator's JSON
//! API (README.md lists it). [`route`] is a plain function from a request
//! to a status and a JSON body; the server around it is tiny_http (small,
//! synchronous, no async runtime for a handful of requests a second).

use crate::rollout::{self, Spec};
use crate::tasks::{self, NewTask};
use crate::{devices, Fleet};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Request<'a> {
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub query: BTreeMap<String, String>,
    /// The `Authorization: Bearer` token, if any.
    pub bearer: Option<&'a str>,
    pub body: &'a [u8],
}

fn err(code: u16, msg: impl Into<String>) -> (u16, Value) {
    (code, json!({"error": msg.into()}))
}

fn body_json<T: serde::de::DeserializeOwned>(r: &Request, what: &str) -> Result<T, (u16, Value)> {
    serde_json::from_slice(r.body).map_err(|e| err(400, format!("reading {what}: {e}")))
}

/// An error from the store or a refused action: 409 for a refusal the
/// operator can act on (a wrong state), 404 for a missing thing.
fn refusal(e: anyhow::Error) -> (u16, Value) {
    let msg = format!("{e:#}");
    if msg.starts_with("no ") {
        err(404, msg)
    } else {
        err(409, msg)
    }
}

pub fn route(f: &Fleet, r: &Request) -> (u16, Value) {
    let now = f.now();
    let cfg = &f.cfg;
    let parts: Vec<&str> = r.path.trim_matches('/').split('/').collect();
    match (r.method, parts.as_slice()) {
        ("POST", ["api", "register"]) => {
            let hw: Value = serde_json::from_slice::<Value>(r.body)
                .ok()
                .and_then(|v| v.get("hardware").cloned())
                .unwrap_or(Value::Null);
            let token = r.bearer.unwrap_or("");
            match f.store.tx(|tx| devices::register(tx, cfg, now, token, &hw)) {
                Ok(Some(i)) => (200, json!(i)),
                Ok(None) => err(401, "unknown register token"),
                Err(e) => err(500, format!("{e:#}")),
            }
        }
        ("POST", ["api", "token", "refresh"]) => {
            let token = r.bearer.unwrap_or("");
            match f.store.tx(|tx| devices::refresh(tx, cfg, now, token)) {
                Ok(Some(i)) => (200, json!(i)),
                Ok(None) => err(401, "device token unknown or expired: register again"),
                Err(e) => err(500, format!("{e:#}")),
            }
        }
        (_, ["api", "v1", ..]) => {
            if let Some(want) = &cfg.operator_token {
                if r.bearer != Some(want.as_str()) {
                    return err(401, "operator token missing or wrong");
                }
            }
            operator(f, r, &parts[2..], now)
        }
        _ => err(404, format!("no route {} {}", r.method, r.path)),
    }
}

/// `GET /devices` pages: the default size and the largest a client may ask.
pub const DEVICE_PAGE: i64 = 500;
pub const MAX_DEVICE_PAGE: i64 = 5000;

fn operator(f: &Fleet, r: &Request, parts: &[&str], now: i64) -> (u16, Value) {
    let cfg = &f.cfg;
    let q = |k: &str| r.query.get(k).map(String::as_str);
    let res: Result<(u16, Value), (u16, Value)> = (|| match (r.method, parts) {
        ("GET", ["devices"]) => {
            let limit = match q("limit").map(str::parse::<i64>) {
                None => DEVICE_PAGE,
                Some(Ok(n)) if (1..=MAX_DEVICE_PAGE).contains(&n) => n,
                Some(_) => return Err(err(400, format!("limit must be 1..{MAX_DEVICE_PAGE}"))),
            };
            let cursor = q("cursor").filter(|c| !c.is_empty());
            // one more than asked: whether another page follows
            let mut page = f
                .store
                .tx(|tx| devices::page(tx, cfg, now, cursor, limit + 1))
                .map_err(refusal)?;
            let more = page.len() as i64 > limit;
            page.truncate(limit as usize);
            let next = more.then(|| page.last().map(|d| d.id.clone())).flatten();
            Ok((200, json!({"devices": page, "nextCursor": next})))
        }
        // the device plus its recent tasks
        ("GET", ["devices", id]) => match f.store.tx(|tx| {
            let Some(d) = devices::get(tx, cfg, now, id)? else {
                return Ok(None);
            };
            let tasks = tasks::list(tx, Some(id), None, 20)?;
            Ok(Some(json!({"device": d, "tasks": tasks})))
        }) {
            Ok(Some(v)) => Ok((200, v)),
            Ok(None) => Err(err(404, format!("no device {id}"))),
            Err(e) => Err(refusal(e)),
        },
        ("PUT", ["devices", id, "labels"]) => {
            let labels: BTreeMap<String, String> = body_json(r, "labels (an object of strings)")?;
            f.store
                .tx(|tx| devices::set_labels(tx, now, id, &labels))
                .map_err(refusal)?;
            Ok((200, json!({"deviceId": id, "labels": labels})))
        }
        ("GET", ["tasks"]) => {
            let limit = q("limit").and_then(|l| l.parse().ok()).unwrap_or(200);
            let list = f
                .store
                .tx(|tx| tasks::list(tx, q("device"), q("rollout"), limit))
                .map_err(refusal)?;
            Ok((200, json!(list)))
        }
        ("GET", ["tasks", id]) => {
            let found = f
                .store
                .tx(|tx| {
                    let Some(t) = tasks::get(tx, id)? else {
                        return Ok(None);
                    };
                    let history: Vec<Value> = tasks::history(tx, id)?
                        .into_iter()
                        .map(|(at, from, to, reason)| {
                            json!({"at": at, "from": from, "to": to, "reason": reason})
                        })
                        .collect();
                    Ok(Some(json!({"task": t, "history": history})))
                })
                .map_err(refusal)?;
            found
                .map(|v| (200, v))
                .ok_or_else(|| err(404, format!("no task {id}")))
        }
        ("POST", ["tasks"]) => {
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "camelCase", deny_unknown_fields)]
            struct New {
                device_id: String,
                task_type: String,
                #[serde(default)]
                body: Value,
                #[serde(default)]
                target_version: Option<String>,
            }
            let n: New = body_json(r, "the task")?;
            let new = NewTask {
                device_id: n.device_id,
                task_type: n.task_type,
                body: if n.body.is_null() { json!({}) } else { n.body },
                target_version: n.target_version,
                rollout_id: None,
            };
            let t = f
                .store
                .tx(|tx| tasks::create(tx, cfg, now, &new, true))
                .map_err(refusal)?;
            Ok((201, json!(t)))
        }
        ("POST", ["tasks", id, "cancel"]) => {
            let (outcome, t) = f
                .store
                .tx(|tx| {
                    if tasks::get(tx, id)?.is_none() {
                        return Ok((None, None));
                    }
                    let why = "canceled by the operator";
                    let o = tasks::cancel(tx, cfg, now, id, why, tasks::CancelMode::Abort)?;
                    Ok((Some(o), tasks::get(tx, id)?))
                })
                .map_err(refusal)?;
            let (Some(outcome), Some(t)) = (outcome, t) else {
                return Err(err(404, format!("no task {id}")));
            };
            let said = match outcome {
                tasks::Canceling::Canceled => "canceled",
                tasks::Canceling::Asked => "asked: the device answers",
                tasks::Canceling::Nothing => "nothing to cancel: the task has ended",
                tasks::Canceling::TooLate => {
                    return Err(err(
                        409,
                        format!(
                            "task {id} is {}, past the point of no return: it runs to its end",
                            t.state.name()
                        ),
                    ))
                }
            };
            Ok((200, json!({"cancel": said, "task": t})))
        }
        ("GET", ["rollouts"]) => {
            let l = f.store.tx(rollout::list).map_err(refusal)?;
            Ok((
                200,
                json!(l
                    .iter()
                    .map(|(id, s)| json!({"id": id, "state": s}))
                    .collect::<Vec<_>>()),
            ))
        }
        ("POST", ["rollouts"]) => {
            let spec: Spec = body_json(r, "the rollout spec")?;
            f.store
                .tx(|tx| rollout::create(tx, cfg, now, &spec))
                .map_err(|e| err(400, format!("{e:#}")))?;
            status(f, &spec.id, now).map(|(_, v)| (201, v))
        }
        ("GET", ["rollouts", id]) => status(f, id, now),
        ("POST", ["rollouts", id, action]) => {
            let extra = f
                .store
                .tx(|tx| match *action {
                    "start" => rollout::start(tx, now, id).map(|_| json!({})),
                    "freeze" => rollout::freeze(tx, cfg, now, id).map(|n| json!({"holding": n})),
                    "resume" => rollout::resume(tx, now, id).map(|_| json!({})),
                    "abort" => {
                        rollout::abort(tx, cfg, now, id).and_then(|a| Ok(serde_json::to_value(a)?))
                    }
                    other => anyhow::bail!(
                        "unknown rollout action {other:?} (start, freeze, resume, abort)"
                    ),
                })
                .map_err(refusal)?;
            let (code, mut v) = status(f, id, now)?;
            if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
                o.extend(e);
            }
            Ok((code, v))
        }
        _ => Err(err(
            404,
            format!("no route {} /api/v1/{}", r.method, parts.join("/")),
        )),
    })();
    res.unwrap_or_else(|e| e)
}

fn status(f: &Fleet, id: &str, now: i64) -> Result<(u16, Value), (u16, Value)> {
    let s = f
        .store
        .tx(|tx| rollout::status(tx, &f.cfg, now, id))
        .map_err(refusal)?;
    Ok((200, json!(s)))
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The server: `workers` threads taking requests from one listener.
pub struct Server {
    pub port: u16,
    stop: Arc<AtomicBool>,
    server: Arc<tiny_http::Server>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    pub fn start(fleet: Arc<Fleet>, listen: &str, workers: usize) -> Result<Server> {
        let server = Arc::new(
            tiny_http::Server::http(listen)
                .map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?,
        );
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .context("the HTTP listener has no IP address")?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..workers.max(1) {
            let (srv, f, s) = (server.clone(), fleet.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("http-{i}"))
                    .spawn(move || {
                        while !s.load(Ordering::SeqCst) {
                            match srv.recv_timeout(Duration::from_millis(200)) {
                                Ok(Some(req)) => serve(&f, req),
                                Ok(None) => {}
                                Err(e) => log::warn!("HTTP: {e}"),
                            }
                        }
                    })?,
            );
        }
        Ok(Server {
            port,
            stop,
            server,
            threads,
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.server.unblock();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve(f: &Fleet, mut req: tiny_http::Request) {
    let mut body = Vec::new();
    let limit = 4 << 20;
    let (code, v) = match req.as_reader().take(limit + 1).read_to_end(&mut body) {
        Err(e) => err(400, format!("reading the request body: {e}")),
        Ok(n) if n as u64 > limit => err(413, "request body over 4 MiB"),
        Ok(_) => {
            let url = req.url().to_string();
            let (path, query) = url.split_once('?').unwrap_or((&url, ""));
            let auth = req
                .headers()
                .iter()
                .find(|h| h.field.equiv("Authorization"))
                .map(|h| h.value.as_str().to_string());
            let method = req.method().as_str().to_string();
            route(
                f,
                &Request {
                    method: &method,
                    path,
                    query: parse_query(query),
                    bearer: auth.as_deref().and_then(|a| a.strip_prefix("Bearer ")),
                    body: &body,
                },
            )
        }
    };
    let resp = tiny_http::Response::from_string(v.to_string())
        .with_status_code(code)
        .with_header(
            tiny_http::Header::from_bytes("Content-Type", "application/json")
                .expect("a valid header"),
        );
    if let Err(e) = req.respond(resp) {
        log::warn!("answering an HTTP request: {e}");
    }
}
