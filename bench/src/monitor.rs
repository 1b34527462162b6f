//! What the benchmark reads besides the clock: the server's monitoring
//! endpoint (messages per connection) and `/proc` (CPU time, peak memory).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

use crate::error::{fail, Context, Result};

/// How long one monitoring request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's HTTP monitoring endpoint (`nats-server -m PORT`).
#[derive(Debug, Clone)]
pub(crate) struct Monitor {
    /// `host:port` of the endpoint.
    addr: String,
}

impl Monitor {
    /// The endpoint at `addr` (`host:port`).
    pub(crate) fn new(addr: impl Into<String>) -> Self {
        Monitor { addr: addr.into() }
    }

    /// `host:port` of the endpoint.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// GET `path` (e.g. `/varz`) and parse the JSON body.
    pub(crate) async fn get_json(&self, path: &str) -> Result<Value> {
        let addr = self.addr.clone();
        let path = path.to_owned();
        let what = format!("GET http://{addr}{path}");
        tokio::task::spawn_blocking(move || http_get_json(&addr, &path))
            .await
            .with_context(|| what.clone())?
            .with_context(|| what.clone())
    }

    /// Protocol messages the server counted on each of the named
    /// connections: `in_msgs` (messages the client published) plus
    /// `out_msgs` (messages delivered to it). Every name must be a
    /// connected client.
    pub(crate) async fn connection_msgs(&self, names: &[String]) -> Result<Vec<u64>> {
        let connz = self.get_json("/connz?limit=100000").await?;
        let conns = connz
            .get("connections")
            .and_then(Value::as_array)
            .ok_or_else(|| fail("/connz has no `connections` list"))?;
        let mut counts = Vec::with_capacity(names.len());
        for name in names {
            let conn = conns
                .iter()
                .find(|c| c.get("name").and_then(Value::as_str) == Some(name.as_str()))
                .ok_or_else(|| fail(format!("no connection named {name} in /connz")))?;
            let count = |field: &str| conn.get(field).and_then(Value::as_u64).unwrap_or(0);
            counts.push(count("in_msgs") + count("out_msgs"));
        }
        Ok(counts)
    }
}

/// A plain HTTP/1.0 GET (the server closes the connection after the body).
fn http_get_json(addr: &str, path: &str) -> Result<Value> {
    let mut stream = TcpStream::connect(addr).context("cannot connect")?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n"
    )
    .context("cannot send the request")?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .context("cannot read the response")?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| fail("the response has no header end"))?;
    let (head, body) = (&response[..split], &response[split + 4..]);
    let status = String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or(&[]))
        .trim()
        .to_owned();
    if !status.contains(" 200") {
        return Err(fail(format!("the server answered {status:?}")));
    }
    serde_json::from_slice(body).context("the body is not JSON")
}

/// Clock ticks per second of `/proc/*/stat` CPU times (`USER_HZ`, 100 on
/// every Linux architecture jetq runs on).
const USER_HZ: u64 = 100;

/// CPU time (user + system) the process `pid` (this one if `None`) has used
/// so far, from `/proc`; `None` where there is no `/proc` (not Linux).
pub(crate) fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces: count from its `)`.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (field 3) ... utime (14), stime (15).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / USER_HZ))
}

/// Peak resident memory (`VmHWM`) of process `pid` in KiB, from `/proc`.
pub(crate) fn peak_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| fail(format!("no VmHWM in {path}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_is_readable() {
        if std::path::Path::new("/proc/self/stat").exists() {
            assert!(cpu_time(None).is_some());
        }
    }

    #[test]
    fn own_peak_rss_is_readable() {
        if std::path::Path::new("/proc/self/status").exists() {
            let kib = peak_rss_kib(std::process::id()).unwrap_or(0);
            assert!(kib > 0);
        }
    }
}
