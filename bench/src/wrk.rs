//! Rows 8 and 9 through `wrk`, an HTTP load tool that is not ours (Debian package `wrk`):
//! a Lua script feeds it the confirm links (and, for `POST`, each page's form), each of its
//! threads taking its own share of them in turn.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

/// Connections per `wrk` thread are `connections / THREADS`.
const THREADS: usize = 2;

/// What one `wrk` run reported.
#[derive(Debug, Clone, Default)]
pub struct WrkRun {
    pub requests: u64,
    pub rate: f64,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    /// Answers other than 2xx/3xx, and socket errors (connect, read, write, timeout).
    pub bad: u64,
}

/// `wrk`'s path, or `None` when it is not installed.
pub fn find() -> Option<std::path::PathBuf> {
    optinsync_testkit::find_program("wrk")
}

/// Each thread sends its share of the requests (line `i` goes to thread `i % threads`),
/// starting over when it has sent them all.
const SCRIPT: &str = r#"
local threads, counter = {}, 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  local nthreads = tonumber(args[2])
  reqs = {}
  local i = 0
  for line in io.lines(args[1]) do
    if i % nthreads == id then
      local method, path, body = line:match("^(%u+)\t([^\t]+)\t?(.*)$")
      local headers = {}
      if method == "POST" then
        headers["Content-Type"] = "application/x-www-form-urlencoded"
      else
        body = nil
      end
      reqs[#reqs + 1] = wrk.format(method, path, headers, body)
    end
    i = i + 1
  end
  next = 1
end
function request()
  local r = reqs[next]
  next = next % #reqs + 1
  return r
end
"#;

/// Run `wrk` against `base` for `duration` with `connections`, over `requests` (method, path,
/// form body); `dir` holds the script and the request list.
pub fn run(
    wrk: &Path,
    base: &str,
    requests: &[(&str, String, String)],
    connections: usize,
    duration: Duration,
    dir: &Path,
) -> anyhow::Result<WrkRun> {
    if requests.is_empty() {
        bail!("no requests for wrk");
    }
    std::fs::create_dir_all(dir)?;
    let script = dir.join("requests.lua");
    std::fs::write(&script, SCRIPT)?;
    let list = dir.join("requests.tsv");
    let mut text = String::new();
    for (method, path, body) in requests {
        text.push_str(&format!("{method}\t{path}\t{body}\n"));
    }
    std::fs::write(&list, text)?;
    let secs = duration.as_secs().max(1);
    let out = Command::new(wrk)
        .args(["--latency", "-t", &THREADS.to_string()])
        .args(["-c", &connections.max(THREADS).to_string()])
        .args(["-d", &format!("{secs}s"), "--timeout", "10s", "-s"])
        .arg(&script)
        .arg(base)
        .arg("--")
        .arg(&list)
        .arg(THREADS.to_string())
        .output()
        .context("running wrk")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&stdout).with_context(|| format!("reading wrk's report:\n{stdout}"))
}

/// A `wrk` latency such as `812.00us`, `4.31ms` or `1.02s`.
fn latency(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

fn parse(report: &str) -> Option<WrkRun> {
    let mut run = WrkRun::default();
    for line in report.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(v)) => run.p50 = latency(v),
            (Some("99%"), Some(v)) => run.p99 = latency(v),
            (Some("Requests/sec:"), Some(v)) => run.rate = v.parse().ok()?,
            _ => {}
        }
        if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.bad += rest.trim().parse::<u64>().ok()?;
        }
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            run.bad += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if line.contains("requests in") {
            run.requests = line.split_whitespace().next()?.parse().ok()?;
        }
    }
    (run.rate > 0.0).then_some(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_reports_are_read() {
        let report = "Running 2s test @ http://127.0.0.1:8080\n  2 threads and 64 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     7.10ms    2.00ms  30.00ms   80.00%\n  Latency Distribution\n     50%    6.52ms\n     75%    8.00ms\n     90%    9.00ms\n     99%   14.20ms\n  18000 requests in 2.00s, 40.00MB read\n  Non-2xx or 3xx responses: 3\n  Socket errors: connect 0, read 1, write 0, timeout 2\nRequests/sec:   9000.50\nTransfer/sec:     20.00MB\n";
        let run = parse(report).expect("parsed");
        assert_eq!(run.requests, 18_000);
        assert!((run.rate - 9000.5).abs() < 1e-9);
        assert_eq!(run.p50, Some(Duration::from_micros(6520)));
        assert_eq!(run.p99, Some(Duration::from_micros(14200)));
        assert_eq!(run.bad, 6);
        assert_eq!(latency("812.00us"), Some(Duration::from_micros(812)));
        assert_eq!(latency("1.5s"), Some(Duration::from_millis(1500)));
        assert!(parse("garbage").is_none());
    }
}
